"""Prefill wall-clock of a pruned model against the dense one, measured side by side."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..core.errors import ParameterError, TurboLMError
from ..core.generation import context_length, forward, new_cache, synchronize

DEFAULT_TEXT = Path("../shared/data/language_modeling/wikitext-2-raw/wiki.test.raw")
_BUILTIN = (
    "The history of the printing press begins in the fifteenth century, when movable metal type made it possible "
    "to produce books in large numbers. Within a few decades printers worked in more than two hundred cities, and "
    "the spread of pamphlets, scientific treatises and vernacular bibles changed how ideas travelled across Europe. "
)


def check_bench(prompt_lengths, repeat: int, model=None, tokenizer=None) -> None:
    """Every prompt length >= 1 and, once ``model`` is given, within its context; ``repeat`` >= 1."""
    if repeat < 1:
        raise ParameterError(f"{{}} must be >= 1, got {repeat}", "repeat")
    ctx = None if model is None else context_length(model, tokenizer)
    for n in prompt_lengths:
        if n < 1:
            raise ParameterError(f"{{}} must be >= 1, got {n}", "prompt_length")
        if ctx is not None and n > ctx:
            raise ParameterError(f"{{}} {n} is longer than the model's context ({ctx} tokens); give at most {ctx}",
                                 "prompt_length")


def prompt_ids(tokenizer, length: int, text_file: str | None = None) -> tuple[torch.Tensor, str]:
    """The first ``length`` tokens of ``text_file`` (default: WikiText-2 raw test if present,
    else a built-in paragraph repeated). Returns (ids (1, length), a description of the source)."""
    path = Path(text_file) if text_file else DEFAULT_TEXT
    if path.is_file():
        text, source = path.read_text(encoding="utf-8"), str(path)
    elif text_file:
        raise TurboLMError(f"text file not found: {text_file}")
    else:
        text, source = _BUILTIN * (length // 40 + 1), "built-in paragraph, repeated"
    ids = tokenizer(text[: length * 12], add_special_tokens=False)["input_ids"]
    if len(ids) < length:
        raise ParameterError(f"{source} has only {len(ids)} tokens; {{}} {length} needs more text", "prompt_length")
    return torch.tensor([ids[:length]]), source


@torch.inference_mode()
def _prefill_seconds(model, ids) -> float:
    synchronize(model.device)
    t0 = time.perf_counter()
    forward(model, ids, new_cache(model), logits_to_keep=1)
    synchronize(model.device)
    return time.perf_counter() - t0


def prefill_benchmark(model, pruner, ids: torch.Tensor, repeat: int = 3, warmup: int = 1) -> dict:
    """Median prefill seconds, dense vs pruned, runs interleaved (dense, pruned, dense, ...) after
    ``warmup`` untimed runs of each; the pruner is attached only for its runs."""
    check_bench([ids.shape[1]], repeat, model)
    ids = ids.to(model.device)
    dense, pruned = [], []
    for i in range(warmup + repeat):
        d = _prefill_seconds(model, ids)
        with pruner:
            pruner.reset_stats()
            p = _prefill_seconds(model, ids)
        if i >= warmup:
            dense.append(d)
            pruned.append(p)
    d, p = statistics.median(dense), statistics.median(pruned)
    return {"prompt_length": int(ids.shape[1]), "dense_seconds": round(d, 4), "pruned_seconds": round(p, 4),
            "speedup": round(d / p, 3), "token_sparsity": round(pruner.stats.prefill_sparsity, 4),
            "schedule_mean": round(sum(pruner.schedule) / len(pruner.schedule), 4), "repeat": repeat}
