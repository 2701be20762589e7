"""One place that turns "which pruned model" into something attachable: an FTP pruner checkpoint,
a router without training (static / random), or a layer-pruning baseline (ShortGPT, BlockPruner).
Used by `turbolm eval` and the pruning report, so every method is built the same way."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.io import write_json
from ..core.errors import TurboLMError
from ..core.models import cache_root, model_identity

BASELINES = ("static", "random", "shortgpt", "blockpruner")
DEFAULT_CALIBRATION = Path("../shared/data/alpaca/alpaca_5000.json")
BLOCKPRUNER_CHUNKS = 2


@dataclass
class Variant:
    name: str
    handle: object  # TokenPruner or LayerDropper: attach()/detach(), context manager
    token_level: bool  # per-token decisions (batches must not be padded)
    method: str = ""  # the method independent of its sparsity, for grouping in reports
    target_sparsity: float | None = None

    def compute_removed(self) -> float | None:
        """Fraction of (token, block) work removed, as measured on what ran (token pruners) or by
        construction (layer droppers)."""
        stats = getattr(self.handle, "stats", None)
        if stats is not None:
            return stats.prefill_sparsity if stats.prefill_pairs else None
        return getattr(self.handle, "removed_fraction", None)


def calibration_chunks(tokenizer, data: str | Path | None, seq_len: int = 256, n: int = 8) -> torch.Tensor:
    from .data import pack_rows

    path = Path(data) if data else DEFAULT_CALIBRATION
    if not path.is_file():
        raise TurboLMError(f"calibration data not found: {path} (give --calibration-data FILE, Alpaca or ShareGPT rows)")
    return pack_rows(tokenizer, path, seq_len, n, max_train=0).calibration


def build_variant(model, tokenizer, *, pruner: str | None = None, router: str | None = None,
                  baseline: str | None = None, sparsity: float | None = None, schedule: str | None = None,
                  calibration_data: str | None = None, seed: int = 0) -> Variant:
    """The pruned model to evaluate (not attached)."""
    from .baselines import LayerDropper, blockpruner_blocks, shortgpt_layers
    from .checkpoint import load_pruner
    from .router import make_router
    from .search import read_schedule
    from .skipping import TokenPruner, decoder_layers

    if pruner and baseline:
        raise TurboLMError("give --pruner or --baseline, not both")
    if pruner:
        p = load_pruner(pruner, model, router=router, seed=seed)
        label = {"learned": "FTP (learned)", "static": "FTP (static)", "random": "random", "mod": "MoD-style router"}
        return Variant(f"FTP {p.router.kind} router ({Path(pruner).name})", p, True,
                       label.get(p.router.kind, p.router.kind), sum(p.schedule) / len(p.schedule))
    if baseline not in BASELINES:
        raise TurboLMError(f"--baseline must be one of {', '.join(BASELINES)}")
    n = len(decoder_layers(model))
    if baseline in ("static", "random"):
        if schedule:
            sched = read_schedule(schedule)
        elif sparsity is not None:
            sched = [sparsity] * n
        else:
            raise TurboLMError(f"--baseline {baseline} needs --sparsity S (uniform) or --schedule FILE")
        what = f"schedule {Path(schedule).name}" if schedule else f"uniform {sparsity:.0%}"
        label = "FTP (static)" if baseline == "static" and schedule else f"{baseline} router"
        return Variant(f"{baseline} router, {what}", TokenPruner(model, make_router(baseline, seed=seed), sched), True,
                       label, sum(sched) / len(sched))
    if sparsity is None or not 0 < sparsity < 1:
        raise TurboLMError(f"--baseline {baseline} needs --sparsity S in (0, 1)")
    chunks = calibration_chunks(tokenizer, calibration_data)
    if baseline == "shortgpt":
        bi = _cached(model, "shortgpt-bi", lambda: {"bi": block_influence_of(model, chunks)})["bi"]
        drop = shortgpt_layers(bi, sparsity)
        return Variant(f"ShortGPT ({len(drop)} of {n} layers removed)", LayerDropper(model, drop_layers=drop), False,
                       "ShortGPT", sparsity)
    # The greedy pass evaluates every remaining block at every step (~1,000 perplexity evaluations
    # to 40% on a 30-layer model), so it uses the first 2 of the calibration chunks.
    order = blockpruner_order_cached(model, chunks[:BLOCKPRUNER_CHUNKS], max(sparsity, 0.4))
    blocks = blockpruner_blocks(order, sparsity)
    d = LayerDropper(model, **blocks)
    return Variant(f"BlockPruner ({len(blocks['drop_attention'])} attention + {len(blocks['drop_mlp'])} MLP blocks)",
                   d, False, "BlockPruner", sparsity)


def block_influence_of(model, chunks):
    from .baselines import block_influence

    return block_influence(model, chunks)


def _cache_file(model, name: str) -> Path:
    ident = model_identity(model)
    return cache_root() / "pruning-baselines" / f"{ident['embedding_sha256']}-{name}.json"


def _cached(model, name: str, compute):
    path = _cache_file(model, name)
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, value)
    return value


def blockpruner_order_cached(model, chunks, max_fraction: float, progress: bool = True) -> list[dict]:
    """BlockPruner's greedy removal order, cached per model and resumable (saved after each
    removal): one pass to the largest sparsity serves every smaller one."""
    from .baselines import blockpruner_order

    path = _cache_file(model, f"blockpruner-{chunks.shape[0]}x{chunks.shape[1]}")
    saved = json.loads(path.read_text()) if path.is_file() else {"order": [], "done": False}
    if saved.get("done") and (saved["order"][-1]["removed_fraction"] if saved["order"] else 0) >= max_fraction:
        return saved["order"]
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(order):
        write_json(path, {"order": order, "done": False})

    order = blockpruner_order(model, chunks, max_fraction, progress=progress, start=saved["order"] or None,
                              on_step=save)
    write_json(path, {"order": order, "done": True})
    return order
