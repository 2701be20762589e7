"""Spec-Bench report: per-category and overall numbers from the raw records, as JSON, Markdown
tables and PNG plots."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..core.io import write_text

#: methods that verify nothing: their accepted-length histogram is all ones
NON_SPECULATIVE = ("vanilla", "hf-generate", "llama-cpp")


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _rate(rows: list[dict]) -> float:
    """All the tokens over all the seconds."""
    return sum(r["new_tokens"] for r in rows) / sum(r["seconds"] for r in rows)


def _group(rows: list[dict], vanilla: dict, greedy: bool) -> dict:
    """Numbers for one method over some questions; ``vanilla`` maps question id -> vanilla's record."""
    hist: Counter | None = Counter()
    for r in rows:
        h = r["accepted_length_histogram"]
        hist = None if h is None or hist is None else hist + Counter({int(k): v for k, v in h.items()})
    steps = sum(hist.values()) if hist is not None else 0
    tau = sum(k * c for k, c in hist.items()) / steps if steps else _mean(r["tau"] for r in rows)
    base = [vanilla[r["question_id"]] for r in rows]
    out = {
        "questions": len(rows),
        "speedup": _mean(r["tokens_per_second"] / v["tokens_per_second"] for r, v in zip(rows, base)),
        # A robustness check on the mean of ratios: one question timed while the machine was busy
        # moves the two apart.
        "speedup_of_totals": _rate(rows) / _rate(base) if rows else None,
        "tau": tau,
        "tokens_per_second": _mean(r["tokens_per_second"] for r in rows),
        "new_tokens": sum(r["new_tokens"] for r in rows),
        "seconds": sum(r["seconds"] for r in rows),
        "target_forwards": sum(r["target_forwards"] for r in rows),
        "accepted_length_histogram": None if hist is None else {str(k): hist[k] for k in sorted(hist)},
    }
    if greedy:
        differing = [{"question_id": r["question_id"], **r["first_difference"]} for r in rows if r.get("first_difference")]
        out.update(differ=len(differing), differing=differing)
    else:
        out.update(differ=None, differing=None)
    return out


def summarise(records: list[dict], methods: list[str], greedy: bool, ours: Sequence[str] = ()) -> dict:
    """Per method: per category and overall speedup, tau, tokens/s, totals, differing outputs.

    Speedup (Spec-Bench): the mean over questions of the per-question tokens/s ratio method /
    vanilla. tau: tokens per target forward after the prefill, over all steps of the group.
    """
    vanilla = {r["question_id"]: r for r in records if r["method"] == "vanilla"}
    categories = list(dict.fromkeys(r["category"] for r in records))
    per_method = {}
    for m in methods:
        rows = [r for r in records if r["method"] == m]
        per_method[m] = {
            "ours": m in ours,
            "overall": _group(rows, vanilla, greedy),
            "categories": {c: _group([r for r in rows if r["category"] == c], vanilla, greedy) for c in categories},
        }
    ours_differ = sum(v["overall"]["differ"] for v in per_method.values() if v["ours"]) if greedy else None
    return {
        "questions_measured": len(vanilla),
        "categories": categories,
        "methods": per_method,
        "lossless": {"checked": greedy, "ours_differing": ours_differ, "ok": None if not greedy else ours_differ == 0},
    }


# --- files ----------------------------------------------------------------------------------


def write_report(report: dict, out: Path) -> None:
    out = Path(out)
    write_text(out / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    plots = plot_report(report, out) if report["questions_measured"] else []
    write_text(out / "report.md", markdown(report, plots))


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def busy_machine(m: dict) -> float | None:
    """Roughly how many CPUs other processes kept busy during the run: measured from /proc/stat
    less this process's own CPU time where the report has it (``other_cpus_busy``), else from the
    1-minute load average (before the run, and after it less torch's own threads); None if the OS
    does not say."""
    if m.get("other_cpus_busy") is not None:
        return m["other_cpus_busy"]
    start, end = m.get("load_average_start"), m.get("load_average_end")
    if not start or not end:
        return None
    return max(start[0], end[0] - m["torch_threads"], 0.0)


def machine_lines(report: dict) -> list[str]:
    m, c = report["machine"], report["config"]
    gpu = m.get("gpu") or "none"
    lines = [
        f"- machine: {m['cpu']} ({m['cpu_count']} logical CPUs), GPU: {gpu}, torch threads: {m['torch_threads']}",
        f"- software: torch {m['torch']}, transformers {m['transformers']}, turbolm {m['turbolm']}, Python {m['python']}",
        f"- model: {m.get('model')}, dtype {m.get('dtype')}, device {m.get('device')}"
        + (", fast CPU kernels (oneDNN, packed weights) for every method" if m.get("fast_cpu") else ""),
        f"- decoding: max {c['max_new_tokens']} new tokens per turn, temperature {c['temperature']}"
        + (" (greedy)" if c["temperature"] == 0 else f" (sampling, seed {c['seed']})")
        + f", warm-up {c['warmup']} question(s) per method (untimed, first turn, <= {c['warmup_max_new_tokens']} tokens)",
        "- all methods in one process, interleaved per question (method order rotating), wall time per answer",
    ]
    lines += outside_lines(report)
    busy = busy_machine(m)
    if busy is not None:
        if m.get("other_cpus_busy") is not None:
            lines.append(f"- CPUs kept busy by other processes during the run (/proc/stat less this process): {busy:.2f}")
        else:
            lines.append(f"- load average (1 min): {m['load_average_start'][0]} before the run, {m['load_average_end'][0]} after it")
        if busy > 0.5:
            lines.append(f"- **warning: other processes kept about {busy:.1f} CPU(s) busy during the run; "
                         "timings (not tau or outputs) may be unreliable**")
    return lines


def outside_lines(report: dict) -> list[str]:
    """What the methods that are not turbolm's run on (llama.cpp: its build, weights, threads)."""
    lines = []
    for name, about in (report.get("outside") or {}).items():
        if about.get("kind") != "llama.cpp":
            continue
        lookup = (f", its prompt-lookup decoding ({about['prompt_lookup_tokens']} draft tokens per step)"
                  if about.get("prompt_lookup_tokens") else "")
        lines.append(f"- {name}: llama.cpp (llama-cpp-python {about.get('llama_cpp_python')}) on "
                     f"{Path(about['gguf']).name}, quantised {about.get('weights')} weights (turbolm runs the same "
                     f"file dequantised to {report['machine'].get('dtype')}), {about.get('threads')} threads{lookup}; "
                     "the same prompt token ids, greedy, its time includes its prefill (no prompt cache between "
                     "calls); not one of turbolm's methods: its outputs may differ from vanilla's")
    return lines


def _not_ours_note(name: str, report: dict) -> str:
    about = (report.get("outside") or {}).get(name)
    if about and about.get("kind") == "llama.cpp":
        return f" (llama.cpp on quantised {about.get('weights')} weights, not turbolm's)"
    return " (transformers' own decoding, not turbolm's)"


def markdown(report: dict, plots: list[str]) -> str:
    q, methods, cats = report["questions"], report["methods"], report["categories"]
    lines = ["# Spec-Bench: speculative decoding", ""] + machine_lines(report)
    lines.append(f"- questions: {q['measured']} measured of {q['selected']} selected from {q['file']} "
                 f"({q['valid']} valid rows"
                 + (f"; skipped {sum(q['skipped_rows'].values())} malformed: "
                    + ", ".join(f"{n} {why}" for why, n in q["skipped_rows"].items()) if q["skipped_rows"] else "") + ")")
    for s in q["skipped_questions"]:
        lines.append(f"- question {s['question_id']} skipped: {s['reason']}")
    if report["trees"]:
        lines.append("- draft trees (nodes / depth / top-k; nodes excluding the root, depth in levels below it: "
                     "EAGLE-2's 60 / 5 / 10 is 59 / 6 / 10 here; hybrid: the draft's tree, a merge adds up to 10 n-gram "
                     "nodes): "
                     + ", ".join(f"{n} {t['total_tokens']}/{t['depth']}/{t['top_k']}" for n, t in report["trees"].items())
                     + f"; hf-prompt-lookup: prompt_lookup_num_tokens={report['config']['hf_prompt_lookup_num_tokens']}")
    if report["interrupted"]:
        lines += ["", f"**Interrupted**: the numbers cover the {q['measured']} question(s) every method finished."]
    if not q["measured"]:
        return "\n".join(lines + ["", "No question was measured."]) + "\n"

    lines += ["", "Speedup: mean over questions of the per-question tokens/s ratio method / vanilla (Spec-Bench); "
              "speedup of totals: all its tokens / all its seconds, over vanilla's (far apart: noisy timings). "
              "tau: tokens per target forward after the prefill (mean accepted length, bonus token included).", "",
              "## Overall", ""]
    lines += _table(
        ["method", "speedup", "speedup of totals", "tau", "tokens/s", "new tokens", "seconds", "target forwards",
         "differ from vanilla"],
        [[name, _fmt(o["speedup"], ".2f", "x"), _fmt(o["speedup_of_totals"], ".2f", "x"), _fmt(o["tau"], ".2f"),
          _fmt(o["tokens_per_second"], ".1f"),
          str(o["new_tokens"]), _fmt(o["seconds"], ".1f"), str(o["target_forwards"]), _fmt(o["differ"], "d")]
         for name, v in methods.items() for o in [v["overall"]]])
    for title, key, spec, suffix in (("Speedup vs vanilla", "speedup", ".2f", "x"), ("tau", "tau", ".2f", ""),
                                     ("tokens/s", "tokens_per_second", ".1f", "")):
        lines += ["", f"## {title} per category", ""]
        lines += _table(["method"] + cats + ["overall"],
                        [[name] + [_fmt(v["categories"][c][key], spec, suffix) for c in cats]
                         + [_fmt(v["overall"][key], spec, suffix)] for name, v in methods.items()])
    lines += ["", "## Outputs differing from vanilla", ""]
    loss = report["lossless"]
    if not loss["checked"]:
        lines.append("Not checked: at temperature > 0 outputs are samples, not comparable token for token.")
    else:
        ours = [n for n, v in methods.items() if v["ours"] and n != "vanilla"]
        verdict = ("none: every one of turbolm's methods reproduced vanilla's token ids" if loss["ok"]
                   else f"**{loss['ours_differing']} output(s) of turbolm's methods differ from vanilla (a losslessness failure)**")
        lines.append(f"turbolm's methods ({', '.join(ours) or 'none besides vanilla'}): {verdict}.")
        if not loss["ok"] and report["machine"].get("dtype") in ("bfloat16", "float16", "int8", "int4"):
            lines.append(f"Note: in {report['machine']['dtype']} a forward over several tokens rounds differently from "
                         "one over a single token, so near-ties between the top two tokens can break differently "
                         "(transformers' own prompt lookup, where run, shows the same); run the benchmark in float32 "
                         "to check losslessness exactly.")
        for name, v in methods.items():
            for d in v["overall"]["differing"]:
                note = "" if v["ours"] else _not_ours_note(name, report)
                lines.append(f"- {name}: question {d['question_id']}, turn {d['turn'] + 1}, first at token {d['position']}"
                             f"{_gap_note(d, report['machine'].get('dtype'))}{note}")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _gap_note(d: dict, dtype: str | None) -> str:
    """How near a tie the differing choice was (``specbench.logit_gaps``), if measured."""
    gaps = [f"{d[k]:+.3f} in {name}" for k, name in (("logit_gap", dtype), ("logit_gap_float32", "float32"))
            if d.get(k) is not None]
    return f" (logit(vanilla's) - logit(its token): {', '.join(gaps)})" if gaps else ""


def plot_report(report: dict, out: Path) -> list[str]:
    """speedup.png (per category, grouped by method) and accepted_length.png; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    methods = {n: v for n, v in report["methods"].items() if n != "vanilla"}
    names = []
    if methods:
        groups = report["categories"] + ["overall"]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(methods)) / 2), 4))
        width = 0.8 / len(methods)
        for i, (name, v) in enumerate(methods.items()):
            ys = [v["categories"][g]["speedup"] if g != "overall" else v["overall"]["speedup"] for g in groups]
            ax.bar([x + (i - (len(methods) - 1) / 2) * width for x in range(len(groups))], ys, width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
        ax.set_ylabel("speedup vs vanilla (tokens/s ratio)")
        ax.set_title(f"Spec-Bench speedup, {report['machine'].get('model')} ({report['machine'].get('device')})")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / "speedup.png", dpi=120)
        plt.close(fig)
        names.append("speedup.png")

    spec = {n: v["overall"] for n, v in report["methods"].items()
            if n not in NON_SPECULATIVE and v["overall"]["accepted_length_histogram"]}
    if spec:
        fig, axes = plt.subplots(1, len(spec), figsize=(3.2 * len(spec), 3), squeeze=False, sharey=True)
        for ax, (name, o) in zip(axes[0], spec.items()):
            h = {int(k): c for k, c in o["accepted_length_histogram"].items()}
            total = sum(h.values())
            ax.bar(list(h), [c / total for c in h.values()])
            ax.set_title(f"{name} (tau {o['tau']:.2f})", fontsize="medium")
            ax.set_xlabel("tokens per target forward")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0][0].set_ylabel("fraction of steps")
        fig.tight_layout()
        fig.savefig(out / "accepted_length.png", dpi=120)
        plt.close(fig)
        names.append("accepted_length.png")
    return names
