"""The one place that turns a plain description of a pruned model into something attachable:
``build_pruned(model, tokenizer, PrunerSpec(...))`` gives an FTP pruner checkpoint, a token router
without training (static / random), or a layer-pruning baseline (ShortGPT, BlockPruner). Used by
``turbolm prune generate|bench``, ``turbolm eval`` and the pruning report, so every method is built
the same way."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import ParameterError
from ..core.io import cache_root, read_cache_json, write_cache_json
from ..core.models import model_identity

log = logging.getLogger(__name__)

METHODS = ("ftp", "static", "random", "shortgpt", "blockpruner")
TOKEN_METHODS = ("ftp", "static", "random")  # per-token routers; the others remove layers for every token
DEFAULT_CALIBRATION = Path("../shared/data/alpaca/alpaca_5000.json")
BLOCKPRUNER_CHUNKS = 2


@dataclass(frozen=True)
class PrunerSpec:
    """Which pruned model. ``method``: ftp (a trained pruner ``checkpoint``; ``router`` swaps in
    another router kind on its schedule, ``dense_kv`` overrides its K/V semantics), static or
    random (token routers without training on ``schedule`` (a search or pruner file) or a uniform
    ``sparsity``), shortgpt or blockpruner (layers / blocks removed to ``sparsity``, chosen on
    ``calibration_data``, Alpaca or ShareGPT rows; cached per model). ``prefill_only`` (token
    routers): only the prompt skips tokens (with dense K/V); everything decoded after it runs the
    dense model, so any decoding method - vanilla or speculative - can follow a pruned prefill."""

    method: str = "ftp"
    checkpoint: str | None = None
    router: str | None = None
    sparsity: float | None = None
    schedule: str | None = None
    dense_kv: bool = False
    prefill_only: bool = False
    calibration_data: str | None = None
    seed: int = 0

    def check(self) -> PrunerSpec:
        """Raise :class:`ParameterError` for a spec that cannot be built; return it otherwise."""
        if self.method not in METHODS:
            raise ParameterError(f"{{}} must be one of {', '.join(METHODS)}, got {self.method!r}", "method")
        if self.checkpoint and self.method != "ftp":
            raise ParameterError("give {} or {}, not both", "checkpoint", "method")
        if self.method == "ftp" and not self.checkpoint:
            raise ParameterError("give {} CKPT, or {} static|random with {} S (or {} FILE)", "checkpoint", "method",
                                 "sparsity", "schedule")
        if self.router is not None and self.method != "ftp":
            raise ParameterError("{} replaces the router of a pruner {}", "router", "checkpoint")
        if self.method in ("static", "random") and self.schedule is None and self.sparsity is None:
            raise ParameterError(f"{{}} {self.method} needs {{}} S (uniform) or {{}} FILE", "method", "sparsity",
                                 "schedule")
        if self.method in ("shortgpt", "blockpruner") and (self.sparsity is None or not 0 < self.sparsity < 1):
            raise ParameterError(f"{{}} {self.method} needs {{}} S in (0, 1)", "method", "sparsity")
        for name in ("dense_kv", "prefill_only"):
            if getattr(self, name) and self.method not in TOKEN_METHODS:
                raise ParameterError(f"{{}} is for token routers; {self.method} removes layers for every token", name)
        if self.sparsity is not None and not 0 <= self.sparsity < 1:
            raise ParameterError(f"{{}} must be in [0, 1), got {self.sparsity}", "sparsity")
        return self


@dataclass
class PrunedModel:
    """A pruned model, not attached: ``attach()`` / ``detach()`` or ``with``; ``patch`` is the
    TokenPruner or LayerDropper that does the work."""

    name: str  # what exactly (e.g. "ShortGPT (9 of 30 layers removed)")
    patch: object
    token_level: bool  # per-token decisions (batches must not be padded)
    method: str = ""  # the method independent of its sparsity, for grouping in reports
    target_sparsity: float | None = None

    def attach(self) -> PrunedModel:
        self.patch.attach()
        return self

    def detach(self) -> None:
        self.patch.detach()

    def __enter__(self) -> PrunedModel:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def stats(self):
        """Token skipping statistics of a token pruner (None for layer droppers)."""
        return getattr(self.patch, "stats", None)

    def compute_removed(self) -> float | None:
        """Fraction of (token, block) work removed, as measured on what ran (token pruners) or by
        construction (layer droppers)."""
        if self.stats is not None:
            return self.stats.prefill_sparsity if self.stats.prefill_pairs else None
        return getattr(self.patch, "removed_fraction", None)


def calibration_chunks(tokenizer, data: str | Path | None, seq_len: int = 256, n: int = 8) -> torch.Tensor:
    from .data import pack_rows

    path = Path(data) if data else DEFAULT_CALIBRATION
    if not path.is_file():
        raise ParameterError(f"calibration data not found: {path} (give {{}} FILE, Alpaca or ShareGPT rows)",
                             "calibration_data")
    return pack_rows(tokenizer, path, seq_len, n, max_train=0).calibration


def build_pruned(model, tokenizer, spec: PrunerSpec) -> PrunedModel:
    """The pruned model ``spec`` describes, for ``model`` (not attached)."""
    from .baselines import LayerDropper, blockpruner_blocks, shortgpt_layers
    from .checkpoint import load_pruner
    from .router import make_router
    from .search import read_schedule
    from .skipping import TokenPruner, decoder_layers

    spec.check()
    if spec.method == "ftp":
        p = load_pruner(spec.checkpoint, model, router=spec.router, seed=spec.seed,
                        dense_kv=True if spec.dense_kv else None, prefill_only=spec.prefill_only)
        label = {"learned": "FTP (learned)", "static": "FTP (static)", "random": "random", "mod": "MoD-style router"}
        return PrunedModel(f"FTP {p.router.kind} router ({Path(spec.checkpoint).name})", p, True,
                           label.get(p.router.kind, p.router.kind), sum(p.schedule) / len(p.schedule))
    n = len(decoder_layers(model))
    if spec.method in ("static", "random"):
        sched = read_schedule(spec.schedule) if spec.schedule else [spec.sparsity] * n
        what = f"schedule {Path(spec.schedule).name}" if spec.schedule else f"uniform {spec.sparsity:.0%}"
        label = "FTP (static)" if spec.method == "static" and spec.schedule else f"{spec.method} router"
        pruner = TokenPruner(model, make_router(spec.method, seed=spec.seed), sched, dense_kv=spec.dense_kv,
                             prefill_only=spec.prefill_only)
        return PrunedModel(f"{spec.method} router, {what}", pruner, True, label, sum(sched) / len(sched))
    chunks = calibration_chunks(tokenizer, spec.calibration_data)
    if spec.method == "shortgpt":
        bi = _cached(model, "shortgpt-bi", lambda: {"bi": block_influence_of(model, chunks)})["bi"]
        drop = shortgpt_layers(bi, spec.sparsity)
        return PrunedModel(f"ShortGPT ({len(drop)} of {n} layers removed)", LayerDropper(model, drop_layers=drop),
                           False, "ShortGPT", spec.sparsity)
    # The greedy pass evaluates every remaining block at every step (~1,000 perplexity evaluations
    # to 40% on a 30-layer model), so it uses the first 2 of the calibration chunks.
    order = blockpruner_order_cached(model, chunks[:BLOCKPRUNER_CHUNKS], max(spec.sparsity, 0.4))
    blocks = blockpruner_blocks(order, spec.sparsity)
    return PrunedModel(f"BlockPruner ({len(blocks['drop_attention'])} attention + {len(blocks['drop_mlp'])} MLP blocks)",
                       LayerDropper(model, **blocks), False, "BlockPruner", spec.sparsity)


def block_influence_of(model, chunks):
    from .baselines import block_influence

    return block_influence(model, chunks)


def _cache_file(model, name: str) -> Path:
    ident = model_identity(model)
    return cache_root() / "pruning-baselines" / f"{ident['embedding_sha256']}-{name}.json"


_UNWRITABLE: set[Path] = set()


def _read_cache(path: Path, valid) -> dict:
    """The cached object in ``path`` if ``valid(obj)`` holds, else {} (a warning says why, if the
    file exists but cannot be used: it is computed again)."""
    value, problem = read_cache_json(path)
    if value and not problem:
        try:
            if valid(value):
                return value
        except (KeyError, TypeError, IndexError):
            pass
        problem = f"{path} is damaged (unexpected content), not used"
    if problem:
        log.warning("turbolm: warning: %s", problem)
    return {}


def _write_cache(path: Path, value: dict) -> None:
    problem = write_cache_json(path, value)
    if problem and path not in _UNWRITABLE:  # one warning per file, not one per save
        _UNWRITABLE.add(path)
        log.warning("turbolm: warning: %s: computed for this run only; set TURBOLM_CACHE to a writable "
                    "directory to keep it", problem)


def _cached(model, name: str, compute):
    path = _cache_file(model, name)
    value = _read_cache(path, lambda v: all(isinstance(x, (int, float)) for x in v["bi"]))
    if not value:
        value = compute()
        _write_cache(path, value)
    return value


def blockpruner_order_cached(model, chunks, max_fraction: float, progress: bool = True) -> list[dict]:
    """BlockPruner's greedy removal order, cached per model and resumable (saved after each
    removal): one pass to the largest sparsity serves every smaller one."""
    from .baselines import blockpruner_order

    path = _cache_file(model, f"blockpruner-{chunks.shape[0]}x{chunks.shape[1]}")
    saved = _read_cache(path, lambda v: isinstance(v["done"], bool)
                        and all(isinstance(s["removed_fraction"], (int, float)) for s in v["order"]))
    saved = saved or {"order": [], "done": False}
    if saved["done"] and (saved["order"][-1]["removed_fraction"] if saved["order"] else 0) >= max_fraction:
        return saved["order"]

    def save(order):
        _write_cache(path, {"order": order, "done": False})

    order = blockpruner_order(model, chunks, max_fraction, progress=progress, start=saved["order"] or None,
                              on_step=save)
    _write_cache(path, {"order": order, "done": True})
    return order
