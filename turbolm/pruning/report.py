"""`turbolm prune report`: the accuracy-retention table from `turbolm eval --json --out` files.

Per run: average accuracy over the tasks present (acc_norm for PIQA, ARC and HellaSwag, acc for
WinoGrande, BoolQ and MMLU), plain retention (pruned / dense average), above-chance retention
((pruned - chance) / (dense - chance), averaged over the tasks where the dense model is clearly
above chance), the WikiText-2 perplexity ratio and the KL to the dense model. A small model sits
near chance on several tasks, where plain retention says little: a broken model still "retains"
chance-level accuracy.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ..core.errors import DataError, TurboLMError

TASK_METRIC = {"piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "winogrande": "acc",
               "boolq": "acc", "hellaswag": "acc_norm", "mmlu": "acc"}
# Chance: uniform over the choices; BoolQ: the majority answer ("yes", 62.2% of the dev split).
CHANCE = {"piqa": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25, "winogrande": 0.5, "boolq": 0.622,
          "hellaswag": 0.25, "mmlu": 0.25}
ABOVE_CHANCE_MARGIN = 0.05  # and at least 2 standard errors (about a 95% margin)


def read_runs(results_dir: str | Path) -> tuple[dict, list[dict]]:
    """(the dense run, the pruned runs) from the eval JSON files in ``results_dir``."""
    files = sorted(Path(results_dir).glob("*.json"))
    if not files:
        raise DataError(f"no eval results (*.json) in {results_dir}; write them with `turbolm eval --out`")
    dense, pruned = [], []
    for f in files:
        try:
            run = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise TurboLMError(f"cannot read {f}: {e}") from None
        if "results" not in run:
            continue
        run["file"] = f.name
        (pruned if "pruning" in run else dense).append(run)
    if len(dense) != 1:
        raise DataError(f"{results_dir} must hold exactly one dense run (no pruner or baseline), found {len(dense)}")
    return dense[0], pruned


def _metric(run: dict, task: str) -> float | None:
    r = run["results"].get(task)
    return None if r is None else r.get(TASK_METRIC[task])


def clearly_above_chance(dense: dict) -> list[str]:
    out = []
    for task in TASK_METRIC:
        r = dense["results"].get(task)
        if r is None:
            continue
        value, err = r.get(TASK_METRIC[task]), r.get(f"{TASK_METRIC[task]}_stderr") or 0.0
        if value is not None and value - CHANCE[task] >= max(ABOVE_CHANCE_MARGIN, 2 * err):
            out.append(task)
    return out


def summarise(dense: dict, runs: list[dict]) -> dict:
    tasks = [t for t in TASK_METRIC if t in dense["results"]]
    above = clearly_above_chance(dense)
    dense_avg = sum(_metric(dense, t) for t in tasks) / len(tasks) if tasks else None
    dense_ppl = (dense["results"].get("wikitext") or {}).get("ppl")

    def row(run, method, sparsity, removed, kl):
        accs = {t: _metric(run, t) for t in tasks}
        if any(v is None for v in accs.values()):
            missing = [t for t, v in accs.items() if v is None]
            raise TurboLMError(f"{run.get('file')}: no result for {', '.join(missing)} (the dense run has them)")
        avg = sum(accs.values()) / len(tasks) if tasks else None
        ac = [(accs[t] - CHANCE[t]) / (_metric(dense, t) - CHANCE[t]) for t in above]
        ppl = (run["results"].get("wikitext") or {}).get("ppl")
        return {"method": method, "sparsity": sparsity, "work_removed": removed, "tasks": accs, "average": avg,
                "retention": avg / dense_avg if avg is not None and dense_avg else None,
                "above_chance_retention": sum(ac) / len(ac) if ac else None,
                "wikitext_ppl": ppl, "ppl_ratio": ppl / dense_ppl if ppl and dense_ppl else None, "kl_to_dense": kl,
                "file": run.get("file")}

    rows = [row(dense, "dense", 0.0, 0.0, 0.0)]
    for run in runs:
        p = run["pruning"]
        rows.append(row(run, p["method"], p.get("target_sparsity"), p.get("work_removed"), p.get("kl_to_dense")))
    return {"tasks": tasks, "above_chance_tasks": above, "metric": {t: TASK_METRIC[t] for t in tasks},
            "limit": dense["config"].get("limit"), "rows": rows,
            "wikitext": {"context_length": dense["config"].get("context_length"), "stride": dense["config"].get("stride"),
                         "articles": (dense["results"].get("wikitext") or {}).get("n"),
                         "tokens": (dense["results"].get("wikitext") or {}).get("tokens")}}


def _f(v, pct=False, digits=2):
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.{digits}f}"


def _wikitext_size(w: dict) -> str:
    if not w.get("articles"):
        return ""
    return f" ({w['articles']} articles" + (f", {w['tokens']:,} tokens)" if w.get("tokens") else ")")


def markdown(summary: dict) -> str:
    tasks = summary["tasks"]
    items = f"first {summary['limit']} items" if summary["limit"] else "all items"
    lines = [f"Tasks (metric): {', '.join(f'{t} ({m})' for t, m in summary['metric'].items())}; "
             f"{items} of each. Above-chance retention over: "
             f"{', '.join(summary['above_chance_tasks']) or 'none'} (dense >= chance + max(5 points, 2 stderr)). "
             f"WikiText-2{_wikitext_size(summary['wikitext'])}: window {summary['wikitext']['context_length']}, "
             f"stride {summary['wikitext']['stride']}.", ""]
    lines.append("| method | target sparsity | work removed | avg acc | retention | above-chance retention | "
                 "WikiText-2 ppl | ppl ratio | KL to dense |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    rows = sorted(summary["rows"], key=lambda r: (r["sparsity"] or 0, r["method"] != "dense", r["method"]))
    for r in rows:
        lines.append(f"| {r['method']} | {_f(r['sparsity'], True)}% | {_f(r['work_removed'], True)}% | "
                     f"{_f(r['average'], True)} | {_f(r['retention'], True)}% | {_f(r['above_chance_retention'], True)}% | "
                     f"{_f(r['wikitext_ppl'])} | {_f(r['ppl_ratio'])} | {_f(r['kl_to_dense'], digits=3)} |")
    lines += ["", "| method | sparsity | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for r in rows:
        lines.append(f"| {r['method']} | {_f(r['sparsity'], True)}% | " +
                     " | ".join(_f(r["tasks"][t], True) for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method = defaultdict(list)
    for r in summary["rows"]:
        if r["method"] != "dense":
            by_method[r["method"]].append(r)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))
    methods = sorted(by_method)
    # one colour per method (tab10 repeats after 10; tab20 has 20), markers cycle too, so no two
    # methods look alike; single-level rows (ablations) are points, not lines
    colours = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    markers = "os^Dv<>pPX*h"
    for key, ax, title in (("retention", axes[0], "retention (pruned / dense avg acc)"),
                           ("above_chance_retention", axes[1], "above-chance retention"),
                           ("ppl_ratio", axes[2], "WikiText-2 perplexity ratio (log)")):
        for i, method in enumerate(methods):
            pts = sorted((r["sparsity"] if r["sparsity"] is not None else r["work_removed"], r[key])
                         for r in by_method[method] if r[key] is not None)
            if pts:
                ax.plot([100 * x for x, _ in pts], [y if key == "ppl_ratio" else 100 * y for _, y in pts],
                        marker=markers[i % len(markers)], color=colours(i % colours.N), label=method,
                        linestyle="-" if len(pts) > 1 else "none", markersize=6 if len(pts) > 1 else 8)
        ax.set_xlabel("target sparsity (token, block work removed), %")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key == "ppl_ratio":
            ax.set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(results_dir: str | Path, out_dir: str | Path) -> dict:
    dense, runs = read_runs(results_dir)
    summary = summarise(dense, runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(summary))
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out / "retention.png")
    return summary
