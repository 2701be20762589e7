"""How much a draft could accept when sampling: the target itself as the draft (an oracle).

At temperature T > 0 a tree of distinct candidates accepts a child with the target's probability
of it (recursive rejection), so tau is bounded by how much of the target's probability mass the
tree covers. With a second copy of the target as the draft (``method=model``) the proposer ranks
candidates by the exact target distribution: the tau it reaches is what a perfect draft would
reach with that tree. The trained drafts run on the same
questions and seeds, every method with the same fixed tree.

  python benchmarks/sampling_ceiling.py --per-category 1 --temperature 1 --seeds 3 \\
      --tree 59/6/10 --tree 8/4/2 --out runs/sampling_ceiling
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
from draft_tau import pick_questions  # noqa: E402  (benchmarks/ is the script's directory)

from turbolm import encode_prompt, load_target
from turbolm.core.generation import SamplingParams
from turbolm.core.machine import describe_machine
from turbolm.core.models import converted_gguf, default_gguf_path
from turbolm.speculative.factory import DecoderSpec, build_decoder

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", default=str(ROOT / ".." / "shared" / "data" / "spec_bench" / "question.jsonl"))
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, default=3, help="sampling runs per question and method")
    ap.add_argument("--tree", action="append", default=None, metavar="TOTAL/DEPTH/TOPK",
                    help="fixed tree(s), turbolm's convention (nodes without the root / levels / branches); "
                         "default 59/6/10 (EAGLE-2's 60 / 5 / 10)")
    ap.add_argument("--methods", default="oracle,jakiro,eagle2", help="comma list of oracle, jakiro, eagle2")
    ap.add_argument("--out", default="runs/sampling_ceiling")
    args = ap.parse_args()

    target, tok = load_target(None)
    specs = {"oracle": dict(method="model", draft=str(converted_gguf(default_gguf_path()))), "jakiro": dict(method="jakiro"),
             "eagle2": dict(method="eagle2")}
    trees = [tuple(int(x) for x in t.split("/")) for t in (args.tree or ["59/6/10"])]
    methods = {}
    for name in args.methods.split(","):
        for total, depth, top_k in trees:
            spec = DecoderSpec(**specs[name], tree="fixed", total_tokens=total, depth=depth, top_k=top_k)
            methods[f"{name} {total}/{depth}/{top_k}"] = build_decoder(target, tok, spec)
    questions = pick_questions(Path(args.questions), 0, args.per_category)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": describe_machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
               "seeds": args.seeds}
    print(json.dumps(machine), flush=True)
    taus = collections.defaultdict(list)
    with open(out / "results.jsonl", "w") as log:
        for q in questions:
            ids = encode_prompt(tok, q["turns"][0])
            for seed in range(args.seeds):
                for name, decoder in methods.items():
                    sampling = SamplingParams(temperature=args.temperature, seed=seed)
                    res = decoder.generate(ids, max_new_tokens=args.max_new_tokens, sampling=sampling)
                    taus[name].append(res.tau)
                    row = {"question_id": q["question_id"], "category": q["group"], "seed": seed,
                           "method": name, "tau": res.tau, "tokens": len(res.token_ids)}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    print(json.dumps(row), flush=True)
    report = {"machine": machine, "tau": {name: sum(v) / len(v) for name, v in taus.items()},
              "runs": {name: len(v) for name, v in taus.items()}}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print("| method and tree | mean tau |\n|---|---|")
    for name, t in report["tau"].items():
        print(f"| {name} | {t:.2f} |")


if __name__ == "__main__":
    main()
