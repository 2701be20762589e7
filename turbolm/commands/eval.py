"""``turbolm eval``: zero-shot accuracy and perplexity on local benchmark files (lm-eval conventions),
of the dense model or a pruned one."""

from __future__ import annotations

import json

from ..core.errors import ParameterError
from .common import add_model_args

#: EvalConfig / PrunerSpec parameters spelled otherwise on this command line
FLAGS = {"task_files": "--task-file", "task_paths": "--task-path", "checkpoint": "--pruner", "method": "--baseline"}


def register(subparsers) -> None:
    from ..evaluation.run import DEFAULT_PPL_CONTEXT
    from ..evaluation.tasks import DEFAULT_DATA_DIR, DEFAULT_TASKS, TASKS

    p = subparsers.add_parser(
        "eval", help="zero-shot accuracy (PIQA, ARC, WinoGrande, BoolQ, HellaSwag, MMLU, LAMBADA) and WikiText-2 "
                     "perplexity on local files, scored as lm-evaluation-harness scores them")
    add_model_args(p, fast_cpu=False)
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
    p.add_argument("--after-prefill", action="store_true",
                   help="score every continuation after a prefill of its context (one request at a time; WikiText: "
                        "windows of --stride scored tokens, default a quarter of the context length); a token "
                        "pruner skips tokens in the prefill only: the quality of what follows a pruned prompt")
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
    g.add_argument("--dense-kv", action="store_true",
                   help="with --pruner or a token-router baseline: skipped tokens still provide keys/values")
    g.add_argument("--sparsity", type=float, default=None, help="fraction of (token, block) work to remove")
    g.add_argument("--label", default=None, help="method name in the report (e.g. for an ablation's checkpoint)")
    g.add_argument("--schedule", default=None, help="per-block schedule file (search JSON or pruner config) for --baseline static/random")
    g.add_argument("--calibration-data", default=None,
                   help="Alpaca/ShareGPT rows for the baselines' calibration (default: ../shared/data/alpaca/alpaca_5000.json)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the Markdown table")
    p.set_defaults(run=run, flags=FLAGS)


def config(args):
    """The EvalConfig the flags describe."""
    from ..evaluation.run import EvalConfig
    from ..evaluation.tasks import TASKS
    from ..pruning import PrunerSpec

    paths = {}
    for item in args.task_path:
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise ParameterError(f"{{}} {item!r}: expected TASK=PATH, e.g. {{}} piqa=/data/piqa.jsonl", "task_paths",
                                 "task_paths")
        if name not in TASKS:
            raise ParameterError(f"{{}} {item!r}: unknown task '{name}'; known tasks: {', '.join(TASKS)}", "task_paths")
        paths[name] = path
    pruned = None
    if args.pruner or args.baseline:
        pruned = PrunerSpec(method=args.baseline or "ftp", checkpoint=args.pruner, router=args.router,
                            sparsity=args.sparsity, schedule=args.schedule, calibration_data=args.calibration_data,
                            dense_kv=args.dense_kv)
    return EvalConfig(
        model=args.model, dtype=args.dtype, device=args.device,
        tasks=None if args.tasks is None else args.tasks.split(","), task_files=args.task_file, task_paths=paths,
        data_dir=args.data_dir, limit=args.limit, ppl_limit=args.ppl_limit, batch_size=args.batch_size,
        context_length=args.context_length, stride=args.stride, equal_length_batches=args.equal_length_batches,
        pruned=pruned, label=args.label, calibration_data=args.calibration_data, after_prefill=args.after_prefill,
        out=args.out,
    )


def run(args) -> int:
    from ..evaluation.run import markdown_table, run_eval

    report = run_eval(config(args), progress=True)
    if args.json:
        print(json.dumps(report))
    else:
        print(markdown_table(report))
        if "pruning" in report:
            pr = report["pruning"]
            removed = "n/a" if pr["work_removed"] is None else f"{pr['work_removed']:.1%}"
            print(f"\n{pr['variant']}: (token, block) work removed {removed}, KL to dense {pr.get('kl_to_dense')}")
    return 0
