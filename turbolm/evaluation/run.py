"""One evaluation run: zero-shot accuracy and perplexity on local benchmark files (lm-eval
conventions), of the dense model or of a pruned one (built by ``pruning.build_pruned``).

``run_eval(EvalConfig(...))`` loads the tasks (first, so a missing file fails fast), the model, and
scores everything; ``markdown_table(report)`` renders the result.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ParameterError, TurboLMError
from ..core.io import write_text
from ..pruning.factory import TOKEN_METHODS, PrunerSpec
from .tasks import DEFAULT_DATA_DIR

DEFAULT_PPL_CONTEXT = 2048  # default perplexity window (capped by the model's context)


@dataclass
class EvalConfig:
    """One evaluation. ``tasks``: built-in task names (None: the default set, or only the
    ``task_files`` / ``task_paths`` when those are given; ["all"]: every built-in task);
    ``task_paths`` reads a built-in task from another file; ``limit``: the first N items of each
    task (``ppl_limit`` for WikiText, default ``limit``); ``pruned``: evaluate a pruned model
    (``label`` names it in reports); ``after_prefill``: score every continuation after a prefill
    of its context (one request at a time; perplexity windows of ``stride`` scored tokens, default
    a quarter of the context length), with a token pruner skipping tokens in the prefill only -
    the quality of what follows a pruned prompt; ``out``: also write the report there as JSON."""

    model: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    tasks: Sequence[str] | None = None
    task_files: Sequence[str] = ()
    task_paths: dict[str, str] = field(default_factory=dict)
    data_dir: str = str(DEFAULT_DATA_DIR)
    limit: int | None = None
    ppl_limit: int | None = None
    batch_size: int = 8
    context_length: int | None = None
    stride: int | None = None
    equal_length_batches: bool = False
    pruned: PrunerSpec | None = None
    label: str | None = None
    calibration_data: str | None = None  # for the KL to the dense model of a pruned one
    after_prefill: bool = False
    out: str | None = None


# --- the model ------------------------------------------------------------------------------------


def _dense_reference(config: EvalConfig, model, tokenizer):
    """The dense next-token distributions on the held-out calibration chunks (for the KL of a pruned
    model to the dense one), or None without calibration data."""
    from ..pruning.calibration import DenseReference
    from ..pruning.factory import calibration_chunks

    try:
        chunks = calibration_chunks(tokenizer, config.calibration_data)
    except TurboLMError as e:
        print(f"turbolm eval: no KL to the dense model: {e}", file=sys.stderr)
        return None
    return DenseReference(model, chunks)


def dense_description(model) -> str:
    src = getattr(model, "turbolm_source", None)
    name = src.name if src is not None else type(model).__name__
    return f"{name} (dense, {str(model.dtype).replace('torch.', '')}, {model.device})"


# --- tasks ----------------------------------------------------------------------------------------


def select_tasks(config: EvalConfig) -> list:
    """Load every selected task (before the model, so that a missing file fails fast)."""
    from .tasks import DEFAULT_TASKS, TASKS, load_task, load_task_file

    paths = dict(config.task_paths)
    for name in paths:
        if name not in TASKS:
            raise ParameterError(f"{{}} {name}=...: unknown task '{name}'; known tasks: {', '.join(TASKS)}", "task_paths")
    if config.tasks is not None:
        names = [t.strip() for t in config.tasks if t.strip()]
        if names == ["all"]:
            names = list(TASKS)
        for name in names:
            if name not in TASKS:
                raise ParameterError(f"unknown task '{name}' in {{}}; known tasks: {', '.join(TASKS)} "
                                     "(or {} FILE for a multiple-choice jsonl file)", "tasks", "task_files")
        for name in paths:
            if name not in names:
                raise ParameterError(f"{{}} {name}=... is given but {name} is not in {{}}", "task_paths", "tasks")
    elif config.task_files or paths:
        names = list(paths)
    else:
        names = list(DEFAULT_TASKS)
    names = list(dict.fromkeys(names))
    if config.limit is not None and config.limit < 1:
        raise ParameterError(f"{{}} must be >= 1, got {config.limit}", "limit")
    ppl_limit = config.ppl_limit or config.limit
    tasks = [load_task(n, data_dir=config.data_dir, path=paths.get(n), limit=ppl_limit if n == "wikitext" else config.limit)
             for n in names]
    for f in config.task_files:
        task = load_task_file(f, limit=config.limit)
        if task.name in {t.name for t in tasks}:
            raise ParameterError(f"{{}} {f}: a task named '{task.name}' is already selected; rename the file",
                                 "task_files")
        tasks.append(task)
    if not tasks:
        raise ParameterError("no tasks selected: give {}, {} or {}", "tasks", "task_files", "task_paths")
    return tasks


# --- output ---------------------------------------------------------------------------------------


def _pct(value, stderr=None) -> str:
    if value is None:
        return "-"
    s = f"{100 * value:.2f}"
    return s + (f" ± {100 * stderr:.2f}" if stderr is not None else "")


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}" if value < 100 else f"{value:.1f}"


def markdown_table(report: dict) -> str:
    lines = ["| task | n | acc (%) | acc_norm (%) | ppl | word ppl |", "|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['n']} | {_pct(r['acc'], r['acc_stderr'])} | "
                     f"{_pct(r['acc_norm'], r['acc_norm_stderr'])} | {_num(r.get('ppl'))} | {_num(r.get('word_ppl'))} |")
    cfg = report["config"]
    notes = [f"model: {report['model']}; zero-shot unless named (mmlu_5shot), lm-eval prompts; ± = standard error; "
             f"requests longer than the model's {cfg['max_length']} tokens are truncated from the left"]
    if any(r.get("word_ppl") is not None for r in report["results"].values()):
        notes.append(f"wikitext: token-level ppl and lm-eval's word ppl, windows of {cfg['context_length']} tokens, "
                     f"stride {cfg['stride']}")
    if cfg.get("after_prefill"):
        notes.append("after prefill: every continuation (wikitext: every window's last stride tokens) scored in a "
                     "second forward over the KV cache of its context's prefill; a token pruner skips tokens in the "
                     "prefill only")
    if "lambada" in report["results"]:
        notes.append("lambada: acc = greedy continuation is the target word; ppl = exp(-mean log-prob of the target)")
    truncated = {n: r["truncated"] for n, r in report["results"].items() if r.get("truncated")}
    if truncated:
        notes.append(f"truncated from the left to the model's {cfg['max_length']} tokens: "
                     + ", ".join(f"{n} {k}" for n, k in truncated.items()))
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def run_eval(config: EvalConfig, target=None, progress: bool = True) -> dict:
    """Load the tasks and the model (or use ``target``, a loaded ``(model, tokenizer)``), score
    everything, return the report (also written to ``config.out``)."""
    from ..core.generation import context_length
    from ..core.models import load_target
    from .harness import Scorer, evaluate, hf_logits_fn, hf_prefill_fn

    tasks = select_tasks(config)
    if config.out:
        check_writable(Path(config.out))
    if config.batch_size < 1:
        raise ParameterError(f"{{}} must be >= 1, got {config.batch_size}", "batch_size")
    spec = config.pruned
    if spec is not None:
        spec.check()
        if config.after_prefill and spec.method in TOKEN_METHODS:  # tokens skipped in the prompt only
            spec = dataclasses.replace(spec, prefill_only=True)
    model, tokenizer = target or load_target(config.model, dtype=config.dtype, device=config.device)
    reference, pruned = None, None
    equal_length, description = config.equal_length_batches, dense_description(model)
    if spec is not None:
        from ..pruning.factory import build_pruned

        reference = _dense_reference(config, model, tokenizer)  # before the model is pruned
        pruned = build_pruned(model, tokenizer, spec)
        equal_length = equal_length or pruned.token_level
        description = pruned.name
    max_length = context_length(model, tokenizer) or DEFAULT_PPL_CONTEXT
    ppl_context = config.context_length or min(DEFAULT_PPL_CONTEXT, max_length)
    if ppl_context < 2 or ppl_context > max_length:
        raise ParameterError(f"{{}} must be between 2 and the model's context ({max_length}), got {ppl_context}",
                             "context_length")
    stride = config.stride or (max(1, ppl_context // 4) if config.after_prefill else ppl_context)
    if not 1 <= stride <= ppl_context:
        raise ParameterError(f"{{}} must be between 1 and the context length ({ppl_context}), got {stride}", "stride")
    if config.after_prefill and stride == ppl_context:
        raise ParameterError(f"{{}} scores each window's last stride tokens after a prefill of the others: give {{}} "
                             f"below the context length ({ppl_context})", "after_prefill", "stride")
    scorer = Scorer(hf_logits_fn(model), tokenizer, max_length=max_length, batch_size=config.batch_size,
                    equal_length_batches=equal_length, progress=progress,
                    prefill_fn=hf_prefill_fn(model) if config.after_prefill else None)

    def said(name, r):
        if progress:
            bits = [f"{k} {_pct(r[k])}%" for k in ("acc", "acc_norm") if r.get(k) is not None]
            bits += [f"{k} {_num(r[k])}" for k in ("ppl", "word_ppl") if r.get(k) is not None]
            print(f"turbolm eval: {name}: {', '.join(bits)} (n={r['n']}, {r['seconds']:.1f} s)", file=sys.stderr)

    if pruned is not None:
        pruned.attach()
    try:
        results = evaluate(tasks, scorer, context_length=ppl_context, stride=stride, on_result=said)
        report = {
            "model": description,
            "config": {
                "tasks": [t.name for t in tasks], "limit": config.limit, "ppl_limit": config.ppl_limit,
                "batch_size": config.batch_size, "equal_length_batches": equal_length, "max_length": max_length,
                "context_length": ppl_context if any(t.kind == "rolling" for t in tasks) else None,
                "stride": stride if any(t.kind == "rolling" for t in tasks) else None,
                "dtype": config.dtype, "device": config.device, "data_dir": str(config.data_dir),
                "after_prefill": config.after_prefill,
            },
            "results": results,
        }
        if pruned is not None:
            report["pruning"] = _pruning_report(config, pruned, reference)
    finally:
        if pruned is not None:
            pruned.detach()
    if config.out:
        out = Path(config.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_text(out, json.dumps(report, indent=1) + "\n")
        except OSError as e:
            raise TurboLMError(f"cannot write {out}: {e.strerror or e}") from None
    return report


def check_writable(out: Path) -> None:
    """Refuse an output file that cannot be written before the evaluation, not after it (when the
    results would be lost). An existing file is replaced only when the new report is complete."""
    problem = "it is a directory; give a file name" if out.is_dir() else None
    if problem is None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            problem = f"cannot create {out.parent} ({e.strerror or e})"
    if problem is None and not os.access(out.parent, os.W_OK):
        problem = f"{out.parent} is not writable"
    if problem:
        raise TurboLMError(f"cannot write {out}: {problem}")


def _pruning_report(config: EvalConfig, pruned, reference) -> dict:
    """The work a pruned model removed, its skipping statistics and its KL to the dense model."""
    removed = pruned.compute_removed()
    out = {"method": config.label or pruned.method, "variant": pruned.name,
           "target_sparsity": round(pruned.target_sparsity, 4),
           "work_removed": None if removed is None else round(removed, 4)}
    if pruned.stats is not None:
        out["token_stats"] = pruned.stats.to_json()
    if reference is not None:
        out["kl_to_dense"] = round(reference.kl(pruned.patch), 5)
        out["kl_data"] = (f"{reference.chunks.shape[0]} held-out chunks x {reference.chunks.shape[1]} "
                          f"tokens of the calibration data, last {reference.score_last} positions")
    return out
