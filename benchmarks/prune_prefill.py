"""Prefill wall-clock of token-skipping vs the dense model, side by side in one process.

For each prompt length and sparsity: dense and pruned prefills interleaved (after a warm-up),
median of --repeat runs, and the token sparsity actually achieved. Routers: the static one
with a uniform schedule at 20/30/40% (``--sparsity``), and any pruner checkpoints given with
--pruner (the shipped ones by default, when present). Prints the machine, a Markdown table,
and writes JSON with --out.

    python benchmarks/prune_prefill.py                      # 512/1024/2048 tokens, 0/20/30/40%
    python benchmarks/prune_prefill.py --lengths 1024 --repeat 5 --out runs/prune_prefill.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turbolm.core.machine import describe_machine  # noqa: E402
from turbolm.core.models import (
    describe_model,  # noqa: E402
    load_target,  # noqa: E402
)
from turbolm.pruning import StaticRouter, TokenPruner  # noqa: E402
from turbolm.pruning.bench import prefill_benchmark, prompt_ids  # noqa: E402
from turbolm.pruning.checkpoint import SHIPPED, load_pruner  # noqa: E402
from turbolm.pruning.skipping import decoder_layers  # noqa: E402

DECODE_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a short poem about the sea.",
    "Explain in three sentences why the sky is blue.",
]


def decode_rows(model, tokenizer, pruners, max_new_tokens: int) -> list[dict]:
    """Greedy decoding with each trained pruner: blocks skipped by new tokens, and how many of the
    generated tokens match the dense model's (position by position)."""
    from turbolm.core.chat import encode_prompt
    from turbolm.core.generation import generate

    prompts = [encode_prompt(tokenizer, p) for p in DECODE_PROMPTS]
    dense = [generate(model, tokenizer, ids, max_new_tokens=max_new_tokens) for ids in prompts]
    out = []
    print("\n| pruner | blocks skipped by new tokens | prefill sparsity | new tokens equal to dense |\n|---|---|---|---|")
    for name, pruner in pruners:
        if not name.startswith("learned"):
            continue
        pruner.reset_stats()
        same = total = 0
        with pruner:
            for ids, ref in zip(prompts, dense):
                res = generate(model, tokenizer, ids, max_new_tokens=max_new_tokens)
                same += sum(a == b for a, b in zip(res.token_ids, ref.token_ids))
                total += len(ref.token_ids)
        row = {"pruner": name, **pruner.stats.to_json(), "tokens_equal_to_dense": same, "tokens": total}
        out.append(row)
        print(f"| {name} | {row['decode_sparsity']:.1%} | {row['prefill_sparsity']:.1%} | {same}/{total} |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--lengths", default="512,1024,2048")
    ap.add_argument("--sparsity", default="0,0.2,0.3,0.4", help="static-router uniform sparsities (0 = wrapper overhead)")
    ap.add_argument("--pruner", action="append", default=None, help="pruner checkpoint (repeatable; default: the shipped ones)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--text-file", default=None)
    ap.add_argument("--decode-tokens", type=int, default=32,
                    help="greedy tokens per built-in prompt for the decode statistics of trained pruners (0: skip)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    model, tokenizer = load_target(args.model, dtype=args.dtype, device=args.device)
    n = len(decoder_layers(model))
    pruners = [(f"static {float(s):.0%}", TokenPruner(model, StaticRouter(), [float(s)] * n))
               for s in args.sparsity.split(",")]
    # The same with the attention factor computed (as a learned router needs): its overhead.
    pruners += [(f"static {float(s):.0%} + factors", TokenPruner(model, StaticRouter(), [float(s)] * n, track_attention=True))
                for s in args.sparsity.split(",")[:1] + args.sparsity.split(",")[2:3]]
    paths = args.pruner if args.pruner is not None else ([str(p) for p in sorted(SHIPPED.glob("ftp-*"))]
                                                          if args.model is None else [])
    for p in paths:
        pruners.append((f"learned {Path(p).name}", load_pruner(p, model)))
    machine = {**describe_machine(), **describe_model(model)}
    print("machine:", json.dumps(machine))
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        ids, source = prompt_ids(tokenizer, length, args.text_file)
        for name, pruner in pruners:
            row = {"router": name, **prefill_benchmark(model, pruner, ids, repeat=args.repeat)}
            rows.append(row)
            print(f"{length:>5} tokens  {name:<28} dense {row['dense_seconds']:.3f} s  pruned {row['pruned_seconds']:.3f} s  "
                  f"speed-up {row['speedup']:.2f}x  sparsity {row['token_sparsity']:.1%}", flush=True)
    print("\n| prompt tokens | router | token sparsity | dense s | pruned s | speed-up |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['prompt_length']} | {r['router']} | {r['token_sparsity']:.1%} | {r['dense_seconds']:.3f} | "
              f"{r['pruned_seconds']:.3f} | {r['speedup']:.2f}x |")
    decode = decode_rows(model, tokenizer, pruners, args.decode_tokens) if args.decode_tokens else []
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": machine, "text": source, "rows": rows, "decode": decode},
                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
