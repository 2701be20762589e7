"""Weight-only quantisation of a model's linear layers (``--dtype int8`` / ``--dtype int4``).

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth and
fewer bytes per weight is the lever: bfloat16 halves float32's bytes, int8 halves them again and
int4 once more. PyTorch has CPU kernels for exactly these products, with bfloat16 activations:

- ``int8`` (``aten._weight_int8pack_mm``): symmetric int8, one scale per output channel.
  Measured on a 2-core Xeon (AVX-512, AMX) over the default model's 210 layer weights: 14 ms for
  one row against 24 ms for float32 ``F.linear`` and 26-31 ms for bfloat16, but 67 ms against
  32 ms at 16 rows.
- ``int4`` (``aten._weight_int4pack_mm_for_cpu``): groups of 32 values along the input with a
  scale and a zero each (``w = (q - 8) * scale + zero``, q in 0..15) - llama.cpp's Q4_1 blocks,
  which the default model's GGUF stores its 210 layer weights in, so rounding its (dequantised)
  weights to int4 finds the GGUF's own values again and only the scales' rounding to bfloat16 is
  new. The same 210 weights: 12 ms for one row in the kernel table (5.5 ms per token profiled
  inside a decoding forward) against 24 ms for bfloat16, but slower than bfloat16 from 16 rows. Its
  float32-activation path is a slow reference loop (~10x ``F.linear``): int4 runs in bfloat16.
  Layers whose shape the kernel does not take (outputs not a multiple of 16, inputs not of 32)
  stay unquantised.

Either kernel is one more candidate in the measured kernel table (``core.kernels``), taken per
row count where it is faster.

:func:`quantize` rounds every linear weight of the decoder layers and stores the *dequantised*
values back in the model's own dtype. That dequantised model is the target: plain ``F.linear`` on
it, the packed oneDNN kernel and the quantised kernel all compute the same product up to rounding
(the dequantised values are rounded to the model's dtype: in bfloat16 a relative 2^-9 per weight,
the same size as bfloat16's own rounding), so every path (GPU, training, prefill, the kernels'
other row counts) runs the same model. The quantised form (values and scales, :class:`QuantForm`)
is kept beside each weight (:func:`quant_form`) for as long as the weight is not changed. The
lm_head (tied to the input embedding in many models) and the embeddings stay in the model's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .errors import ParameterError

INT8, INT4 = "int8", "int4"
SCHEMES = (INT8, INT4)
QMAX = 127  # int8: symmetric, [-127, 127]
INT4_GROUP = 32  # int4: values per (scale, zero) group along the input dimension, as llama.cpp's Q4_1
_INT4_OUT = 16  # the int4 kernel's shape rule: outputs a multiple of 16, inputs of the group size
_KERNELS = {INT8: "_weight_int8pack_mm", INT4: "_weight_int4pack_mm_for_cpu"}
_ATTR = "turbolm_quantization"  # set on a quantised model: its scheme
# weight tensor -> (its storage/version key when quantised, its QuantForm)
_FORMS: WeakIdKeyDictionary = WeakIdKeyDictionary()


class QuantForm(NamedTuple):
    """A weight's quantised form: ``scheme``, the kernel's arguments after the input (int8: values
    (out, in) and per-row scales; int4: the packed values, the group size and the scales and zeros
    (in / group, out, 2)), the activation ``dtype`` they are for, and the bytes a product reads."""

    scheme: str
    args: tuple
    dtype: torch.dtype
    nbytes: int


def kernel_available(scheme: str) -> bool:
    """Whether this PyTorch build has the weight-only CPU kernel of ``scheme``."""
    return hasattr(torch.ops.aten, _KERNELS[scheme])


def quantized_product(x: torch.Tensor, form: QuantForm) -> torch.Tensor:
    """``x`` (rows, in) times the weight ``form`` holds, transposed: (rows, out), by its kernel."""
    return getattr(torch.ops.aten, _KERNELS[form.scheme])(x, *form.args)


def weight_key(weight: torch.Tensor) -> tuple:
    """What a copy made from ``weight`` (a quantised form, a packed or transposed copy) is valid for:
    its storage, version, shape, dtype and device. Inference tensors (made under
    ``torch.inference_mode``) carry no version counter; turbolm never updates them in place."""
    version = -1 if weight.is_inference() else weight._version
    return (weight.data_ptr(), version, weight.shape, weight.dtype, weight.device)


def quant_form(weight: torch.Tensor) -> QuantForm | None:
    """The form :func:`quantize` rounded ``weight`` to, or None (not quantised, or changed since)."""
    entry = _FORMS.get(weight)
    if entry is None or entry[0] != weight_key(weight):
        return None
    return entry[1]


def _int8(w: torch.Tensor) -> tuple[torch.Tensor, QuantForm]:
    """Symmetric int8 with one scale per output row (max |w| / 127; rows of zeros get 1)."""
    amax = w.float().abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(w.float() / scales[:, None]).clamp_(-QMAX, QMAX)
    stored = scales.to(w.dtype)
    return (q * scales[:, None]).to(w.dtype), QuantForm(INT8, (q.to(torch.int8), stored), w.dtype,
                                                         q.numel() + stored.numel() * stored.element_size())


def _int4(w: torch.Tensor) -> tuple[torch.Tensor, QuantForm]:
    """Asymmetric int4 per group of 32 inputs (llama.cpp's Q4_1): the group's minimum is q = 0 and
    its maximum q = 15. Dequantised with the scales and zeros as stored (the weight's dtype)."""
    out_features, in_features = w.shape
    g = w.float().view(out_features, in_features // INT4_GROUP, INT4_GROUP)
    low, high = g.amin(-1), g.amax(-1)
    scale = torch.where(high > low, (high - low) / 15, torch.ones_like(low))
    q = torch.round((g - low[..., None]) / scale[..., None]).clamp_(0, 15)
    scale_zero = torch.stack([scale, low + 8 * scale], dim=-1).to(w.dtype)  # (out, groups, 2)
    s, z = scale_zero.float().unbind(-1)
    dequantised = ((q - 8) * s[..., None] + z[..., None]).view(out_features, in_features).to(w.dtype)
    q = q.view(out_features, in_features).to(torch.int32)
    # the kernel is a CPU one: a weight elsewhere (a GPU) keeps its dequantised values only
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1) if w.device.type == "cpu" else None
    scales_and_zeros = scale_zero.transpose(0, 1).contiguous()  # (groups, out, 2), as the kernel takes them
    return dequantised, QuantForm(INT4, (packed, INT4_GROUP, scales_and_zeros), w.dtype,
                                  q.numel() // 2 + scales_and_zeros.numel() * scales_and_zeros.element_size())


def quantizable(model: nn.Module, scheme: str = INT8) -> list[nn.Linear]:
    """The linear layers :func:`quantize` rounds: every ``nn.Linear`` but the output head
    (``model.get_output_embeddings()``) and any layer sharing a weight with an embedding; for int4
    only those whose shape the kernel takes (outputs a multiple of 16, inputs of 32)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [m for m in model.modules()
            if isinstance(m, nn.Linear) and m is not head and id(m.weight) not in embeddings
            and (scheme != INT4 or (m.out_features % _INT4_OUT == 0 and m.in_features % INT4_GROUP == 0))]


@torch.no_grad()
def quantize(model: nn.Module, scheme: str = INT8) -> nn.Module:
    """Round ``model``'s decoder linear weights to ``scheme`` (int8: per output channel, symmetric;
    int4: groups of 32 with a scale and a zero), in place.

    The weights keep their dtype and hold the dequantised values; returns the model, marked so
    that the kernel table times the scheme's kernel for it (:func:`quantization`). Idempotent; a
    model quantised with another scheme is refused.
    """
    if scheme not in SCHEMES:
        raise ParameterError(f"{{}} must be one of {', '.join(SCHEMES)}, got {scheme!r}", "scheme")
    done = quantization(model)
    if done == scheme:
        return model
    if done is not None:
        raise ParameterError(f"{{}} is already quantised to {done}; load it again to quantise it to {scheme}", "model")
    layers = quantizable(model, scheme)
    if not layers:
        raise ParameterError("{} has no linear layers to quantise", "model")
    for m in layers:
        w = m.weight
        if not w.is_floating_point():
            raise ParameterError(f"{{}} holds a {w.dtype} weight; {scheme} quantisation needs floating-point weights",
                                 "model")
        dequantised, form = (_int4 if scheme == INT4 else _int8)(w.detach())
        w.copy_(dequantised)
        _FORMS[w] = (weight_key(w), form)
    setattr(model, _ATTR, scheme)
    return model


def quantization(model: nn.Module) -> str | None:
    """The scheme (``"int8"`` / ``"int4"``) :func:`quantize` rounded ``model`` to, else None."""
    return getattr(model, _ATTR, None)
