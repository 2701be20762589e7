"""The small-batch CPU fast path: same logits and greedy outputs as plain PyTorch, exact fallbacks,
idempotent and reversible, and the draft models under it. Never times anything."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_model_dir
from turbolm import encode_prompt, generate, load_target
from turbolm.core import kernels as fastpath
from turbolm.core.generation import forward, new_cache
from turbolm.core.kernels import FastLinear, is_optimized, optimize_for_small_batches, restore
from turbolm.speculative import ModelProposer, PromptLookupProposer, SpeculativeGenerator, TreeConfig
from turbolm.speculative.draft.model import DraftConfig, DraftModel
from turbolm.speculative.proposers.jakiro import JakiroProposer
from turbolm.speculative.proposers.small_model import truncated_draft

pytestmark = pytest.mark.skipif(not fastpath.available(), reason="this PyTorch build has no oneDNN")

ARCHS = ["llama", "qwen2", "mistral", "gemma2", "gemma3"]
PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "def add(a, b):", "Hello world! Numbers: 0 1"]


@pytest.fixture(scope="module")
def dirs(tiny_dirs, tmp_path_factory):
    out = dict(tiny_dirs)
    for arch in ("gemma2", "gemma3"):
        out[arch] = make_model_dir(tmp_path_factory.mktemp(arch), arch)
    return out


@pytest.fixture(autouse=True)
def every_row_count_fast(monkeypatch):
    """Tiny models have no vocabulary-sized weight: let 1-row products take the transposed copy too."""
    monkeypatch.setattr(fastpath, "TRANSPOSED_MIN_NUMEL", 0)


def fast_copy(model):
    """A copy of ``model`` sharing its weights, on the fast path (the original stays plain)."""
    shared = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return optimize_for_small_batches(copy.deepcopy(model, shared), force=True)


def converted(model) -> int:
    """How many of the model's weights have a fast-path copy, their own or in the joint operand of
    the siblings they are computed with (so a test cannot pass vacuously)."""
    return sum(m.weight in fastpath._DERIVED or bool(getattr(m, "fast_siblings", None) and m.fast_siblings.operands)
               for m in model.modules() if isinstance(m, nn.Linear))


def close(a, b, rel=1e-4):
    scale = max(1.0, float(b.abs().max()))
    return float((a - b).abs().max()) <= rel * scale


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_plain_with_and_without_cache(dirs, arch):
    plain, _ = load_target(dirs[arch])
    fast = fast_copy(plain)
    g = torch.Generator().manual_seed(0)
    vocab = plain.config.vocab_size
    with torch.inference_mode():
        for n in (1, 2, 3, 8, 17, 64):
            ids = torch.randint(0, vocab, (1, n), generator=g)
            assert close(fast(ids).logits, plain(ids).logits), (arch, n, "no cache")
            prefix = torch.randint(0, vocab, (1, 30), generator=g)
            outs = []
            for model in (fast, plain):
                cache = new_cache(model)
                forward(model, prefix, cache)
                outs.append(forward(model, ids, cache).logits)
            assert close(*outs), (arch, n, "cache")
    assert converted(fast) == sum(isinstance(m, nn.Linear) for m in fast.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_identical(dirs, arch):
    model, tok = load_target(dirs[arch])
    for prompt in PROMPTS[:3]:
        ids = encode_prompt(tok, prompt)
        want = generate(model, tok, ids, max_new_tokens=40).token_ids
        optimize_for_small_batches(model, force=True)
        try:
            assert generate(model, tok, ids, max_new_tokens=40).token_ids == want, (arch, prompt)
            assert converted(model) > 0
        finally:
            restore(model)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_speculative_greedy_on_fast_target_equals_plain_vanilla(dirs, arch):
    plain, tok = load_target(dirs[arch])
    fast = fast_copy(plain)
    gen = SpeculativeGenerator(fast, tok, PromptLookupProposer(TreeConfig(total_tokens=8, depth=5, top_k=2)))
    for prompt in PROMPTS:
        ids = encode_prompt(tok, prompt + " " + prompt)
        assert gen.generate(ids, max_new_tokens=40).token_ids == generate(plain, tok, ids, max_new_tokens=40).token_ids


def test_linear_matches_f_linear_for_every_row_count():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(96, 300).eval()
    ref = copy.deepcopy(lin)
    optimize_for_small_batches(lin, force=True)
    with torch.inference_mode():
        for shape in [(96,), (1, 96), (1, 1, 96), (2, 96), (1, 5, 96), (3, 4, 96), (1, 128, 96)]:
            x = torch.randn(*shape, generator=g)
            y = lin(x)
            assert y.shape == ref(x).shape
            assert torch.allclose(y, ref(x), atol=1e-5, rtol=1e-5), shape
            assert torch.allclose(fastpath.linear(x, lin.weight, lin.bias, force=True), y, atol=1e-5, rtol=1e-5)
        x = torch.randn(7, 96, generator=g).t().contiguous().t()[:5]  # a non-contiguous input
        assert torch.allclose(lin(x), ref(x), atol=1e-5, rtol=1e-5)


def test_vocabulary_sized_single_row(monkeypatch):
    """The real threshold: with every fast kernel on, a 1-row product takes the transposed copy only
    for a large weight (the lm_head group)."""
    monkeypatch.undo()
    w = torch.randn(8192, 512) * 0.05
    x = torch.randn(1, 1, 512)
    on = fastpath.on_table(torch.float32)
    with torch.inference_mode():
        assert fastpath._kernel(x, w, None, fastpath.plan_for(on, w)) == "transposed"
        assert fastpath._kernel(x, w[:100], None, fastpath.plan_for(on, w[:100])) == "default"  # small layers: gemv
        assert torch.allclose(fastpath.linear(x, w, force=True), F.linear(x, w), atol=1e-5, rtol=1e-5)
        assert "transposed" in fastpath._DERIVED[w]


@pytest.mark.parametrize("case", ["grad", "training", "bf16", "float16", "float64", "too_many_rows"])
def test_fallbacks_equal_f_linear_exactly(case):
    if case == "bf16" and fastpath.bf16_supported():
        pytest.skip("oneDNN has bf16 kernels on this CPU (tests/test_kernel_choice.py checks them)")
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).eval()
    x = torch.randn(1, 6, 64)
    grad = False
    if case == "grad":
        grad = True
    elif case == "training":
        lin.train()
    elif case == "bf16":
        lin, x = lin.to(torch.bfloat16), x.bfloat16()
    elif case == "float16":
        lin, x = lin.half(), x.half()
    elif case == "too_many_rows":
        x = torch.randn(2, 100, 64)  # 200 rows > MAX_ROWS
    elif case == "float64":
        lin, x = lin.double(), x.double()
    optimize_for_small_batches(lin, force=True)
    with torch.set_grad_enabled(grad):
        y = lin(x)
        ref = F.linear(x, lin.weight, lin.bias)
    assert torch.equal(y, ref)
    assert (y.grad_fn is not None) == grad
    assert lin.weight not in fastpath._DERIVED
    if grad:
        y.sum().backward()
        assert lin.weight.grad is not None


def test_frozen_weights_outside_inference_mode_are_fast():
    """Plain ``model(ids)`` with frozen weights (no_grad not needed) still takes the fast path."""
    lin = nn.Linear(64, 48).eval().requires_grad_(False)
    optimize_for_small_batches(lin, force=True)
    x = torch.randn(3, 64)
    assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5)
    assert lin.weight in fastpath._DERIVED


def test_idempotent_restore_and_weight_changes(tiny_dir):
    model, _ = load_target(tiny_dir)
    keys = list(model.state_dict())
    ids = torch.arange(3, 12)[None]
    with torch.inference_mode():
        want = model(ids).logits
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert optimize_for_small_batches(model, force=True) is model
    optimize_for_small_batches(model, max_rows=64, force=True)
    assert is_optimized(model)
    assert sum(type(m) is FastLinear for m in model.modules()) == n_linear
    assert all(m.fast_plan.max_rows == 64 for m in model.modules() if type(m) is FastLinear)
    assert list(model.state_dict()) == keys
    with torch.inference_mode():
        assert close(model(ids).logits, want)
    assert converted(model) == n_linear
    # A weight changed in place is converted again, not served stale.
    lm_head = model.get_output_embeddings()
    with torch.no_grad():
        lm_head.weight.mul_(2.0)
    with torch.inference_mode():
        doubled = model(ids).logits
    with torch.no_grad():
        lm_head.weight.div_(2.0)
    assert close(doubled, 2 * want)
    assert restore(model) is model
    assert not is_optimized(model) and sum(type(m) is nn.Linear for m in model.modules()) == n_linear
    assert converted(model) == 0 and list(model.state_dict()) == keys
    assert not any({"fast_plan", "fast_operands", "fast_siblings"} & set(vars(m)) for m in model.modules())  # nothing left behind
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, want)
    restore(model)  # restoring twice is harmless


def test_weights_made_under_inference_mode():
    """Inference tensors carry no version counter: a layer built under inference_mode still runs fast."""
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 32)).eval()
        x = torch.randn(3, 64)
        want = model(x)
        optimize_for_small_batches(model, force=True)
        assert all(type(m) is FastLinear for m in model)
        assert close(model(x), want) and close(model(x[:1]), want[:1])


def test_subclasses_of_linear_are_left_alone():
    class Custom(nn.Linear):
        pass

    m = nn.Sequential(Custom(8, 8), nn.Linear(8, 8))
    optimize_for_small_batches(m, force=True)
    assert type(m[0]) is Custom and type(m[1]) is FastLinear


def test_truncated_draft_of_fast_target_shares_the_fast_path(tiny_dir):
    target, tok = load_target(tiny_dir)
    want = {p: generate(target, tok, encode_prompt(tok, p), max_new_tokens=30).token_ids for p in PROMPTS}
    optimize_for_small_batches(target, force=True)
    try:
        with torch.inference_mode():  # the fast layers hold their packed weights when the copy is made
            target(torch.arange(3, 12)[None])
            target(torch.arange(3, 4)[None])
        draft = truncated_draft(target, 1)  # deep copy sharing the weights
        assert is_optimized(draft)
        gen = SpeculativeGenerator(target, tok, ModelProposer(draft, tok))
        for p, ids in want.items():
            assert gen.generate(encode_prompt(tok, p), max_new_tokens=30).token_ids == ids
    finally:
        restore(target)


@pytest.mark.parametrize("arch, mode", [("jakiro", "mixture"), ("jakiro", "decoupled"), ("eagle2", "mixture")])
def test_draft_model_under_the_fast_path(tiny_dir, arch, mode):
    target, tok = load_target(tiny_dir)
    torch.manual_seed(0)
    plain = DraftModel(DraftConfig.for_target(target, arch=arch, candidate_mode=mode)).eval()
    fast = fast_copy(plain)
    H = target.config.hidden_size
    head = target.get_output_embeddings().weight
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for T in (1, 4, 16):
            emb, feat = torch.randn(1, T, H, generator=g), torch.randn(1, T, H, generator=g)
            pos = torch.arange(T)[None]
            a, b = fast(emb, feat, pos), plain(emb, feat, pos)
            assert close(a.hidden, b.hidden)
            if a.contrastive is not None:
                assert close(a.contrastive, b.contrastive)
            # The lm_head product the draft scores with, through the helper.
            want = plain.logits(b.hidden[0], head)
            assert close(fastpath.linear(b.hidden[0], plain.head_weight(head), force=True), want)
    assert converted(fast) == sum(isinstance(m, nn.Linear) for m in fast.modules())
    # Losslessness with a fast target and a fast draft.
    want = {p: generate(target, tok, encode_prompt(tok, p), max_new_tokens=30).token_ids for p in PROMPTS[:2]}
    fast_target = fast_copy(target)
    gen = SpeculativeGenerator(fast_target, tok, JakiroProposer(fast, fast_target, TreeConfig(total_tokens=10, depth=4, top_k=3)))
    for p, ids in want.items():
        assert gen.generate(encode_prompt(tok, p), max_new_tokens=30).token_ids == ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_runs_plain_f_linear(tiny_dir):
    model, tok = load_target(tiny_dir, device="cuda")
    ids = torch.arange(3, 12, device="cuda")[None]
    with torch.inference_mode():
        want = model(ids).logits
        optimize_for_small_batches(model, force=True)
        got = model(ids).logits
    assert torch.equal(got, want) and converted(model) == 0
    restore(model)
