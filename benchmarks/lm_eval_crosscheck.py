"""Cross-check `turbolm eval` against lm-evaluation-harness itself, on the same local files and model.

lm-eval runs through its Python API (``lm_eval.simple_evaluate`` with ``HFLM(pretrained=model,
tokenizer=tokenizer)`` on the already-loaded model) with the custom tasks in
``benchmarks/lm_eval_tasks/`` (``dataset_path: json`` + ``data_files`` pointing at the local jsonl
files; nothing is downloaded: the Hugging Face hub and datasets are set offline). turbolm's harness
scores the same items. Printed: both accuracies side by side, the differences in points, and a
per-item comparison (items whose predicted answer differs, largest log-prob difference).

    python benchmarks/lm_eval_crosscheck.py --limit 100
    python benchmarks/lm_eval_crosscheck.py --tasks piqa,arc_easy,hellaswag,boolq,winogrande --limit 500

Needs ``pip install lm-eval`` (not a dependency of turbolm; install it without letting pip replace
torch). The goal is agreement within 0.5 points (perplexity: 0.1 %); exit status 1 if a difference is larger.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# lm-eval and datasets must not reach for the network: every file is local.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
TASK_DIR = HERE / "lm_eval_tasks"
REPO = HERE.parent
YAML_DATA_PREFIX = "../shared/data/"  # how the YAMLs name the data folder (relative to the repository root)
SUPPORTED = ["piqa", "arc_easy", "arc_challenge", "hellaswag", "boolq", "winogrande", "lambada"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="piqa,arc_easy,hellaswag", help=f"comma list of {', '.join(SUPPORTED)} "
                                                                      "(default: piqa,arc_easy,hellaswag)")
    p.add_argument("--limit", type=int, default=500, help="first N items of each task (default: 500)")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"),
                   help="the shared data folder (default: ../shared/data next to the repository)")
    p.add_argument("--model", default=None, help="model directory or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size for both harnesses (default: 8)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--tolerance", type=float, default=0.5, help="largest accepted difference in points (default: 0.5)")
    p.add_argument("--out", default=None, help="write the comparison as JSON here")
    return p.parse_args(argv)


def task_dir_for(data_dir: Path, tmp: Path) -> Path:
    """Copy the task folder with its data paths pointing at ``data_dir``."""
    for f in TASK_DIR.iterdir():
        if f.suffix in (".yaml", ".py"):
            text = f.read_text()
            if f.suffix == ".yaml":
                text = text.replace(YAML_DATA_PREFIX, str(data_dir.resolve()) + "/")
            (tmp / f.name).write_text(text)
    return tmp


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int, batch_size: int, data_dir: Path) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        manager = TaskManager(include_path=str(task_dir_for(data_dir, Path(tmp))), include_defaults=False)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
        out = lm_eval.simple_evaluate(model=lm, tasks=[f"turbolm_{t}" for t in tasks], limit=limit,
                                      task_manager=manager, log_samples=True, bootstrap_iters=0)
    results = {}
    for t in tasks:
        r = out["results"][f"turbolm_{t}"]
        samples = sorted(out["samples"][f"turbolm_{t}"], key=lambda s: s["doc_id"])
        results[t] = {
            "acc": r.get("acc,none"), "acc_norm": r.get("acc_norm,none"), "ppl": r.get("perplexity,none"),
            "n": len(samples),
            "lls": [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples],
        }
    return results


def run_turbolm(model, tokenizer, tasks: list[str], limit: int, batch_size: int, data_dir: Path) -> dict:
    from turbolm.core.generation import context_length
    from turbolm.evaluation.harness import Scorer, evaluate_task, hf_logits_fn
    from turbolm.evaluation.tasks import load_task

    scorer = Scorer(hf_logits_fn(model), tokenizer, max_length=context_length(model, tokenizer) or 2048,
                    batch_size=batch_size)
    return {t: evaluate_task(load_task(t, data_dir=data_dir, limit=limit), scorer, keep_lls=True) for t in tasks}


def compare(ours: dict, theirs: dict, tolerance: float) -> tuple[list[dict], bool]:
    rows, ok = [], True
    for task in ours:
        a, b = ours[task], theirs[task]
        lls_a = [x if isinstance(x, list) else [x] for x in a["lls"]]  # loglikelihood tasks: one float per item
        pairs = list(zip(lls_a, b["lls"]))
        delta_ll = max((abs(x - y) for la, lb in pairs for x, y in zip(la, lb)), default=0.0)
        differ = sum(max(range(len(la)), key=la.__getitem__) != max(range(len(lb)), key=lb.__getitem__)
                     for la, lb in pairs)
        for metric in ("acc", "acc_norm", "ppl"):
            if b.get(metric) is None or a.get(metric) is None:
                continue
            scale = 1 if metric == "ppl" else 100  # accuracies in points; perplexity as it is
            diff = scale * (a[metric] - b[metric])
            if metric == "ppl":  # perplexity: within 0.1 % of lm-eval's
                ok &= abs(diff) <= 1e-3 * b[metric] and a["n"] == b["n"]
            else:
                ok &= abs(diff) <= tolerance and a["n"] == b["n"]
            rows.append({"task": task, "metric": metric, "n": a["n"], "lm_eval": scale * b[metric],
                         "turbolm": scale * a[metric], "diff": diff, "argmax_differs": differ, "max_abs_dll": delta_ll})
    return rows, ok


def main(argv=None) -> int:
    args = parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in SUPPORTED]
    if unknown:
        sys.exit(f"unknown task(s) {', '.join(unknown)}; supported: {', '.join(SUPPORTED)}")
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        sys.exit(f"data folder not found: {data_dir} (give --data-dir)")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        sys.exit("lm-eval is not installed: `pip install lm-eval` (check with --dry-run that it keeps your torch)")
    import torch

    from turbolm.core.models import load_target

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_target(args.model)
    t0 = time.perf_counter()
    ours = run_turbolm(model, tokenizer, tasks, args.limit, args.batch_size, data_dir)
    t1 = time.perf_counter()
    theirs = run_lm_eval(model, tokenizer, tasks, args.limit, args.batch_size, data_dir)
    t2 = time.perf_counter()
    rows, ok = compare(ours, theirs, args.tolerance)

    name = model.turbolm_source.name
    print(f"\nlm-eval {lm_eval.__version__} vs turbolm eval: {name}, float32, {model.device}, first {args.limit} items, "
          f"batch size {args.batch_size} (turbolm {t1 - t0:.0f} s, lm-eval {t2 - t1:.0f} s)\n")
    print("| task | metric | n | lm-eval | turbolm | diff | items whose argmax differs | max abs d log-prob |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['metric']} | {r['n']} | {r['lm_eval']:.2f} | {r['turbolm']:.2f} | {r['diff']:+.2f} | "
              f"{r['argmax_differs']} | {r['max_abs_dll']:.2e} |")
    print("\n(acc / acc_norm in %, differences in points; ppl as it is)")
    print(f"{'AGREE' if ok else 'DISAGREE'}: every accuracy difference {'within' if ok else 'NOT within'} {args.tolerance} points "
          "and perplexity within 0.1 %")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": name, "limit": args.limit, "rows": rows, "agree": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
