"""The sparsity-schedule search on a real model: the GA of :mod:`.scheduler` with minus the
calibration KL to the dense model as fitness, saved after every generation (resumable)."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import ParameterError, TurboLMError, literal
from ..core.io import settings_differences, write_json
from .calibration import DenseReference
from .genetic import SearchConfig, SearchResult, search_schedule
from .skipping import TokenPruner, decoder_layers


def run_search(model, router, reference: DenseReference, target: float, out_file: str | Path,
               config: SearchConfig, *, initial=None, resume: bool = False, progress: bool = True,
               dense_kv: bool = False, first_block_dense: bool = False) -> SearchResult:
    """Search per-block sparsity of mean ``target`` for ``router``; writes ``out_file`` (JSON)
    after each generation, and continues from it with ``resume=True``. The first population holds
    the uniform schedule, ``initial`` (default: the Block-Influence-proportional one), mutated
    copies of them and a few random schedules."""
    out_file = Path(out_file)
    n = len(decoder_layers(model))
    header = {"target_sparsity": target, "router": getattr(router, "kind", "learned"),
              "calibration_chunks": int(reference.chunks.shape[0]),
              "calibration_seq_len": int(reference.chunks.shape[1]),
              "fitness": "minus mean KL(dense || pruned) per calibration token",
              "config": config.__dict__}
    previous = None
    if resume and out_file.is_file():
        try:
            saved = json.loads(out_file.read_text())
            previous = SearchResult.from_json(saved["search"])
        except (ValueError, KeyError, TypeError) as e:
            raise TurboLMError(f"cannot resume the search from {out_file}: {e}") from None
        changed = settings_differences(_resume_settings(saved), _resume_settings(header))
        changed = literal(changed)
        if changed:
            raise ParameterError(f"cannot resume the search in {out_file}: it was made with other settings "
                                 f"({changed}); use the same flags, or choose another {{}}", "out")
    check_out(out_file, resume)
    fixed = {0: 0.0} if first_block_dense else None

    def save(gen, result):
        out_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(out_file, {**header, "search": result.to_json()})

    if initial is None and previous is None:
        initial = [influence_schedule(model, reference.chunks, target, config.max_sparsity)]
    pruner = TokenPruner(model, router, [target] * n, dense_kv=dense_kv)
    with pruner:
        result = search_schedule(n, target, reference.fitness(pruner), config, initial=initial, fixed=fixed,
                                 progress=progress, on_generation=save, resume=previous)
    save(None, result)
    return result


def check_out(out_file: str | Path, resume: bool) -> None:
    """A search file is continued (``resume``) or refused, never replaced: it may hold hours of work."""
    if not resume and Path(out_file).exists():
        raise ParameterError(f"{out_file} already holds a schedule search: pass {{}} to continue it, or choose "
                             "another {}", "resume", "out")


def _resume_settings(saved: dict) -> dict:
    """What a resumed search must share with the saved one (more generations may be asked for)."""
    return {**{k: v for k, v in saved.items() if k not in ("config", "search")},
            **{k: v for k, v in saved.get("config", {}).items() if k != "generations"}}


def influence_schedule(model, chunks, target: float, max_sparsity: float = 0.9) -> list[float]:
    """A seed for the search: sparsity in proportion to 1 - Block Influence (ShortGPT's BI: 1 - the
    mean cosine between a block's input and output), so blocks that change their tokens most are
    pruned least; projected onto the mean ``target``."""
    from .baselines import block_influence
    from .genetic import project_to_mean

    bi = block_influence(model, chunks)
    weights = [max(1e-3, 1.0 - b) for b in bi]
    mean_w = sum(weights) / len(weights)
    return project_to_mean([target * w / mean_w for w in weights], target, lo=0.0, hi=max_sparsity)


def read_schedule(path: str | Path) -> list[float]:
    """The best schedule from a search file (or a pruner config.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TurboLMError(f"cannot read a schedule from {path}: {e}") from None
    if "search" in data:
        return [float(s) for s in data["search"]["best"]]
    if "schedule" in data:
        return [float(s) for s in data["schedule"]]
    raise TurboLMError(f"{path} holds no schedule (expected the output of `turbolm prune search` or a pruner)")
