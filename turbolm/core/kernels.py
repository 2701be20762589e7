"""Fast CPU forwards over a few tokens (decoding, tree verification, drafting).

PyTorch's fp32 ``F.linear`` on the CPU goes to MKL, which handles a few rows badly on
non-Intel processors (on the 2-core AMD EPYC this was measured on, the default model's
lm_head costs ~4x more for 4 rows than the kernel below; on an Intel Xeon MKL is fine and
the fast path gains nothing). There, two kernels do better, measured by
``benchmarks/cpu_forward.py``:

- 2..``max_rows`` rows: oneDNN's inner product on a weight reordered once into its own
  ("packed") layout - what Inductor's CPU freezing pass emits. About 2x less time per
  layer at 2..32 rows and never slower than ``F.linear`` up to 1024 rows.
- 1 row, vocabulary-sized weights only (the lm_head): ``x @ W.T`` on a contiguous
  transposed copy reads the weight about twice as fast as ``F.linear``'s gemv; for the
  small layers MKL's gemv is already as fast as anything.

:func:`optimize_for_small_batches` switches every ``nn.Linear`` of a model to
:class:`FastLinear` in place, by swapping the instance's class (same parameters,
state_dict keys, hooks and repr); no modeling code is touched. The swap is a
:class:`~.patches.ModelPatch` (:class:`FastLinearPatch`) registered on the model, so
:func:`restore` puts back exactly the classes it replaced, and it combines with the token
pruner and the layer dropper, in any order. Results equal
``F.linear``'s up to float32 rounding (another summation order, ~1e-7 relative), the same
kind of difference ``F.linear`` itself has between a 1-row and an n-row product.

Only CPU float32 input and weight, with no autograd (inference_mode / no_grad, or frozen
weights), in eval mode, takes a fast kernel; GPU, bf16/fp16, training, gradients and
longer inputs (prefill) run the plain ``F.linear``.

The derived copies (packed, transposed) are made on first use and kept in a cache keyed
weakly by the weight tensor and checked against its storage and version: tied weights
are converted once, a weight changed in place or moved is converted again, a deep copy
that shares the weights (``truncated_draft``) shares them, and they are freed with the
weight or by :func:`restore`. They cost about one more copy of the weights in memory.
"""

from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .errors import ParameterError
from .machine import cpuinfo_field
from .patches import ModelPatch, active, find

# oneDNN wins from 2 rows on and was not slower up to 1024; the cap keeps prefills on the
# default kernel, where the gain is small and a long prompt's cost is paid once.
MAX_ROWS = 128
# From this many weight elements (the lm_head: vocab x hidden) a single row uses the transposed copy.
TRANSPOSED_MIN_NUMEL = 1 << 22

# weight tensor -> {"packed" | "transposed": (key, tensor)}; see _derived().
_DERIVED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def available() -> bool:
    """Whether this PyTorch build has the oneDNN kernels the fast path uses."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``, ...), or "" if unknown."""
    return cpuinfo_field("vendor_id")


def helps_here() -> bool:
    """Whether the fast path is expected to pay on this machine: x86 with MKL as PyTorch's
    BLAS on a CPU that is not Intel's (MKL's generic kernels there are the slow part)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return available() and x86 and torch.backends.mkl.is_available() and cpu_vendor() not in ("", "GenuineIntel")


def _derived(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A copy of ``weight`` (out, in), made once per weight value: ``packed`` (oneDNN's
    layout) or ``transposed`` ((in, out), contiguous)."""
    # Inference tensors (made under torch.inference_mode, e.g. a draft's gathered lm_head rows)
    # carry no version counter; they are never updated in place by our code.
    version = -1 if weight.is_inference() else weight._version
    key = (weight.data_ptr(), version, weight.shape, weight.dtype, weight.device)
    copies = _DERIVED.get(weight)
    if copies is None:
        copies = _DERIVED[weight] = {}
    hit = copies.get(kind)
    if hit is not None and hit[0] == key:
        return hit[1]
    w = weight.detach()
    with torch.no_grad():
        derived = torch.ops.mkldnn._reorder_linear_weight(w, None) if kind == "packed" else w.t().contiguous()
    copies[kind] = (key, derived)
    return derived


def _fast_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int) -> int:
    """How many rows ``x`` holds if a fast kernel should take them, else 0 (plain F.linear)."""
    if x.dtype is not torch.float32 or weight.dtype is not torch.float32:
        return 0
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        return 0
    if bias is not None and (bias.dtype is not torch.float32 or bias.device.type != "cpu"):
        return 0
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return 0
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows == 1:
        return 1 if weight.numel() >= TRANSPOSED_MIN_NUMEL else 0
    return rows if rows <= max_rows else 0


def _fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    if rows == 1:
        y = torch.mm(x.reshape(1, -1), _derived(weight, "transposed"))
        if bias is not None:
            y += bias
        return y.view(*x.shape[:-1], weight.shape[0])
    return torch.ops.mkldnn._linear_pointwise(x, _derived(weight, "packed"), bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           max_rows: int = MAX_ROWS, force: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through a fast kernel where one is faster (where
    :func:`helps_here`, unless ``force``; with the same eligibility rules as ``FastLinear``).

    For a weight passed in at run time rather than held by an ``nn.Linear``: the target
    lm_head that a feature-level draft scores its tree nodes with, e.g.
    ``linear(hidden, draft.head_weight(lm_head_weight))`` in place of ``DraftModel.logits``.
    A weight already converted for the target's own ``FastLinear`` lm_head is reused.
    """
    rows = _fast_rows(x, weight, bias, max_rows) if (helps_here() if not force else available()) else 0
    if not rows:
        return F.linear(x, weight, bias)
    return _fast_linear(x, weight, bias, rows)


class FastLinear(nn.Linear):
    """An ``nn.Linear`` whose forward takes a fast kernel for few rows (see the module doc).

    Made by :func:`optimize_for_small_batches` from an existing ``nn.Linear`` (class swap);
    ``fast_max_rows`` is set per instance there.
    """

    fast_max_rows = MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = 0 if self.training else _fast_rows(x, self.weight, self.bias, self.fast_max_rows)
        if not rows:
            return F.linear(x, self.weight, self.bias)
        return _fast_linear(x, self.weight, self.bias, rows)


class FastLinearPatch(ModelPatch):
    """The class swap behind :func:`optimize_for_small_batches`: every plain ``nn.Linear`` of
    the model becomes a :class:`FastLinear` with its own ``fast_max_rows``."""

    patches = frozenset({"linear_class"})

    def __init__(self, model: nn.Module, max_rows: int = MAX_ROWS):
        super().__init__(model)
        self.max_rows = max_rows
        self.linears: list[nn.Linear] = []

    def _patch(self) -> None:
        for module in self.model.modules():
            if type(module) is nn.Linear:
                self.replace(module, "__class__", FastLinear)
                self.replace(module, "fast_max_rows", self.max_rows)
                self.linears.append(module)

    def update(self, max_rows: int) -> None:
        """A new ``max_rows`` for every layer, and the swap for plain ``nn.Linear`` added since."""
        self.max_rows = max_rows
        for module in self.linears:
            self.replace(module, "fast_max_rows", max_rows)
        self._patch()

    def detach(self) -> None:
        linears = self.linears if self.attached else []
        super().detach()
        for module in linears:
            _DERIVED.pop(module.weight, None)
        self.linears = []


def optimize_for_small_batches(model: nn.Module, max_rows: int = MAX_ROWS, force: bool = False) -> nn.Module:
    """Switch every plain ``nn.Linear`` in ``model`` to :class:`FastLinear`, in place; return it.

    Only where :func:`helps_here` (else the model is returned unchanged), unless ``force``.

    Idempotent (a second call updates ``max_rows`` and swaps any ``nn.Linear`` added since)
    and undone by :func:`restore`.
    Parameters, state_dict keys, tied weights and devices are unchanged; subclasses of
    ``nn.Linear`` (LoRA, quantised layers) keep their own forward. Weights are converted on a
    layer's first fast call, so this call is instant and a GPU model costs no extra memory.
    Without oneDNN in the PyTorch build it changes nothing, even with ``force``.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if not available() or not (force or helps_here()):
        return model
    patch = find(model, FastLinearPatch)
    if patch is None:
        FastLinearPatch(model, max_rows).attach()
    else:
        patch.update(max_rows)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`optimize_for_small_batches` on ``model`` and on any of its submodules: plain
    ``nn.Linear`` again, derived copies freed."""
    for module in list(model.modules()):
        for patch in active(module):
            if isinstance(patch, FastLinearPatch):
                patch.detach()
    return model


def is_optimized(model: nn.Module) -> bool:
    """True if any linear layer of ``model`` is on the fast path."""
    return any(type(m) is FastLinear for m in model.modules())


def apply_fast_cpu(model: nn.Module, mode: str = "auto") -> bool:
    """``fast_cpu="auto"`` switches a CPU float32 model to the fast path where :func:`helps_here`;
    ``"off"`` leaves it as it is. Returns whether the fast path is on."""
    if mode not in ("auto", "off"):
        raise ParameterError(f"{{}} must be auto or off, got {mode!r}", "fast_cpu")
    p = next(model.parameters(), None)
    if mode == "off" or p is None or p.device.type != "cpu" or p.dtype != torch.float32:
        return False
    optimize_for_small_batches(model)
    return is_optimized(model)
