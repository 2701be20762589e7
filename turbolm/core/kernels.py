"""Fast CPU forwards over a few tokens (decoding, tree verification, drafting), chosen by measurement.

Which kernel is fastest for a linear layer over a few rows depends on the CPU, the BLAS, the dtype
and the row count, and no vendor name predicts it: on a 2-core AMD EPYC MKL's fp32 ``F.linear``
costs ~4x more for 4 rows of the default model's lm_head than oneDNN's; on a 2-core Intel Xeon
(AVX-512, AMX) oneDNN's fp32 kernel saves ~25% at 4-16 rows but loses at 1 row, while its bf16
kernel beats ``F.linear`` at every row count. So the choice is measured, once per machine and model.
The candidates (``benchmarks/cpu_forward.py`` compares them with others):

- ``default``: ``F.linear``, bit-identical to plain PyTorch.
- ``packed``: oneDNN's inner product on a weight reordered once into its own ("packed") layout -
  what Inductor's CPU freezing pass emits. float32, and bfloat16 where oneDNN has bf16 kernels.
- ``transposed``: ``x @ W.T`` on a contiguous transposed copy; a candidate for 1 row on
  vocabulary-sized weights (the lm_head, ``TRANSPOSED_MIN_NUMEL`` elements or more).
- ``int8`` / ``int4``: PyTorch's weight-only kernels (``aten._weight_int8pack_mm``,
  ``aten._weight_int4pack_mm_for_cpu``) on the values a weight was rounded to by
  ``core.quantize.quantize`` (``--dtype int8`` / ``int4``); a candidate only for a group holding
  weights quantised that way (int4 in bfloat16 only: its float32 path is a slow reference loop),
  and any other weight runs ``F.linear`` in its place, so it never changes an unquantised weight.

:func:`kernel_table` times them on the model's *own* linear layers: one pass over every distinct
weight (so weights come from memory, as in a real forward) with a random input of ``rows`` rows,
for rows 1, 2, 4, ... 128 (``BUCKETS``), the kernels interleaved, the median of a few repeats, the
lm_head group (vocabulary-sized weights) apart from the other layers, within a time budget (fewer
repeats on a loaded machine, where a pass can take 50x longer). Per group and bucket it keeps
``default`` unless another kernel is faster by more than ``MARGIN`` (5%). A forward over ``r`` rows
takes the choice of the smallest bucket >= ``r``; more than 128 rows (prefill) run ``F.linear``.
The timings are cached under the turbolm cache directory per CPU model, logical CPU count, torch
version and threads, dtype and the set of the model's linear weight shapes (the choice is made
again from them, so a new margin needs no new measurement); timings taken while other processes
kept CPUs busy (``machine.BUSY_CPUS``) are used for that run and not cached; a damaged or
unwritable cache costs a measurement and one warning, never the run.

Sibling layers - the same module's q/k/v projections, a gated MLP's gate/up - read the same input.
Where the table's kernel for a row count can take them as one product (``packed`` on the weights
stacked along the outputs, or the quantised forms joined: ``JOINABLE``), the first of them called
computes all their outputs in one call and the others take theirs (:class:`_Siblings`): 90 of a
decoding step's 211 linear calls go, and each output is bit for bit its own product. Whether that
pays is measured too (:func:`time_joins`: a pass over the sibling groups apart and joined, at each
bucket; :func:`choose_joins`: per kernel, by the average gain over its buckets) and cached with the
timings; on a 2-core AMD EPYC a float32 decoding step took 8-10% less time with them joined.

:func:`optimize_for_small_batches` applies a table to a model in place: ``mode="auto"`` measures
it (or reads it from the cache), ``"on"`` takes the fast kernels at every bucket where one applies
(``packed`` from 2 rows, ``transposed`` for a 1-row lm_head: ``force=True``), or pass ``table``.
Every ``nn.Linear`` whose plan uses a fast kernel becomes a :class:`FastLinear` by swapping the
instance's class (same parameters, state_dict keys, hooks and repr); no modeling code is touched.
The swap is a :class:`~.patches.ModelPatch` (:class:`FastLinearPatch`) that holds the table, so
:func:`restore` puts back exactly the classes it replaced, and it combines with the token pruner
and the layer dropper, in any order. A layer whose bucket says ``default`` calls ``F.linear``;
the others equal ``F.linear`` up to rounding (another summation order: ~1e-7 relative in float32),
the same kind of difference ``F.linear`` itself has between a 1-row and an n-row product.

Only CPU float32 / bfloat16 input and weight of the table's dtype, with no autograd
(inference_mode / no_grad, or frozen weights), in eval mode, takes a fast kernel; GPU, other
dtypes, training, gradients and longer inputs run the plain ``F.linear``.

The derived copies (packed, transposed) are made on first use and kept in a cache keyed weakly by
the weight tensor and checked against its storage and version: tied weights are converted once, a
weight changed in place or moved is converted again, a deep copy that shares the weights
(``truncated_draft``) shares them, and they are freed with the weight or by :func:`restore`. Only
the kinds a table uses are kept (the measurement makes both, then drops the other): at most about
one more copy of the weights in memory. Each ``FastLinear`` also keeps the operands it used (per
kernel, keyed by ``quantize.weight_key``; a dict the patch sets and takes away), so
a decoding step's ~210 linear calls skip the shared caches' (weakly keyed) lookups: ~3 us of Python less per call,
which is ~6% of an int4 token on a 2-core AMD EPYC.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .errors import ParameterError
from .machine import BUSY_CPUS
from .patches import ModelPatch, active, find
from .quantize import INT4, INT8, SCHEMES, kernel_available, quant_form, quantized_product, weight_key

#: rows per forward the table distinguishes; a forward over r rows takes the smallest bucket >= r
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# More rows (prefill) stay on the default kernel: the gain is small and a long prompt's cost is paid once.
MAX_ROWS = BUCKETS[-1]
#: weights of this many elements or more (the lm_head: vocab x hidden) form the ``lm_head`` group
TRANSPOSED_MIN_NUMEL = 1 << 22
#: a fast kernel replaces ``default`` only when it is faster by more than this fraction
MARGIN = 0.05
DEFAULT, PACKED, TRANSPOSED = "default", "packed", "transposed"
KERNELS = (DEFAULT, PACKED, TRANSPOSED, INT8, INT4)
#: the kernels sibling layers can share one product in (``default`` would need a stacked copy of the weights)
JOINABLE = (PACKED, INT8, INT4)
GROUPS = ("layers", "lm_head")
MODES = ("auto", "on", "off")
REPEATS = 5
BUDGET_S = 10.0  # seconds of timing rounds after the warm-up, at most (fewer repeats on a loaded machine)
#: sibling linear layers of one module that read the same input (attention's q/k/v, a gated MLP's
#: gate/up): the first of them called computes the group's outputs as one product (see ``_Siblings``)
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
TABLES_DIR = "kernels"  # under the cache root: one JSON file per table_key
TABLE_VERSION = 2  # 2: with the joined sibling products' timings (joins_ms)

_logger = logging.getLogger(__name__)

# weight tensor -> {"packed" | "transposed": (key, tensor)}; see _derived().
_DERIVED: WeakIdKeyDictionary = WeakIdKeyDictionary()
# weight tensor -> the Plan a patch registered for it, for linear() on a weight passed at run time.
_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def available() -> bool:
    """Whether this PyTorch build has the oneDNN kernels the fast path uses."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def bf16_supported() -> bool:
    """Whether oneDNN has bfloat16 kernels on this CPU (AVX-512 BF16 / AMX, or emulated on AVX-512)."""
    try:
        return available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def candidates(group: str, rows: int, dtype: torch.dtype, scheme: str | None = None) -> tuple[str, ...]:
    """The kernels timed for ``group`` at ``rows`` rows in ``dtype`` (``default`` first); ``scheme``:
    what the group's weights are quantised to, if anything (:func:`quantized_groups`)."""
    if not available() or dtype not in (torch.float32, torch.bfloat16):
        return (DEFAULT,)
    out = [DEFAULT]
    if scheme is not None and kernel_available(scheme) and (scheme != INT4 or dtype is torch.bfloat16):
        out.append(scheme)
    if dtype is torch.float32 or bf16_supported():
        out.append(PACKED)
    if group == "lm_head" and rows == 1:
        out.append(TRANSPOSED)
    return tuple(out)


def group_of(weight: torch.Tensor) -> str:
    return "lm_head" if weight.numel() >= TRANSPOSED_MIN_NUMEL else "layers"


def quantized_groups(groups: dict[str, list]) -> dict[str, str]:
    """``{group: scheme}`` for the groups holding quantised weights (``core.quantize``); a group's
    other weights (an unquantised head of a small model) run ``F.linear`` where the table names
    the scheme's kernel."""
    out = {}
    for g, pairs in groups.items():
        form = next((f for f in (quant_form(w) for w, _ in pairs) if f is not None), None)
        if form is not None:
            out[g] = form.scheme
    return out


# --- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class KernelTable:
    """The kernel per group (``layers``, ``lm_head``) and bucket (``BUCKETS``) for one dtype.

    ``source``: ``measured``, ``cached`` (timings read from the cache), ``on`` (every fast kernel),
    ``off``/``none`` (nothing to choose: no oneDNN, a GPU or another dtype); ``timings_ms``: median
    ms per pass, ``{group: {bucket: {kernel: ms}}}``, for measured and cached tables;
    ``other_cpus_busy``: CPUs other processes kept busy while it was measured."""

    dtype: torch.dtype
    kernels: dict[str, tuple[str, ...]]
    source: str = "measured"
    timings_ms: dict = field(default_factory=dict)
    other_cpus_busy: float | None = None
    #: per bucket, whether sibling layers (``SIBLINGS``) run as one product (``_Siblings``)
    joins: tuple[bool, ...] = (False,) * len(BUCKETS)
    #: median ms per pass over the sibling groups, ``{bucket: {"apart": ms, "joined": ms}}``
    joins_ms: dict = field(default_factory=dict)

    def kernel(self, group: str, rows: int) -> str:
        """The kernel for a forward over ``rows`` rows of a weight of ``group``."""
        i = (rows - 1).bit_length() if rows >= 1 else len(BUCKETS)
        row = self.kernels.get(group, ())
        return row[i] if i < len(row) else DEFAULT

    def uses(self, kernel: str) -> bool:
        return any(kernel in row for row in self.kernels.values())

    @property
    def fast(self) -> bool:
        """Whether any bucket takes a kernel other than ``default``."""
        return any(k != DEFAULT for row in self.kernels.values() for k in row)

    def to_dict(self) -> dict:
        return {
            "dtype": str(self.dtype).replace("torch.", ""),
            "source": self.source,
            "rows": list(BUCKETS),
            "kernels": {g: list(row) for g, row in self.kernels.items()},
            "timings_ms": self.timings_ms,
            "joins": list(self.joins),
            "joins_ms": self.joins_ms,
            "other_cpus_busy": self.other_cpus_busy,
        }


def on_table(dtype: torch.dtype) -> KernelTable:
    """The fast kernels at every bucket where one applies (``mode="on"``, the old ``force``):
    ``packed`` from 2 rows, ``transposed`` for a 1-row lm_head, ``default`` for other 1-row layers."""
    kernels = {}
    for group in GROUPS:
        row = []
        for rows in BUCKETS:
            options = candidates(group, rows, dtype)
            row.append(TRANSPOSED if TRANSPOSED in options else PACKED if PACKED in options and rows > 1 else DEFAULT)
        kernels[group] = tuple(row)
    return KernelTable(dtype, kernels, "on", joins=tuple(k in JOINABLE for k in kernels["layers"]))


def off_table(dtype: torch.dtype, source: str = "off") -> KernelTable:
    return KernelTable(dtype, {g: (DEFAULT,) * len(BUCKETS) for g in GROUPS}, source)


def choose(timings: dict, margin: float = MARGIN) -> dict[str, tuple[str, ...]]:
    """``{group: kernel per bucket}`` from ``{group: {bucket: {kernel: seconds}}}``: the fastest
    kernel, but ``default`` unless the fastest beats it by more than ``margin``."""
    out = {}
    for group, per_bucket in timings.items():
        row = []
        for rows in BUCKETS:
            t = per_bucket[rows]
            best = min(t, key=t.get)
            row.append(best if t[best] < (1 - margin) * t[DEFAULT] else DEFAULT)
        out[group] = tuple(row)
    return out


Timer = Callable[[str, int, str], float]  # (group, rows, kernel) -> seconds for one pass over the group


def time_kernels(groups: dict[str, list], dtype: torch.dtype, repeats: int = REPEATS,
                 timer: Timer | None = None, budget_s: float | None = None) -> dict:
    """``{group: {bucket: {kernel: median seconds}}}`` for one pass over each group's weights
    (``groups``: ``{group: [(weight, bias), ...]}``); every (group, bucket, kernel) is timed once to
    warm up, then ``repeats`` times interleaved. ``budget_s``: fewer repeats where a round takes
    longer than ``budget_s / repeats`` (a loaded machine), down to the warm-up round's own timings
    (the packing included: a bias towards ``default``). ``timer``: another way to time a pass (tests)."""
    timer = timer or _pass_timer(groups, dtype)
    quantised = quantized_groups(groups)
    plan = [(g, rows, k) for g in groups for rows in BUCKETS for k in candidates(g, rows, dtype, quantised.get(g))]
    return _nest(_interleaved(plan, timer, repeats, budget_s))


def time_joins(siblings: list, kernels: tuple[str, ...], dtype: torch.dtype, repeats: int = REPEATS,
               timer: Timer | None = None, budget_s: float | None = None) -> dict:
    """``{bucket: {"apart": s, "joined": s}}``: one pass over every group of sibling layers
    (``linear_siblings``), each layer alone or the group as one product (``_Siblings``), with the
    kernel ``kernels`` gives the bucket, at the buckets where that kernel can join; interleaved as
    :func:`time_kernels`. ``timer(group, rows, how)`` is called with group ``siblings``."""
    timer = timer or _join_timer(siblings, kernels, dtype)
    plan = [("siblings", rows, how) for rows, k in zip(BUCKETS, kernels) if k in JOINABLE for how in ("apart", "joined")]
    return _nest(_interleaved(plan, timer, repeats, budget_s)).get("siblings", {})


def _interleaved(plan: list[tuple], timer: Timer, repeats: int, budget_s: float | None) -> dict:
    """``{key: median seconds}`` of ``timer(*key)`` for every key of ``plan``: once to warm up, then
    ``repeats`` rounds (fewer where a round takes longer than ``budget_s / repeats``)."""
    samples: dict = {key: [] for key in plan}
    with torch.inference_mode():
        start = time.perf_counter()
        warm = {key: timer(*key) for key in plan}
        round_s = time.perf_counter() - start
        if budget_s is not None:
            repeats = min(repeats, int(budget_s / max(round_s, 1e-9)))
        for _ in range(repeats):
            for key in plan:
                samples[key].append(timer(*key))
    return {key: statistics.median(ts or [warm[key]]) for key, ts in samples.items()}


def _nest(medians: dict) -> dict:
    out: dict = {}
    for (g, rows, k), t in medians.items():
        out.setdefault(g, {}).setdefault(rows, {})[k] = t
    return out


def choose_joins(kernels: tuple[str, ...], joins: dict, margin: float = MARGIN) -> tuple[bool, ...]:
    """Per bucket, whether the siblings join (``joins``: :func:`time_joins`'s timings). Decided per
    kernel, for all its buckets at once: a kernel joins where its joined passes took, on average over
    its buckets, less than ``1 - margin`` of the time apart - so a weight's kernel needs either the
    joint operand or its own, never both (memory)."""
    verdict = {}
    for k in set(kernels) & set(JOINABLE):
        ratios = [joins[r]["joined"] / joins[r]["apart"] for r, kk in zip(BUCKETS, kernels) if kk == k and r in joins]
        verdict[k] = bool(ratios) and statistics.mean(ratios) < 1 - margin
    return tuple(verdict.get(k, False) for k in kernels)


def _random_inputs(dtype: torch.dtype) -> Callable[[int, int], torch.Tensor]:
    """``(in_features, rows) -> input``: one seeded random input per shape, made once."""
    inputs: dict = {}
    gen = torch.Generator().manual_seed(0)

    def make(in_features: int, rows: int) -> torch.Tensor:
        if (in_features, rows) not in inputs:
            inputs[in_features, rows] = torch.randn(rows, in_features, generator=gen).to(dtype)
        return inputs[in_features, rows]

    return make


def _pass_timer(groups: dict[str, list], dtype: torch.dtype) -> Timer:
    make = _random_inputs(dtype)

    def timer(group: str, rows: int, kernel: str) -> float:
        pairs = groups[group]
        xs = [make(w.shape[1], rows) for w, _ in pairs]
        start = time.perf_counter()
        for x, (w, b) in zip(xs, pairs):
            if kernel == DEFAULT:
                F.linear(x, w, b)
            else:
                _run(kernel, x, w, b)
        return time.perf_counter() - start

    return timer


def _join_timer(siblings: list, kernels: tuple[str, ...], dtype: torch.dtype) -> Timer:
    groups = [_Siblings(members) for members in siblings]
    make = _random_inputs(dtype)

    def timer(group: str, rows: int, how: str) -> float:
        kernel = kernels[BUCKETS.index(rows)]
        xs = [make(g.members[0].in_features, rows) for g in groups]
        start = time.perf_counter()
        for x, g in zip(xs, groups):
            if how == "joined" and g.product(kernel, x) is not None:
                continue
            for m in g.members:
                _run(kernel, x, m.weight, m.bias)
        return time.perf_counter() - start

    return timer


def linear_siblings(model: nn.Module, weights: Iterable[torch.Tensor] | None = None) -> list[list[nn.Linear]]:
    """The model's groups of sibling layers (``SIBLINGS``: the same module's q/k/v, gate/up): plain
    or fast linear layers of the same input size, dtype and device, with biases on all or none;
    ``weights``: only groups whose weights are all among them."""
    allowed = None if weights is None else {id(w) for w in weights}
    out = []
    for module in model.modules():
        for names in SIBLINGS:
            members = [getattr(module, n, None) for n in names]
            if not all(type(m) in (nn.Linear, FastLinear) for m in members):
                continue
            w0, b0 = members[0].weight, members[0].bias
            if all(m.in_features == members[0].in_features and m.weight.dtype is w0.dtype and m.weight.device == w0.device
                   and (m.bias is None) == (b0 is None) and (allowed is None or id(m.weight) in allowed)
                   for m in members):
                out.append(members)
    return out


def linear_weights(model: nn.Module, extra: Iterable[torch.Tensor] = ()) -> dict[str, list]:
    """``{group: [(weight, bias), ...]}``: every distinct weight of the model's plain linear layers
    (tied weights once) and ``extra`` weights (without bias), grouped by :func:`group_of`."""
    seen, groups = set(), {}
    pairs = [(m.weight, m.bias) for m in model.modules() if type(m) in (nn.Linear, FastLinear)]
    for w, b in pairs + [(w, None) for w in extra]:
        if id(w) not in seen:
            seen.add(id(w))
            groups.setdefault(group_of(w), []).append((w, b))  # the tensors themselves: _DERIVED is keyed by them
    return groups


def table_key(groups: dict[str, list], dtype: torch.dtype) -> str:
    """The cache key of a table: this machine (CPU model, logical CPUs, torch version and threads),
    the dtype and the set of linear weight shapes per group."""
    from .machine import cpu_model

    shapes = sorted({(g, *w.shape) for g, pairs in groups.items() for w, _ in pairs})
    parts = [str(TABLE_VERSION), cpu_model(), str(os.cpu_count()), torch.__version__, str(torch.get_num_threads()),
             str(dtype), repr(shapes)]
    quantised = quantized_groups(groups)
    for scheme in sorted(set(quantised.values())):  # (unquantised models keep the keys they had)
        parts.append(f"{scheme}:{','.join(sorted(g for g, s in quantised.items() if s == scheme))}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _cached_timings(entry: dict, groups: dict, dtype: torch.dtype) -> dict:
    """The timings of a cache entry in seconds, checked (ValueError says what is wrong)."""
    if entry.get("version") != TABLE_VERSION or entry.get("dtype") != str(dtype):
        raise ValueError("another version or dtype")
    stored = entry.get("timings_ms")
    quantised = quantized_groups(groups)
    if not isinstance(stored, dict) or set(stored) != set(groups):
        raise ValueError("timings_ms does not hold this model's groups")
    out = {}
    for g in groups:
        per_bucket = stored[g]
        if not isinstance(per_bucket, dict):
            raise ValueError(f"timings_ms.{g} is not an object")
        out[g] = {}
        for rows in BUCKETS:
            t = per_bucket.get(str(rows))
            want = candidates(g, rows, dtype, quantised.get(g))
            if not isinstance(t, dict) or set(t) != set(want):
                raise ValueError(f"timings_ms.{g}.{rows} does not hold the kernels {', '.join(want)}")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                       for v in t.values()):
                raise ValueError(f"timings_ms.{g}.{rows} holds a value that is not a positive number")
            out[g][rows] = {k: v / 1000 for k, v in t.items()}
    return out


def _cached_joins(entry: dict, kernels: tuple[str, ...]) -> dict | None:
    """The sibling timings of a cache entry in seconds, ``{bucket: {"apart": s, "joined": s}}``, or
    None where they were taken with other kernels than ``kernels`` (ValueError: damaged)."""
    stored = entry.get("joins_ms")
    if not isinstance(stored, dict):
        raise ValueError("joins_ms is not an object")
    out = {}
    for rows, k in zip(BUCKETS, kernels):
        if k not in JOINABLE:
            continue
        t = stored.get(str(rows))
        if t is None or not isinstance(t, dict) or t.get("kernel") != k:
            return None
        if not all(isinstance(t.get(h), (int, float)) and not isinstance(t.get(h), bool) and math.isfinite(t[h])
                   and t[h] > 0 for h in ("apart", "joined")):
            raise ValueError(f"joins_ms.{rows} does not hold positive apart and joined times")
        out[rows] = {"apart": t["apart"] / 1000, "joined": t["joined"] / 1000}
    return out


def _joins_ms(joins: dict, kernels: tuple[str, ...]) -> dict:
    return {str(rows): {"kernel": kernels[BUCKETS.index(rows)], **{h: round(v * 1000, 4) for h, v in t.items()}}
            for rows, t in joins.items()}


def _ms(timings: dict) -> dict:
    return {g: {str(rows): {k: round(s * 1000, 4) for k, s in t.items()} for rows, t in per.items()}
            for g, per in timings.items()}


def kernel_table(model: nn.Module, dtype: torch.dtype | None = None, *, extra_weights: Iterable[torch.Tensor] = (),
                 repeats: int = REPEATS, budget_s: float | None = BUDGET_S, margin: float = MARGIN,
                 timer: Timer | None = None, cache: bool = True, busy_cpus: float | None = BUSY_CPUS,
                 log: Callable[[str], None] | None = None, join: bool = True) -> KernelTable:
    """The measured kernel table for ``model``'s linear layers (and ``extra_weights``, e.g. a
    draft's lm_head rows) in ``dtype`` (default: the model's): read from the cache, else timed
    (:func:`time_kernels` within ``budget_s``; one progress line to ``log``) and cached unless
    other processes kept more than ``busy_cpus`` CPUs busy meanwhile (None: cached all the same).
    Only CPU weights count; without any, or without a fast kernel for the dtype, nothing is timed
    (source ``none``).
    ``cache=False``: neither read nor write it. A cache that cannot be read or written, or holds a
    damaged entry, costs a measurement and one warning. ``join``: also time the sibling layers
    (``linear_siblings``) apart and as one product (:func:`time_joins`) and join them where that pays
    (:func:`choose_joins`); ``timer`` then also times those passes (group ``siblings``)."""
    from .io import cache_root, read_cache_json, write_cache_json
    from .machine import OtherLoad, too_busy

    extra_weights = list(extra_weights)
    groups = {g: [(w, b) for w, b in pairs if w.device.type == "cpu"]
              for g, pairs in linear_weights(model, extra_weights).items()}
    groups = {g: pairs for g, pairs in groups.items() if pairs}
    if dtype is None:
        dtype = next((pairs[0][0].dtype for pairs in groups.values()), torch.float32)
    groups = {g: [(w, b) for w, b in pairs if w.dtype is dtype] for g, pairs in groups.items()}
    groups = {g: pairs for g, pairs in groups.items() if pairs}
    quantised = quantized_groups(groups)
    if not groups or all(candidates(g, rows, dtype, quantised.get(g)) == (DEFAULT,) for g in groups for rows in BUCKETS):
        return off_table(dtype, "none")

    path = cache_root() / TABLES_DIR / f"{table_key(groups, dtype)}.json" if cache else None
    layer_weights = [w for w, _ in groups.get("layers", [])]
    siblings = linear_siblings(model, layer_weights) if join else []
    problems = []
    timings = joins = entry = None
    if path is not None:
        entry, problem = read_cache_json(path)
        if problem:
            problems.append(problem)
        elif entry:
            try:
                timings = _cached_timings(entry, groups, dtype)
                if siblings and "layers" in groups:
                    joins = _cached_joins(entry, choose(timings, margin)["layers"])  # the choice its timings make
            except (ValueError, TypeError, AttributeError) as e:
                problems.append(f"{path} is damaged ({e}), not used")
                timings = joins = None
    source, busy = "cached", None
    measure_joins = bool(siblings) and "layers" in groups and joins is None
    if timings is None or measure_joins:
        weight_mb = sum(w.numel() * w.element_size() for pairs in groups.values() for w, _ in pairs) / 2**20
        # Lines worth reading only when the measurement takes a while (seconds; a tiny model: milliseconds).
        say = log or (_logger.warning if weight_mb >= 32 else _logger.info)
        say(f"turbolm: timing the CPU kernels on this model's {sum(map(len, groups.values()))} linear layers "
            f"({str(dtype).replace('torch.', '')}; once per machine and model) ...")
        with OtherLoad() as load:
            if timings is None:
                timings = time_kernels(groups, dtype, repeats, timer, budget_s)
            kernels = choose(timings, margin)
            if measure_joins:
                joins = time_joins(siblings, kernels["layers"], dtype, repeats, timer, budget_s)
        source, busy = "measured", load.cpus
        if path is not None:
            if too_busy(load.cpus, busy_cpus):
                say(f"turbolm: kernel timings used for this run, not cached: other processes kept {busy:.1f} CPUs "
                    "busy meanwhile")
            else:
                record = {"version": TABLE_VERSION, "dtype": str(dtype), "timings_ms": _ms(timings), "other_cpus_busy": busy}
                if joins is not None:
                    record["joins_ms"] = _joins_ms(joins, kernels["layers"])
                problem = write_cache_json(path, record)
                if problem:
                    problems.append(f"{problem}; the kernel table is used for this run only (set TURBOLM_CACHE "
                                    "to a writable directory to keep it)")
    if problems:
        _logger.warning("turbolm: warning: %s", "; ".join(problems))
    kernels = choose(timings, margin)
    joined = choose_joins(kernels["layers"], joins or {}, margin) if "layers" in kernels else (False,) * len(BUCKETS)
    table = KernelTable(dtype, kernels, source, _ms(timings), busy, joined,
                        _joins_ms(joins, kernels["layers"]) if joins else {})
    for g, pairs in groups.items():  # keep only the derived copies the table uses (joined siblings use a joint one)
        for kind in (PACKED, TRANSPOSED):
            if kind not in table.kernels.get(g, ()):
                for w, _ in pairs:
                    _DERIVED.get(w, {}).pop(kind, None)
    if PACKED in table.kernels.get("layers", ()) and table.joins[table.kernels["layers"].index(PACKED)]:
        for members in siblings:
            for m in members:
                _DERIVED.get(m.weight, {}).pop(PACKED, None)
    return table


# --- the kernels --------------------------------------------------------------------------------


def _derived(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A copy of ``weight`` (out, in), made once per weight value: ``packed`` (oneDNN's
    layout) or ``transposed`` ((in, out), contiguous)."""
    key = weight_key(weight)
    copies = _DERIVED.get(weight)
    if copies is None:
        copies = _DERIVED[weight] = {}
    hit = copies.get(kind)
    if hit is not None and hit[0] == key:
        return hit[1]
    w = weight.detach()
    with torch.no_grad():
        derived = torch.ops.mkldnn._reorder_linear_weight(w, None) if kind == PACKED else w.t().contiguous()
    copies[kind] = (key, derived)
    return derived


def _operand(kernel: str, weight: torch.Tensor):
    """What ``kernel`` multiplies by in place of ``weight``: its quantised form (None where the
    weight is no longer the one quantised), or its derived copy."""
    return quant_form(weight) if kernel in SCHEMES else _derived(weight, kernel)


def _run(kernel: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         operands: dict | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` by ``kernel``. ``operands`` (a ``FastLinear``'s own): kernel ->
    (the weight's key, its operand), so that a layer's call skips the shared caches' lookups."""
    if operands is None:
        operand = _operand(kernel, weight)
    else:
        key = weight_key(weight)
        hit = operands.get(kernel)
        if hit is None or hit[0] != key:
            hit = operands[kernel] = (key, _operand(kernel, weight))
        operand = hit[1]
    if kernel in SCHEMES and (operand is None or operand.scheme != kernel or operand.dtype is not x.dtype):
        return F.linear(x, weight, bias)  # changed since it was quantised: as it is
    return _product(kernel, x, operand, bias)


def _product(kernel: str, x: torch.Tensor, operand, bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` times the weight ``operand`` stands for (its packed or transposed copy, or its quantised
    form), plus ``bias``, by ``kernel``."""
    if kernel in SCHEMES:
        y = quantized_product(x.reshape(-1, x.shape[-1]).contiguous(), operand)
    elif kernel == TRANSPOSED:
        y = torch.mm(x.reshape(-1, x.shape[-1]), operand)
    else:
        return torch.ops.mkldnn._linear_pointwise(x, operand, bias, "none", [], "")
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], y.shape[-1])


class Plan(NamedTuple):
    """What one weight runs: its table's dtype, the row limit and the kernel per bucket."""

    dtype: torch.dtype
    max_rows: int
    kernels: tuple[str, ...]
    joins: tuple[bool, ...] = ()  # per bucket: computed with its siblings (``_Siblings``)

    @property
    def fast(self) -> bool:
        """Whether some row count up to ``max_rows`` takes a kernel other than ``default``."""
        lowest = (1,) + tuple(b // 2 + 1 for b in BUCKETS[1:])  # the fewest rows each bucket takes
        return any(k != DEFAULT and low <= self.max_rows for k, low in zip(self.kernels, lowest))


def plan_for(table: KernelTable, weight: torch.Tensor, max_rows: int = MAX_ROWS) -> Plan:
    group = group_of(weight)
    return Plan(table.dtype, max_rows, table.kernels.get(group, (DEFAULT,) * len(BUCKETS)),
                table.joins if group == "layers" else ())


def _kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: Plan) -> str:
    """The kernel ``plan`` gives ``x``'s row count, or ``default`` where no fast kernel may run."""
    dtype = plan.dtype
    if x.dtype is not dtype or weight.dtype is not dtype:
        return DEFAULT
    if not (x.is_cpu and weight.is_cpu) or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        return DEFAULT
    if bias is not None and (bias.dtype is not dtype or not bias.is_cpu):
        return DEFAULT
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return DEFAULT
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows < 1 or rows > plan.max_rows:
        return DEFAULT
    i = (rows - 1).bit_length()
    return plan.kernels[i] if i < len(plan.kernels) else DEFAULT


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           max_rows: int = MAX_ROWS, force: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the kernel a patch chose for ``weight`` (see
    :func:`optimize_for_small_batches`'s ``extra_weights``), or with ``force`` the ``on`` table's;
    with the same eligibility rules as ``FastLinear``. Any other weight runs ``F.linear``.

    For a weight passed in at run time rather than held by an ``nn.Linear``: the target
    lm_head that a feature-level draft scores its tree nodes with, e.g.
    ``linear(hidden, draft.head_weight(lm_head_weight))`` in place of ``DraftModel.logits``.
    A weight already converted for the target's own ``FastLinear`` lm_head is reused.
    """
    if force:
        plan = plan_for(on_table(weight.dtype), weight, max_rows) if available() else None
    else:
        plan = _PLANS.get(weight)
    kernel = _kernel(x, weight, bias, plan) if plan is not None else DEFAULT
    if kernel == DEFAULT:
        return F.linear(x, weight, bias)
    return _run(kernel, x, weight, bias)


class _Operands(dict):
    """A ``FastLinear``'s operands by kernel (see ``_run``). A deep copy (``truncated_draft``'s copy
    that shares the weights) starts empty and refills from the shared caches: the packed weights
    are opaque tensors that cannot be copied, and sharing them costs no memory."""

    def __deepcopy__(self, memo):
        return _Operands()


class _Siblings:
    """Linear layers of one module that read the same input (``SIBLINGS``), computed as one product.

    The first member called with an input computes every member's output at once - one kernel call
    on the members' weights stacked along the outputs (its packed copy, or the quantised forms
    joined) - returns its own part and keeps the others' for that very input tensor; a member then
    called with the same tensor (identity, and its version where it has one) takes its part, any
    other input is computed as before. Rows are independent in every kernel here, so each output
    equals the member's own product with the same kernel (tested bit for bit); what changes is the
    number of calls: on a 2-core AMD EPYC 90 of a decoding step's 211 linear calls go. Only the
    first-named member (q_proj, gate_proj) starts a joint product, and a later member that misses
    (its input is another tensor: a module that feeds its siblings differently) turns the joining
    off for the group, so nothing is computed twice more than once. ``default`` (F.linear, which
    would need a stacked copy of the weights) and ``transposed`` never join."""

    def __init__(self, members: list[nn.Linear], sizes: list[int] | None = None):
        self.members = members
        self.sizes = sizes or [m.out_features for m in members]
        self.operands: dict = {}  # kernel -> (the members' weight keys, operand, bias); operand None: cannot join
        self.pending = None  # (input, its version, {member: output}) of the last joint product
        self.on = True

    def __deepcopy__(self, memo):
        """A model's deep copy (sharing the weights or not) gets its own group of the copied members,
        empty, the same one wherever the group is referred to (the members, the patch's record)."""
        twin = memo[id(self)] = _Siblings.__new__(_Siblings)  # first: the members' copies refer to it
        twin.__init__(copy.deepcopy(self.members, memo), list(self.sizes))
        return twin

    def _operand(self, kernel: str):
        """The joint operand for ``kernel`` (None where the members cannot join: a weight no longer
        quantised, mixed biases), made once per value of the members' weights."""
        key = tuple(weight_key(m.weight) for m in self.members)
        hit = self.operands.get(kernel)
        if hit is None or hit[0] != key:
            hit = self.operands[kernel] = (key, *self._make(kernel))
        return None if hit[1] is None else hit[1:]

    @torch.no_grad()
    def _make(self, kernel: str) -> tuple:
        bias = None if self.members[0].bias is None else torch.cat([m.bias.detach() for m in self.members])
        if kernel == PACKED:
            return torch.ops.mkldnn._reorder_linear_weight(torch.cat([m.weight.detach() for m in self.members]), None), bias
        forms = [quant_form(m.weight) for m in self.members]
        if any(f is None or f.scheme != kernel or f.dtype is not forms[0].dtype for f in forms):
            return None, None
        joint = forms[0]._replace(args=_join_forms(kernel, forms), nbytes=sum(f.nbytes for f in forms))
        # A packed int4 layout joins only where each part fills whole blocks of the kernel's: a probe
        # product must equal the parts' own, bit for bit, or the members stay apart.
        probe = torch.randn(2, self.members[0].in_features, generator=torch.Generator().manual_seed(0)).to(forms[0].dtype)
        parts = torch.cat([quantized_product(probe, f) for f in forms], -1)
        return (joint, bias) if torch.equal(quantized_product(probe, joint), parts) else (None, None)

    def product(self, kernel: str, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every member's output for ``x`` by one ``kernel`` call (None where they cannot join)."""
        joint = self._operand(kernel) if kernel in JOINABLE else None
        if joint is None:
            return None
        operand, bias = joint
        if kernel in SCHEMES and operand.dtype is not x.dtype:
            return None
        return [p.contiguous() for p in _product(kernel, x, operand, bias).split(self.sizes, -1)]

    def output(self, member: nn.Linear, x: torch.Tensor, kernel: str) -> torch.Tensor | None:
        """``member``'s output for ``x``: kept from the joint product, or by a new joint product; None
        where it is to be computed alone (its plan does not join at this row count, or cannot)."""
        pending = self.pending
        if pending is not None and pending[0] is x and pending[1] == _version(x):
            out = pending[2].pop(member, None)
            if out is not None:
                return out
        if member is not self.members[0]:
            if pending is not None and member in pending[2]:  # its input is not its leader's: stop joining
                self.on = False
            return None
        joins = member.fast_plan.joins
        i = (x.numel() // x.shape[-1] - 1).bit_length()
        if not self.on or i >= len(joins) or not joins[i]:
            return None
        parts = self.product(kernel, x)
        if parts is None:
            return None
        self.pending = (x, _version(x), dict(zip(self.members[1:], parts[1:])))
        return parts[0]


def _version(x: torch.Tensor) -> int:
    return -1 if x.is_inference() else x._version


def _join_forms(kernel: str, forms: list) -> tuple:
    """The kernel arguments of quantised forms stacked along the outputs (int8: values and scales;
    int4: the packed values and the (groups, out, 2) scales and zeros)."""
    if kernel == INT8:
        return torch.cat([f.args[0] for f in forms]), torch.cat([f.args[1] for f in forms])
    return torch.cat([f.args[0] for f in forms]), forms[0].args[1], torch.cat([f.args[2] for f in forms], dim=1)


class FastLinear(nn.Linear):
    """An ``nn.Linear`` whose forward takes the kernel its ``fast_plan`` gives the row count (see
    the module doc). Made by :func:`optimize_for_small_batches` from an existing ``nn.Linear``
    (class swap); ``fast_plan`` is set per instance there."""

    fast_plan = Plan(torch.float32, 0, ())
    #: kernel -> (weight key, operand), filled on use (see ``_run``); a dict per instance, set by the patch
    fast_operands: dict | None = None
    #: the siblings it is computed with (``_Siblings``), set by the patch
    fast_siblings: _Siblings | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = DEFAULT if self.training else _kernel(x, self.weight, self.bias, self.fast_plan)
        if kernel == DEFAULT:
            return F.linear(x, self.weight, self.bias)
        if self.fast_siblings is not None:
            y = self.fast_siblings.output(self, x, kernel)
            if y is not None:
                return y
        return _run(kernel, x, self.weight, self.bias, self.fast_operands)


class FastLinearPatch(ModelPatch):
    """The class swap behind :func:`optimize_for_small_batches`: every plain ``nn.Linear`` of the
    model whose plan (from ``table``) uses a fast kernel becomes a :class:`FastLinear`; ``mode``
    records how the table was made (``auto`` or ``on``), for drafts that follow the model
    (:func:`optimize_like`). ``extra_weights``: weights used through :func:`linear`, given the
    table's plan there."""

    patches = frozenset({"linear_class"})

    def __init__(self, model: nn.Module, table: KernelTable, max_rows: int = MAX_ROWS, mode: str = "auto",
                 extra_weights: Iterable[torch.Tensor] = (), join: bool = True):
        super().__init__(model)
        self.table, self.max_rows, self.mode, self.join = table, max_rows, mode, join
        self.extra_weights = list(extra_weights)
        self.linears: list[nn.Linear] = []
        self._registered: list[tuple[torch.Tensor, Plan]] = []

    def _patch(self) -> None:
        mine = {id(m) for m in self.linears}
        for module in self.model.modules():
            if id(module) not in mine and type(module) is not nn.Linear:
                continue
            plan = plan_for(self.table, module.weight, self.max_rows)
            if id(module) not in mine:  # a plain nn.Linear: swapped only where a fast kernel may run
                if module.weight.dtype is not self.table.dtype or not plan.fast:
                    continue
                self.replace(module, "__class__", FastLinear)
                self.linears.append(module)
            self.replace(module, "fast_plan", plan)
            self.replace(module, "fast_operands", _Operands())
            self._register(module.weight, plan)
        for module in self.linears:  # groups are formed again below (a new table can change the plans)
            if module.fast_siblings is not None:
                self.replace(module, "fast_siblings", None)
        if self.join and any(self.table.joins):
            for members in linear_siblings(self.model):
                if all(type(m) is FastLinear and m.fast_plan == members[0].fast_plan for m in members):
                    siblings = _Siblings(members)
                    for m in members:
                        self.replace(m, "fast_siblings", siblings)
        for w in self.extra_weights:
            self._register(w, plan_for(self.table, w, self.max_rows))

    def _register(self, weight: torch.Tensor, plan: Plan) -> None:
        if weight not in _PLANS:  # never take over another patch's weight (a shared lm_head)
            _PLANS[weight] = plan
            self._registered.append((weight, plan))

    def update(self, table: KernelTable, max_rows: int, extra_weights: Iterable[torch.Tensor] = ()) -> None:
        """A new table and ``max_rows`` for every layer, and the swap for plain ``nn.Linear`` added since."""
        self.table, self.max_rows = table, max_rows
        self.extra_weights += [w for w in extra_weights if not any(w is e for e in self.extra_weights)]
        self._unregister()
        self._patch()

    def _unregister(self) -> None:
        for weight, plan in self._registered:
            if _PLANS.get(weight) is plan:
                del _PLANS[weight]
        self._registered = []

    def detach(self) -> None:
        linears = self.linears if self.attached else []
        super().detach()
        for module in linears:
            _DERIVED.pop(module.weight, None)
        for w in self.extra_weights:
            _DERIVED.pop(w, None)
        self._unregister()
        self.linears = []


def optimize_for_small_batches(model: nn.Module, max_rows: int = MAX_ROWS, force: bool = False, *,
                               mode: str | None = None, table: KernelTable | None = None,
                               extra_weights: Iterable[torch.Tensor] = (), join: bool = True, **measure) -> nn.Module:
    """Switch the model's plain ``nn.Linear`` layers to the kernels of a table, in place; return it.

    ``mode="auto"`` (the default): the table :func:`kernel_table` measures (or reads from the
    cache; ``measure`` goes to it: ``repeats``, ``timer``, ``cache``, ``log``); ``"on"`` (or
    ``force=True``): every fast kernel (:func:`on_table`); ``table``: that one. Layers whose plan
    is ``default`` at every bucket up to ``max_rows`` stay plain ``nn.Linear``. ``extra_weights``:
    weights used through :func:`linear` (a draft's lm_head rows), timed and planned with the layers.
    ``join``: compute sibling layers that read the same input (``SIBLINGS``: q/k/v, gate/up) as one
    product where their kernel allows (``_Siblings``); False keeps one call per layer.

    Idempotent (a second call updates ``max_rows`` and the table, reusing the attached table for the
    same mode, and swaps any ``nn.Linear`` added since) and undone by :func:`restore`.
    Parameters, state_dict keys, tied weights and devices are unchanged; subclasses of
    ``nn.Linear`` (LoRA, quantised layers) keep their own forward. Weights are converted on a
    layer's first fast call (or by the measurement), and a GPU model costs no extra memory.
    Without oneDNN in the PyTorch build it changes nothing, even with ``force``.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    mode = "on" if force else (mode or "auto")
    if mode not in ("auto", "on"):
        raise ParameterError(f"{{}} must be auto or on here, got {mode!r}", "mode")
    if not available():
        return model
    extra_weights = list(extra_weights)
    patch = find(model, FastLinearPatch)
    if table is None and patch is not None and patch.mode == mode and not extra_weights:
        table = patch.table
    if table is None:
        p = next(model.parameters(), None)
        dtype = p.dtype if p is not None else torch.float32
        if mode == "on":
            table = on_table(dtype)
        else:
            table = kernel_table(model, dtype, extra_weights=extra_weights, join=join, **measure)
    if patch is None:
        FastLinearPatch(model, table, max_rows, mode, extra_weights, join).attach()
    else:
        patch.mode, patch.join = mode, join
        patch.update(table, max_rows, extra_weights)
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


def table_of(model: nn.Module) -> KernelTable | None:
    """The kernel table applied to ``model`` (None where :func:`optimize_for_small_batches` was not called)."""
    patch = find(model, FastLinearPatch)
    return patch.table if patch is not None else None


def fast_cpu_mode(model: nn.Module) -> str:
    """How ``model``'s kernels were chosen: ``auto``, ``on`` or ``off`` (never optimized)."""
    patch = find(model, FastLinearPatch)
    return patch.mode if patch is not None else "off"


def optimize_like(draft: nn.Module, target: nn.Module, extra_weights: Iterable[torch.Tensor] = ()) -> nn.Module:
    """Give a draft model the kernel treatment its target got (:func:`fast_cpu_mode`): ``auto``
    measures the draft's own shapes (and ``extra_weights``), ``on`` takes every fast kernel."""
    mode = fast_cpu_mode(target)
    if mode != "off":
        patch = find(target, FastLinearPatch)
        optimize_for_small_batches(draft, patch.max_rows, mode=mode, extra_weights=extra_weights)
    return draft


def apply_fast_cpu(model: nn.Module, mode: str = "auto") -> bool:
    """``fast_cpu="auto"`` gives a CPU float32 / bfloat16 model the kernels measured fastest on
    this machine (:func:`kernel_table`), ``"on"`` every fast kernel, ``"off"`` leaves it as it
    is. Returns whether any layer runs a fast kernel."""
    if mode not in MODES:
        raise ParameterError(f"{{}} must be auto, on or off, got {mode!r}", "fast_cpu")
    p = next(model.parameters(), None)
    if mode == "off" or p is None or p.device.type != "cpu" or p.dtype not in (torch.float32, torch.bfloat16):
        return False
    optimize_for_small_batches(model, mode=mode)
    return is_optimized(model)
