"""Acceptance (tau) and speed of trained drafts on a category-balanced Spec-Bench subset.

Every method runs on the same questions, interleaved per question (vanilla first), greedy,
first turn only, the same tree settings for every draft. Reports tau per task group and
overall, tokens/s against vanilla measured in the same run, and checks that every
speculative output equals vanilla's token for token.

  python benchmarks/draft_tau.py --draft jakiro-mixture=turbolm/checkpoints/jakiro-smollm2-135m:mixture \\
      --draft eagle2=turbolm/checkpoints/eagle2-smollm2-135m --per-group 10 --out runs/draft_tau
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch

from turbolm import encode_prompt, generate, load_target
from turbolm.bench.specbench import load_questions, select_questions
from turbolm.core.machine import describe_machine
from turbolm.speculative import SpeculativeGenerator, TreeConfig
from turbolm.speculative.draft.model import load_draft
from turbolm.speculative.proposers.hybrid import HybridProposer
from turbolm.speculative.proposers.jakiro import JakiroProposer
from turbolm.speculative.proposers.prompt_lookup import PromptLookupProposer

GROUPS = {  # Spec-Bench's six task groups; MT-bench's eight categories form one
    **{c: "mt_bench" for c in ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")},
    "translation": "translation", "summarization": "summarization", "qa": "qa",
    "math_reasoning": "math_reasoning", "rag": "rag",
}


def pick_questions(path: Path, per_group: int, per_category: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if per_category:  # the first N of each of the 13 categories (MT-bench's 8 and the other 5), as bench spec picks them
        picked = select_questions(load_questions(path)[0], None, None, per_category)
        by_id = {r["question_id"]: r for r in rows}
        return [{**by_id[q.question_id], "group": q.category} for q in picked]
    by_group = collections.defaultdict(list)
    for r in rows:
        by_group[GROUPS[r["category"]]].append(r)
    out = []
    for group, items in by_group.items():
        step = max(1, len(items) // per_group)  # spread over the group (MT-bench: over its categories)
        out += [{**r, "group": group} for r in items[::step][:per_group]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "spec_bench" / "question.jsonl"))
    ap.add_argument("--draft", action="append", required=True, metavar="NAME=DIR[:MODE][:autoregressive]",
                    help="a draft checkpoint (repeatable); MODE: mixture | decoupled (a Jakiro draft's candidates); "
                         "autoregressive: a Jakiro draft's last level from one more forward instead of its "
                         "contrastive branch; a NAME starting with 'hybrid' merges prompt lookup into its tree")
    ap.add_argument("--prompt-lookup", action="store_true", help="also prompt lookup (its own default tree)")
    ap.add_argument("--per-group", type=int, default=10)
    ap.add_argument("--per-category", type=int, default=0, help="instead of --per-group: the first N of each category")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--total-tokens", type=int, default=60)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--out", default="runs/draft_tau")
    ap.add_argument("--model", default=None, help="target source (default: the default model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    target, tok = load_target(args.model, dtype=args.dtype, device=args.device)
    tree = TreeConfig(args.total_tokens, args.depth, args.top_k)
    methods = {}
    for spec in args.draft:
        name, _, where = spec.partition("=")
        path, *options = where.split(":")
        autoregressive = "autoregressive" in options
        mode = next((o for o in options if o != "autoregressive"), None)
        draft = load_draft(path, target, overrides={"candidate_mode": mode} if mode else None)
        proposer = JakiroProposer(draft, target, tree, hybrid=not autoregressive)
        if name.startswith("hybrid"):  # prompt lookup merged into the draft's tree
            proposer = HybridProposer(proposer, mode="merge")
        methods[name] = SpeculativeGenerator(target, tok, proposer)
    if args.prompt_lookup:
        methods["prompt-lookup"] = SpeculativeGenerator(target, tok, PromptLookupProposer())
    questions = pick_questions(Path(args.questions), args.per_group, args.per_category)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": describe_machine(), "threads": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name(0) if target.device.type == "cuda" else None,
               "torch": torch.__version__, "dtype": str(target.dtype), "tree": vars(tree), "max_new_tokens": args.max_new_tokens}
    print(json.dumps(machine))
    rows = []
    generate(target, tok, encode_prompt(tok, "Hello"), max_new_tokens=8)  # warm-up
    for q in questions:
        ids = encode_prompt(tok, q["turns"][0])
        ref = generate(target, tok, ids, max_new_tokens=args.max_new_tokens)
        row = {"question_id": q["question_id"], "group": q["group"], "vanilla_tps": ref.tokens_per_second}
        for name, gen in methods.items():
            res = gen.generate(ids, max_new_tokens=args.max_new_tokens)
            row[name] = {"tau": res.tau, "tps": res.tokens_per_second, "same": res.token_ids == ref.token_ids}
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = {"machine": machine, "questions": [r["question_id"] for r in rows], "methods": {}}
    for name in methods:
        per_group = collections.defaultdict(list)
        for r in rows:
            per_group[r["group"]].append(r)
            per_group["overall"].append(r)
        report["methods"][name] = {
            g: {"tau": sum(r[name]["tau"] for r in rs) / len(rs),
                "speedup": sum(r[name]["tps"] / r["vanilla_tps"] for r in rs) / len(rs),
                "differ": [r["question_id"] for r in rs if not r[name]["same"]]}
            for g, rs in per_group.items()
        }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    groups = sorted({r["group"] for r in rows}) + ["overall"]
    lines = ["| method | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for name, res in report["methods"].items():
        lines.append(f"| {name} tau | " + " | ".join(f"{res[g]['tau']:.2f}" for g in groups) + " |")
        lines.append(f"| {name} speedup | " + " | ".join(f"{res[g]['speedup']:.2f}x" for g in groups) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
