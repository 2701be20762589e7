"""int8 weight-only quantisation of a model's linear layers (``--dtype int8``).

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth and
fewer bytes per weight is the lever: bfloat16 halves float32's bytes, int8 halves them again.
PyTorch has a CPU kernel for exactly this product (``aten._weight_int8pack_mm``: bfloat16
activations, int8 weights, one scale per output channel); measured on a 2-core Xeon (AVX-512,
AMX) over the default model's 210 layer weights: 14 ms for one row against 24 ms for float32
``F.linear`` and 26-31 ms for bfloat16, but 67 ms against 32 ms at 16 rows - so it is one more
candidate in the measured kernel table (``core.kernels``), taken where it is faster.

:func:`quantize_int8` rounds every linear weight of the decoder layers to symmetric int8 with a
per-output-channel scale (``scale = max |w| / 127``) and stores the *dequantised* values
``q * scale`` back in the model's own dtype. That dequantised model is the target: plain
``F.linear`` on it, the packed oneDNN kernel and the int8 kernel all compute the same product up
to rounding (the dequantised values are rounded to the model's dtype: in bfloat16 a relative
2^-9 per weight, the same size as bfloat16's own rounding), so every path (GPU, training,
prefill, the kernels' other row counts) runs the same model. The int8 values and scales are kept
beside each weight (:func:`int8_form`) for as long as the weight is not changed. The lm_head (tied to the input embedding in many models) and the
embeddings stay in the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .errors import ParameterError

INT8 = "int8"
QMAX = 127
_ATTR = "turbolm_quantization"  # set on a quantised model: "int8"
# weight tensor -> (its storage/version key when quantised, int8 values, per-row scales in its dtype)
_FORMS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _key(weight: torch.Tensor) -> tuple:
    return (weight.data_ptr(), weight._version, weight.shape, weight.dtype, weight.device)


def _scales(weight: torch.Tensor) -> torch.Tensor:
    """One float32 scale per output row: max |w| / 127 (rows of zeros get 1)."""
    amax = weight.detach().float().abs().amax(dim=1)
    return torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))


def int8_form(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(q, scales)``: the int8 values (out, in) and per-row scales (the weight's dtype) that
    :func:`quantize_int8` rounded ``weight`` to, or None (not quantised, or changed since)."""
    form = _FORMS.get(weight)
    if form is None or form[0] != _key(weight):
        return None
    return form[1], form[2]


def quantizable(model: nn.Module) -> list[nn.Linear]:
    """The linear layers :func:`quantize_int8` rounds: every ``nn.Linear`` but the output head
    (``model.get_output_embeddings()``) and any layer sharing a weight with an embedding."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [m for m in model.modules()
            if isinstance(m, nn.Linear) and m is not head and id(m.weight) not in embeddings]


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Round ``model``'s decoder linear weights to int8 (per output channel, symmetric), in place.

    The weights keep their dtype and hold the dequantised values; returns the model, marked so
    that the kernel table times the int8 kernel for it (:func:`quantization`). Idempotent.
    """
    if quantization(model) == INT8:
        return model
    layers = quantizable(model)
    if not layers:
        raise ParameterError("{} has no linear layers to quantise", "model")
    for m in layers:
        w = m.weight
        if not w.is_floating_point():
            raise ParameterError(f"{{}} holds a {w.dtype} weight; int8 quantisation needs floating-point weights", "model")
        scales = _scales(w)
        q = torch.round(w.float() / scales[:, None]).clamp_(-QMAX, QMAX)
        w.copy_((q * scales[:, None]).to(w.dtype))
        _FORMS[w] = (_key(w), q.to(torch.int8), scales.to(w.dtype))
    setattr(model, _ATTR, INT8)
    return model


def quantization(model: nn.Module) -> str | None:
    """``"int8"`` for a model :func:`quantize_int8` rounded, else None."""
    return getattr(model, _ATTR, None)
