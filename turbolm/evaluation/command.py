"""``turbolm eval``: zero-shot accuracy and perplexity on local benchmark files (lm-eval conventions).

:func:`register` adds the sub-command to the CLI's sub-parsers; :func:`cmd_eval` runs it. The model
being evaluated comes from :func:`build_model`, the one place to add other ways of running the
target (a token pruner, a pruning baseline): it returns ``(logits_fn, equal_length_batches,
description)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core.errors import TurboLMError

DEFAULT_PPL_CONTEXT = 2048  # default --context-length for perplexity (capped by the model's context)


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` to the CLI's sub-parsers (``build_parser()``'s ``sub``); returns the new parser."""
    from .tasks import DEFAULT_DATA_DIR, DEFAULT_TASKS, TASKS

    p = subparsers.add_parser(
        "eval", help="zero-shot accuracy (PIQA, ARC, WinoGrande, BoolQ, HellaSwag, MMLU, LAMBADA) and WikiText-2 "
                     "perplexity on local files, scored as lm-evaluation-harness scores them")
    p.add_argument("--model", default=None, help="local HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default: float32)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--tasks", default=None,
                   help=f"comma list of {', '.join(TASKS)}, or 'all' (default: {','.join(DEFAULT_TASKS)}; "
                        "with --task-file / --task-path and no --tasks: only those)")
    p.add_argument("--task-file", action="append", default=[], metavar="FILE",
                   help='extra multiple-choice task: jsonl rows {"query","choices","gold"} (query used as written, '
                        'each choice scored as " " + choice) or {"context_options","continuation","gold"}; the task '
                        "is named after the file's stem (repeatable)")
    p.add_argument("--task-path", action="append", default=[], metavar="TASK=PATH",
                   help="read a built-in task from PATH instead of its place under --data-dir (repeatable; for "
                        "mmlu / mmlu_5shot a folder with test/ and dev/)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR),
                   help=f"folder holding multiple_choice/ and language_modeling/ (default: {DEFAULT_DATA_DIR})")
    p.add_argument("--limit", type=int, default=None, help="only the first N items of each task (MMLU: per subject; "
                                                           "WikiText: the first N articles)")
    p.add_argument("--ppl-limit", type=int, default=None,
                   help="WikiText: only the first N articles (default: --limit)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--context-length", type=int, default=None,
                   help=f"perplexity window in tokens (default: {DEFAULT_PPL_CONTEXT} or the model's context if shorter)")
    p.add_argument("--stride", type=int, default=None,
                   help="perplexity window stride in tokens (default: the context length, i.e. lm-eval's disjoint "
                        "rolling windows; smaller strides give each token more context)")
    p.add_argument("--equal-length-batches", action="store_true",
                   help="only batch sequences of equal length, never pad (always on for models that need it)")
    g = p.add_argument_group("pruned models (default: the dense model)")
    g.add_argument("--pruner", default=None, help="FTP pruner checkpoint (from `turbolm prune train`)")
    g.add_argument("--router", choices=["learned", "static", "random", "mod"], default=None,
                   help="with --pruner: use this router with the checkpoint's schedule")
    g.add_argument("--baseline", choices=["static", "random", "shortgpt", "blockpruner"], default=None,
                   help="static / random token routers (--sparsity uniform or --schedule FILE); shortgpt: remove the "
                        "layers of lowest Block Influence; blockpruner: remove attention/MLP blocks greedily by "
                        "calibration perplexity (both on --calibration-data; cached per model)")
    g.add_argument("--sparsity", type=float, default=None, help="fraction of (token, block) work to remove")
    g.add_argument("--label", default=None, help="method name in the report (e.g. for an ablation's checkpoint)")
    g.add_argument("--schedule", default=None, help="per-block schedule file (search JSON or pruner config) for --baseline static/random")
    g.add_argument("--calibration-data", default=None,
                   help="Alpaca/ShareGPT rows for the baselines' calibration (default: ../shared/data/alpaca/alpaca_5000.json)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the Markdown table")
    return p


# --- the model ------------------------------------------------------------------------------------


def load_base(args):
    """The target model and tokenizer named by ``--model`` / ``--dtype`` / ``--device``."""
    from ..core.models import load_target

    return load_target(args.model, dtype=args.dtype, device=args.device)


def _dense_reference(args, model, tokenizer):
    """The dense next-token distributions on the held-out calibration chunks (for the KL of a pruned
    model to the dense one), or None without calibration data."""
    from ..pruning.calibration import DenseReference
    from ..pruning.factory import calibration_chunks

    try:
        chunks = calibration_chunks(tokenizer, args.calibration_data)
    except TurboLMError as e:
        print(f"turbolm eval: no KL to the dense model: {e}", file=sys.stderr)
        return None
    return DenseReference(model, chunks)


def build_model(args, model, tokenizer):
    """``(logits_fn, equal_length_batches, description)`` for the model under evaluation.

    The dense path: the target's own logits; padding is harmless, so ``equal_length_batches`` is
    only what ``--equal-length-batches`` asks. Extend here for ``--pruner CKPT`` / ``--baseline NAME
    --sparsity S`` (wrap ``model``; return ``equal_length_batches=True`` when per-token decisions
    would change with padding)."""
    from .harness import hf_logits_fn

    if getattr(args, "pruner", None) or getattr(args, "baseline", None):
        from ..pruning.factory import build_variant

        variant = build_variant(model, tokenizer, pruner=args.pruner, router=args.router, baseline=args.baseline,
                                sparsity=args.sparsity, schedule=args.schedule, calibration_data=args.calibration_data)
        variant.handle.attach()
        args.variant = variant  # run_eval reports the work it removed
        return hf_logits_fn(model), True if variant.token_level else bool(args.equal_length_batches), variant.name
    src = getattr(model, "turbolm_source", None)
    name = src.name if src is not None else type(model).__name__
    dtype = str(model.dtype).replace("torch.", "")
    return hf_logits_fn(model), bool(getattr(args, "equal_length_batches", False)), f"{name} (dense, {dtype}, {model.device})"


# --- tasks ----------------------------------------------------------------------------------------


def select_tasks(args) -> list:
    """Load every selected task (before the model, so that a missing file fails fast)."""
    from .tasks import DEFAULT_TASKS, TASKS, load_task, load_task_file

    paths = {}
    for spec in args.task_path:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise TurboLMError(f"--task-path {spec!r}: expected TASK=PATH, e.g. --task-path piqa=/data/piqa.jsonl")
        if name not in TASKS:
            raise TurboLMError(f"--task-path {spec!r}: unknown task '{name}'; known tasks: {', '.join(TASKS)}")
        paths[name] = path
    if args.tasks is not None:
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if names == ["all"]:
            names = list(TASKS)
        for name in names:
            if name not in TASKS:
                raise TurboLMError(f"unknown task '{name}' in --tasks; known tasks: {', '.join(TASKS)} "
                                   "(or --task-file FILE for a multiple-choice jsonl file)")
        for name in paths:
            if name not in names:
                raise TurboLMError(f"--task-path {name}=... is given but {name} is not in --tasks")
    elif args.task_file or paths:
        names = list(paths)
    else:
        names = list(DEFAULT_TASKS)
    names = list(dict.fromkeys(names))
    if args.limit is not None and args.limit < 1:
        raise TurboLMError(f"--limit must be >= 1, got {args.limit}")
    ppl_limit = getattr(args, "ppl_limit", None) or args.limit
    tasks = [load_task(n, data_dir=args.data_dir, path=paths.get(n), limit=ppl_limit if n == "wikitext" else args.limit)
             for n in names]
    for f in args.task_file:
        task = load_task_file(f, limit=args.limit)
        if task.name in {t.name for t in tasks}:
            raise TurboLMError(f"--task-file {f}: a task named '{task.name}' is already selected; rename the file")
        tasks.append(task)
    if not tasks:
        raise TurboLMError("no tasks selected: give --tasks, --task-file or --task-path")
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
    if "lambada" in report["results"]:
        notes.append("lambada: acc = greedy continuation is the target word; ppl = exp(-mean log-prob of the target)")
    truncated = {n: r["truncated"] for n, r in report["results"].items() if r.get("truncated")}
    if truncated:
        notes.append(f"truncated from the left to the model's {cfg['max_length']} tokens: "
                     + ", ".join(f"{n} {k}" for n, k in truncated.items()))
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def run_eval(args, progress: bool = True) -> dict:
    """Load the tasks and the model, score everything, return the report (also written to ``--out``)."""
    from ..core.generation import context_length
    from .harness import Scorer, evaluate

    tasks = select_tasks(args)
    if args.batch_size < 1:
        raise TurboLMError(f"--batch-size must be >= 1, got {args.batch_size}")
    model, tokenizer = load_base(args)
    reference = None
    if getattr(args, "pruner", None) or getattr(args, "baseline", None):
        reference = _dense_reference(args, model, tokenizer)  # before the model is pruned
    logits_fn, equal_length, description = build_model(args, model, tokenizer)
    max_length = context_length(model, tokenizer) or DEFAULT_PPL_CONTEXT
    ppl_context = args.context_length or min(DEFAULT_PPL_CONTEXT, max_length)
    if ppl_context < 2 or ppl_context > max_length:
        raise TurboLMError(f"--context-length must be between 2 and the model's context ({max_length}), got {ppl_context}")
    stride = args.stride or ppl_context
    if not 1 <= stride <= ppl_context:
        raise TurboLMError(f"--stride must be between 1 and the context length ({ppl_context}), got {stride}")
    scorer = Scorer(logits_fn, tokenizer, max_length=max_length, batch_size=args.batch_size,
                    equal_length_batches=equal_length, progress=progress)

    def said(name, r):
        if progress:
            bits = [f"{k} {_pct(r[k])}%" for k in ("acc", "acc_norm") if r.get(k) is not None]
            bits += [f"{k} {_num(r[k])}" for k in ("ppl", "word_ppl") if r.get(k) is not None]
            print(f"turbolm eval: {name}: {', '.join(bits)} (n={r['n']}, {r['seconds']:.1f} s)", file=sys.stderr)

    results = evaluate(tasks, scorer, context_length=ppl_context, stride=stride, on_result=said)
    has_rolling = any(t.kind == "rolling" for t in tasks)
    report = {
        "model": description,
        "config": {
            "tasks": [t.name for t in tasks], "limit": args.limit, "ppl_limit": getattr(args, "ppl_limit", None),
            "batch_size": args.batch_size,
            "equal_length_batches": equal_length, "max_length": max_length,
            "context_length": ppl_context if has_rolling else None, "stride": stride if has_rolling else None,
            "dtype": args.dtype, "device": args.device, "data_dir": str(args.data_dir),
        },
        "results": results,
    }
    variant = getattr(args, "variant", None)
    if variant is not None:
        removed = variant.compute_removed()
        report["pruning"] = {"method": getattr(args, "label", None) or variant.method, "variant": variant.name,
                             "target_sparsity": round(variant.target_sparsity, 4),
                             "work_removed": None if removed is None else round(removed, 4)}
        stats = getattr(variant.handle, "stats", None)
        if stats is not None:
            report["pruning"]["token_stats"] = stats.to_json()
        if reference is not None:
            report["pruning"]["kl_to_dense"] = round(reference.kl(variant.handle), 5)
            report["pruning"]["kl_data"] = (f"{reference.chunks.shape[0]} held-out chunks x {reference.chunks.shape[1]} "
                                            f"tokens of the calibration data, last {reference.score_last} positions")
    if args.out:
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
        except OSError as e:
            raise TurboLMError(f"cannot write {out}: {e.strerror or e}") from None
    return report


def cmd_eval(args) -> int:
    report = run_eval(args, progress=True)
    if args.json:
        print(json.dumps(report))
    else:
        print(markdown_table(report))
        if "pruning" in report:
            pr = report["pruning"]
            removed = "n/a" if pr["work_removed"] is None else f"{pr['work_removed']:.1%}"
            print(f"\n{pr['variant']}: (token, block) work removed {removed}, KL to dense {pr.get('kl_to_dense')}")
    return 0
