"""The Jakiro / EAGLE-2 draft: shapes, the hybrid schedule, losslessness, checkpoints."""

import pytest
import torch

from turbolm import SamplingParams, TurboLMError, encode_prompt, generate, load_target
from turbolm.speculative import SpeculativeGenerator, TreeConfig
from turbolm.speculative.draft.model import DraftConfig, DraftModel, load_draft
from turbolm.speculative.proposers.jakiro import JakiroProposer

VARIANTS = [("jakiro", "mixture"), ("jakiro", "decoupled"), ("eagle2", "mixture")]


def make_draft(target, arch="jakiro", mode="mixture", vocab=0, seed=0):
    torch.manual_seed(seed)
    draft = DraftModel(DraftConfig.for_target(target, arch=arch, candidate_mode=mode, draft_vocab_size=vocab)).eval()
    if vocab:
        draft.draft_vocab.copy_(torch.arange(vocab) * 2)  # every other target token
    return draft


@pytest.mark.parametrize("arch, mode", VARIANTS)
def test_shapes(tiny, arch, mode):
    target, _ = tiny
    draft = make_draft(target, arch, mode)
    H = target.config.hidden_size
    out = draft(torch.randn(2, 7, H), torch.randn(2, 7, H), torch.arange(7).expand(2, -1))
    assert out.hidden.shape == (2, 7, H)
    assert (out.contrastive is not None) == (arch == "jakiro")
    if arch == "jakiro":
        assert out.contrastive.shape == (2, 7, H) and out.expert_weights.shape == (2, 7, 2)
        assert torch.allclose(out.expert_weights.sum(-1), torch.ones(2, 7))
    assert (out.expert_hidden is not None) == (mode == "decoupled")
    head = target.get_output_embeddings().weight
    assert draft.logits(out.hidden, head).shape == (2, 7, target.config.vocab_size)
    small = make_draft(target, arch, mode, vocab=50)
    assert small.logits(out.hidden, head).shape == (2, 7, 50)


def test_cache_matches_full_forward(tiny):
    target, _ = tiny
    draft = make_draft(target)
    H = target.config.hidden_size
    e, f, pos = torch.randn(1, 9, H), torch.randn(1, 9, H), torch.arange(9)[None]
    full = draft(e, f, pos).hidden
    from turbolm.speculative.draft.model import KVCache

    cache = KVCache()
    a = draft(e[:, :5], f[:, :5], pos[:, :5], cache).hidden
    b = draft(e[:, 5:], f[:, 5:], pos[:, 5:], cache).hidden
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch, expected", [("jakiro", [1, 1, 2, 3, 4]), ("eagle2", [1, 2, 3, 4, 5])])
def test_hybrid_schedule_draft_forwards_per_step(tiny, arch, expected):
    """Jakiro drafts a depth-D tree with D-1 forwards (the last two levels share one); EAGLE-2 with D."""
    target, tok = tiny
    draft = make_draft(target, arch)
    calls = []
    original = draft.forward
    draft.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    ids = encode_prompt(tok, "Write a short poem about the sea.")
    for depth, want in zip([1, 2, 3, 4, 5], expected):
        proposer = JakiroProposer(draft, target, TreeConfig(total_tokens=64, depth=depth, top_k=3))  # keep every node
        proposer.start(ids, torch.randn(len(ids), target.config.hidden_size))
        calls.clear()
        tree = proposer.propose(ids + [5], max_depth=depth)
        assert len(calls) == want, (depth, len(calls))  # the catch-up forward included
        assert tree.depth == depth and len(tree) == 1 + 3 + 9 * (depth - 1)


@pytest.mark.parametrize("arch, mode", VARIANTS)
@pytest.mark.parametrize("vocab", [0, 200])
def test_greedy_output_identical_to_vanilla(tiny_dirs, arch, mode, vocab):
    for name in ("llama", "qwen2"):
        target, tok = load_target(tiny_dirs[name])
        proposer = JakiroProposer(make_draft(target, arch, mode, vocab), target, TreeConfig(total_tokens=10, depth=4, top_k=3))
        gen = SpeculativeGenerator(target, tok, proposer)
        for prompt in ["The capital of France is", "Write a short poem about the sea.", "def add(a, b):"]:
            ids = encode_prompt(tok, prompt)
            assert gen.generate(ids, max_new_tokens=40).token_ids == generate(target, tok, ids, max_new_tokens=40).token_ids
        res = gen.generate(ids, max_new_tokens=20, sampling=SamplingParams(temperature=0.8, seed=0))
        assert res.new_tokens == 20 or res.finish_reason == "eos"


def test_checkpoint_round_trip_and_wrong_target(tiny, tmp_path, tiny_dirs):
    target, _ = tiny
    draft = make_draft(target, "jakiro", "decoupled", vocab=64)
    draft.save(tmp_path / "ckpt")
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]  # no temp files left
    loaded = load_draft(tmp_path / "ckpt", target)
    for (k, a), (_, b) in zip(draft.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.config == draft.config
    other, _ = load_target(tiny_dirs["qwen2"])
    with pytest.raises(TurboLMError, match="trained for a different target"):
        load_draft(tmp_path / "ckpt", other)
    with pytest.raises(TurboLMError, match="not a draft checkpoint"):
        load_draft(tmp_path / "nothing", target)
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(TurboLMError, match="cannot read .*model.safetensors"):
        load_draft(tmp_path / "ckpt", target)


def test_target_identity_across_dtypes_and_checkpoints(tiny, tiny_dir, tmp_path):
    """A draft trained on the fp32 target loads onto the same weights in bf16 (a GPU run), and
    is refused for another checkpoint of the same architecture and sizes."""
    from conftest import make_model_dir

    target, _ = tiny
    make_draft(target).save(tmp_path / "ckpt")
    bf16, _ = load_target(tiny_dir, dtype="bfloat16")
    assert next(load_draft(tmp_path / "ckpt", bf16).parameters()).dtype == torch.bfloat16
    sibling, _ = load_target(make_model_dir(tmp_path / "sibling", "llama", seed=1))
    with pytest.raises(TurboLMError, match="embedding weights differ"):
        load_draft(tmp_path / "ckpt", sibling)


def test_invalid_configs(tiny):
    target, _ = tiny
    for bad in ({"arch": "medusa"}, {"candidate_mode": "both"}, {"arch": "eagle2", "candidate_mode": "decoupled"}, {"num_experts": 1},
                {"draft_vocab_size": 10**6}, {"draft_vocab_size": -1}):
        with pytest.raises(TurboLMError):
            DraftConfig.for_target(target, **bad)
