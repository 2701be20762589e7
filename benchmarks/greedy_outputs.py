"""Greedy outputs of every method on Spec-Bench prompts, through the command line, to check that a
change of the code left them token-identical.

    python benchmarks/greedy_outputs.py --out before.json            # on the old code
    python benchmarks/greedy_outputs.py --out after.json --compare before.json

Methods: vanilla, prompt lookup, the shipped Jakiro and EAGLE-2 drafts (fixed trees), a draft made
of the target's first layers, and the three shipped FTP pruners (`turbolm prune generate`). The
prompts are the first turns of ``--prompts`` questions spread evenly over the questions file. Only
the command line is used, so the script works unchanged on any version of the code.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

METHODS = {
    "vanilla": ["generate", "--speculative", "none"],
    "prompt-lookup": ["generate", "--speculative", "prompt-lookup"],
    "jakiro": ["generate", "--speculative", "jakiro", "--tree", "fixed"],
    "eagle2": ["generate", "--speculative", "eagle2", "--tree", "fixed"],
    "model-8-layers": ["generate", "--speculative", "model", "--draft-layers", "8", "--tree", "fixed"],
    "ftp-22": ["prune", "generate", "--pruner", "turbolm/checkpoints/ftp-smollm2-135m-s22"],
    "ftp-30": ["prune", "generate", "--pruner", "turbolm/checkpoints/ftp-smollm2-135m-s30"],
    "ftp-40": ["prune", "generate", "--pruner", "turbolm/checkpoints/ftp-smollm2-135m-s40"],
}


def prompts(path: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    step = max(1, len(rows) // n)
    return [rows[i * step]["turns"][0] for i in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", default="../shared/data/spec_bench/question.jsonl")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", required=True, help="JSON file: {method: [token ids per prompt]} (resumable)")
    ap.add_argument("--compare", default=None, help="an earlier --out file: print where the outputs differ")
    args = ap.parse_args()

    out = Path(args.out)
    done = json.loads(out.read_text()) if out.is_file() else {}
    turbolm = str(Path(sys.executable).with_name("turbolm"))
    for name in args.methods.split(","):
        if len(done.get(name, [])) == args.prompts:
            continue
        done[name] = []
        for p in prompts(Path(args.questions), args.prompts):
            cmd = [turbolm, *METHODS[name], "--prompt", p, "--max-new-tokens", str(args.max_new_tokens), "--json"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"{name}: {res.stderr.strip().splitlines()[-1]}")
            done[name].append(json.loads(res.stdout.strip().splitlines()[-1])["token_ids"])
        out.write_text(json.dumps(done))
        print(f"{name}: {sum(map(len, done[name]))} tokens", flush=True)
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        differ = [m for m in done if m in old and old[m] != done[m]]
        print(f"compared {len([m for m in done if m in old])} methods x {args.prompts} prompts with {args.compare}: "
              + ("all token-identical" if not differ else f"DIFFERENT: {', '.join(differ)}"))
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
