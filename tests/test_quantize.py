"""Weight-only quantisation (``--dtype int8`` / ``int4``, turbolm.core.quantize): the weights land on
the scheme's grid with the head and embeddings untouched, the model stays close to the unquantised one,
the kernel computes the same product as F.linear on the dequantised weights, it is a kernel-table
candidate only for quantised weights, and a weight changed afterwards never runs a stale copy."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model_dir, random_ids
from turbolm import load_target
from turbolm.cli import main
from turbolm.core import kernels
from turbolm.core.errors import ParameterError
from turbolm.core.kernels import PACKED, candidates, kernel_table, table_key, table_of
from turbolm.core.models import describe_model
from turbolm.core.quantize import INT4, INT8, kernel_available, quant_form, quantizable, quantization, quantize

needs_int8 = pytest.mark.skipif(not (kernels.available() and kernel_available(INT8)),
                                reason="this PyTorch build has no oneDNN / int8 weight-only kernel")


def int8_form(weight):
    form = quant_form(weight)
    return None if form is None else form.args


def quantize_int8(model):
    return quantize(model, INT8)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    """A tiny Llama whose lm_head shares the input embedding (as SmolLM2's does)."""
    return make_model_dir(tmp_path_factory.mktemp("tied"), "llama", tie_word_embeddings=True, seed=3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_on_the_int8_grid_head_and_embeddings_untouched(tied_dir, dtype):
    model, _ = load_target(tied_dir, dtype=dtype)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    layers = quantizable(model)
    assert quantize_int8(model) is model and quantization(model) == "int8"
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per layer; not the (tied) lm_head
    names = {id(p): n for n, p in model.named_parameters()}
    changed = set()
    for m in layers:
        q, s = int8_form(m.weight)
        assert q.dtype is torch.int8 and q.abs().max() == 127 and s.dtype is m.weight.dtype
        assert (q.abs().amax(1) == 127).all()  # every row uses the full range: one scale per output channel
        exact = q.float() * s.float()[:, None]
        assert torch.allclose(m.weight.float(), exact, rtol=2**-7, atol=0)  # the dequantised values
        changed.add(names[id(m.weight)])
    for name, p in model.named_parameters():
        if name not in changed:  # embeddings (and the tied head), norms
            assert torch.equal(p, before[name]), name
    err = max(((before[n].float() - p.float()).abs().max() / before[n].float().abs().max()).item()
              for n, p in model.named_parameters() if n in changed)
    assert 0 < err <= 1 / 254 + 2**-7  # half a step of 1/127 of the row maximum (+ the dtype's rounding)
    assert quantize_int8(model) is model  # idempotent: not rounded twice
    assert int8_form(layers[0].weight) is not None


def test_close_to_the_unquantised_model(tiny_dir):
    model, _ = load_target(tiny_dir)
    ids = random_ids(32)
    with torch.inference_mode():
        ref = model(ids).logits
        quantize_int8(model)
        out = model(ids).logits
    assert not torch.equal(out, ref)
    assert (out - ref).abs().mean() < 0.05 * ref.std()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_a_model_without_linear_layers_is_refused():
    with pytest.raises(ParameterError, match="model has no linear layers"):
        quantize_int8(torch.nn.Sequential(torch.nn.Embedding(4, 4)))


def needs_kernel(scheme):
    if not (kernels.available() and kernel_available(scheme)):
        pytest.skip(f"this PyTorch build has no oneDNN / {scheme} weight-only kernel")


@pytest.mark.parametrize("scheme", [INT8, INT4])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_the_kernel_computes_the_dequantised_product(scheme, rows):
    needs_kernel(scheme)
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 48).to(torch.bfloat16).requires_grad_(False)
    model = torch.nn.Sequential(layer)
    model.get_output_embeddings = lambda: None
    quantize(model, scheme)
    x = torch.randn(2, rows, 96, dtype=torch.bfloat16)
    other = INT4 if scheme == INT8 else INT8
    with torch.inference_mode():
        ours = kernels._run(scheme, x, layer.weight, layer.bias)
        ref = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        # a kernel never runs another scheme's form, nor a float32 input: F.linear on the weight as it is
        assert torch.equal(kernels._run(other, x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))
        assert torch.equal(kernels._run(scheme, x.float(), layer.weight.float(), None), F.linear(x.float(), layer.weight.float()))
    assert ours.shape == (2, rows, 48) and ours.dtype is torch.bfloat16
    assert torch.allclose(ours.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    with torch.no_grad():
        layer.weight.mul_(2)  # changed after quantising: its quantised copy is stale and never used
    assert quant_form(layer.weight) is None
    with torch.inference_mode():
        assert torch.equal(kernels._run(scheme, x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("scheme", [INT8, INT4])
def test_the_kernel_is_a_candidate_only_for_its_weights(scheme, tiny_dir, tmp_path, monkeypatch):
    needs_kernel(scheme)
    monkeypatch.setenv("TURBOLM_CACHE", str(tmp_path / "cache"))
    other = INT4 if scheme == INT8 else INT8
    assert scheme not in candidates("layers", 1, torch.bfloat16)
    assert scheme in candidates("layers", 1, torch.bfloat16, scheme)
    assert scheme not in candidates("layers", 1, torch.bfloat16, other)
    assert (INT4 in candidates("layers", 1, torch.float32, INT4)) is False  # its float32 path is a slow reference loop
    plain, _ = load_target(tiny_dir, dtype="bfloat16")
    model, _ = load_target(tiny_dir, dtype=scheme)
    assert model.dtype is torch.bfloat16 and quantization(model) == scheme and describe_model(model)["dtype"] == scheme
    groups_plain, groups = kernels.linear_weights(plain), kernels.linear_weights(model)
    assert kernels.quantized_groups(groups_plain) == {}
    assert kernels.quantized_groups(groups) == {"layers": scheme}  # (the tiny lm_head is in it too, unquantised)
    other_model, _ = load_target(tiny_dir, dtype=other)
    keys = {table_key(g, torch.bfloat16) for g in (groups_plain, groups, kernels.linear_weights(other_model))}
    assert len(keys) == 3

    seen = []

    def timer(group, rows, kernel):  # the scheme's kernel fastest up to 4 rows, packed above
        seen.append((group, kernel))
        return {scheme: 0.3 if rows <= 4 else 2.0, PACKED: 0.5}.get(kernel, 1.0)

    table = kernel_table(model, timer=timer, repeats=1, busy_cpus=None)  # cached even on a busy machine
    assert table.kernels["layers"][:4] == (scheme, scheme, scheme, PACKED)
    assert ("layers", scheme) in seen and all(k != scheme for g, k in seen if g != "layers")
    assert all(k != other for _, k in seen)
    assert kernel_table(model, timer=timer).source == "cached"  # its own cache entry round-trips
    assert scheme not in kernel_table(plain, timer=timer, repeats=1).kernels["layers"]

    kernels.optimize_for_small_batches(model, table=table)
    assert table_of(model) is table
    ids = random_ids(12)
    with torch.inference_mode():
        for n in (1, 3, 12):  # the scheme's kernel (1, 3 rows) and packed (12) against plain F.linear on the same weights
            fast = model(ids[:, :n]).logits.float()
            kernels.restore(model)
            ref = model(ids[:, :n]).logits.float()
            kernels.optimize_for_small_batches(model, table=table)
            assert torch.allclose(fast, ref, atol=0.05 * ref.abs().max().item()), n
    kernels.restore(model)
    assert all(type(m) is torch.nn.Linear for m in quantizable(model, scheme))


def test_generate_cli_with_int8(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--dtype", "int8", "--prompt", "Hello", "--max-new-tokens", "5",
                 "--fast-cpu", "off"]) == 0
    assert capsys.readouterr().out.strip()


def test_an_unknown_dtype_names_the_choices(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--dtype", "int3", "--prompt", "Hi"]) == 2
    assert "float32, bfloat16, float16, int8 or int4" in capsys.readouterr().err



def test_bytes_per_token_counts_int8_weights_once_each(tiny_dir):
    from turbolm.core.machine import bytes_per_token

    plain, _ = load_target(tiny_dir, dtype="bfloat16")
    model, _ = load_target(tiny_dir, dtype="int8")
    layers = quantizable(model)
    saved = sum(m.weight.numel() - m.weight.shape[0] * 2 for m in layers)  # 2 bytes -> 1, plus a bf16 scale per row
    assert bytes_per_token(model) == bytes_per_token(plain) - saved


@needs_int8
def test_info_shows_int8(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TURBOLM_CACHE", str(tmp_path / "cache"))
    small = ["--model", str(tiny_dir), "--dtype", "int8", "--probe-mb", "2", "--decode-tokens", "0"]
    assert main(["info", *small, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["dtype"] == "int8" and info["kernels"]["dtype"] == "bfloat16"
    assert "int8" in info["kernels"]["timings_ms"]["layers"]["1"]
    assert main(["info", *small]) == 0
    assert "layers: int8, ms" in capsys.readouterr().out


# --- int4 (groups of 32 with a scale and a zero: llama.cpp's Q4_1) ------------------------------


def test_int4_weights_on_the_grid_per_group_of_32(tied_dir):
    model, _ = load_target(tied_dir, dtype="bfloat16")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    layers = quantizable(model, INT4)
    assert quantize(model, INT4) is model and quantization(model) == "int4"
    assert len(layers) == 2 * 7  # every decoder linear fits the kernel's shapes here; not the (tied) lm_head
    names = {id(p): n for n, p in model.named_parameters()}
    for m in layers:
        form = quant_form(m.weight)
        packed, group, scales_and_zeros = form.args
        assert form.scheme == INT4 and group == 32 and form.dtype is torch.bfloat16
        out_features, in_features = m.weight.shape
        assert scales_and_zeros.shape == (in_features // 32, out_features, 2)
        assert form.nbytes == out_features * in_features // 2 + scales_and_zeros.numel() * 2
        s, z = scales_and_zeros.float().unbind(-1)  # (groups, out)
        w = m.weight.float().view(out_features, in_features // 32, 32)
        q = ((w - z.t()[..., None]) / s.t()[..., None] + 8).round()  # back to the 4-bit values
        assert q.min() >= 0 and q.max() <= 15
        grid = (q - 8) * s.t()[..., None] + z.t()[..., None]
        assert ((w - grid).abs() <= grid.abs() * 2**-8).all()  # on the grid up to the bf16 rounding of the value
        orig = before[names[id(m.weight)]].float().view_as(w)
        step = s.t()[..., None]
        # half a step, plus the bf16 rounding of the scale (x |q - 8| <= 8), the zero and the value
        assert ((w - orig).abs() <= step * (0.5 + 8 * 2**-8) + orig.abs() * 2**-7).all()
    for name, p in model.named_parameters():
        if id(p) not in {id(m.weight) for m in layers}:
            assert torch.equal(p, before[name]), name
    assert quantize(model, INT4) is model  # idempotent
    with pytest.raises(ParameterError, match="model is already quantised to int4"):
        quantize(model, INT8)
    with pytest.raises(ParameterError, match="scheme must be one of int8, int4"):
        quantize(model, "int2")


def test_int4_finds_q4_1_weights_again():
    """Weights that already are Q4_1 blocks (the default model's GGUF) round to the same 4-bit
    values, scales and minima: in float32 the model does not change beyond float32 rounding."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32, bias=False)
    q = torch.randint(0, 16, (32, 2, 32)).float()
    q[..., 0], q[..., 1] = 0, 15  # Q4_1's quantiser maps each block's minimum to 0 and maximum to 15
    d = (torch.rand(32, 2, 1) * 0.02 + 1e-3).half().float()
    m = (torch.randn(32, 2, 1) * 0.05).half().float()
    with torch.no_grad():
        layer.weight.copy_((d * q + m).view(32, 64))
    original = layer.weight.detach().clone()
    model = torch.nn.Sequential(layer)
    quantize(model, INT4)
    assert torch.allclose(layer.weight, original, rtol=0, atol=1e-6)
    s, z = quant_form(layer.weight).args[2].unbind(-1)
    assert torch.allclose(s.t(), d[..., 0], rtol=1e-6) and torch.allclose(z.t() - 8 * s.t(), m[..., 0], atol=1e-6)


def test_int4_leaves_layers_the_kernel_cannot_take():
    keep, fit = torch.nn.Linear(40, 24), torch.nn.Linear(64, 32)  # 24 outputs: not a multiple of 16
    model = torch.nn.Sequential(keep, fit)
    before = keep.weight.detach().clone()
    assert quantizable(model, INT4) == [fit] and quantizable(model, INT8) == [keep, fit]
    quantize(model, INT4)
    assert torch.equal(keep.weight, before) and quant_form(keep.weight) is None and quant_form(fit.weight) is not None


def test_int4_close_to_the_unquantised_model_and_generates(tiny_dir, capsys):
    from turbolm.core.machine import bytes_per_token

    plain, _ = load_target(tiny_dir, dtype="bfloat16")
    model, _ = load_target(tiny_dir, dtype="int4")
    ids = random_ids(32)
    with torch.inference_mode():
        ref, out = plain(ids).logits.float(), model(ids).logits.float()
    assert not torch.equal(out, ref)  # 4 bits move a random model's logits more than 8 do, but they follow
    assert (out - ref).abs().mean() < 0.4 * ref.std() and torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1] > 0.9
    saved = sum(m.weight.numel() * 2 - quant_form(m.weight).nbytes for m in quantizable(model, INT4))
    assert saved > 0 and bytes_per_token(model) == bytes_per_token(plain) - saved
    assert main(["generate", "--model", str(tiny_dir), "--dtype", "int4", "--prompt", "Hello", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()
