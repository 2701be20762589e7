"""Decoding steps after a pruned prefill: the prompt's cache compacted vs with masked placeholders.

    python benchmarks/pruned_cache_steps.py                     # 30% pruner, 900 tokens of general text
    python benchmarks/pruned_cache_steps.py --pruner turbolm/checkpoints/ftp-smollm2-135m-s40 --tokens 1800

One ``prefill_only`` pruned prefill; then the same cache in its two forms - compacted (each block
holds only its kept tokens' entries, what one sequence gets) and expanded (an entry per position,
placeholders masked, what a batch of prompts gets) - runs one forward of 1, 4, 10 and 30 tokens
(a causal tree mask, as a speculative verification) again and again, the two forms interleaved;
medians. Prints the machine, the entries per block and the largest logit difference between the
forms (rounding: the same attention over a different layout of keys).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turbolm.core.generation import forward  # noqa: E402
from turbolm.core.kernels import apply_fast_cpu  # noqa: E402
from turbolm.core.machine import describe_machine  # noqa: E402
from turbolm.core.models import load_target  # noqa: E402
from turbolm.pruning import PrunerSpec, build_pruned  # noqa: E402
from turbolm.speculative.cache import new_tree_cache, truncate  # noqa: E402


def tree_mask(n_past: int, rows: int) -> torch.Tensor:
    mask = torch.zeros(1, 1, rows, n_past + rows)
    mask[..., n_past:] = torch.full((rows, rows), torch.finfo(torch.float32).min).triu(1)
    return mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pruner", default="turbolm/checkpoints/ftp-smollm2-135m-s30")
    ap.add_argument("--text", default="../shared/data/text/enwiki_sample_8mb.jsonl")
    ap.add_argument("--tokens", type=int, default=900, help="prompt length")
    ap.add_argument("--rows", default="1,4,10,30", help="tokens per forward after the prompt")
    ap.add_argument("--repeats", type=int, default=24)
    args = ap.parse_args()

    model, tokenizer = load_target(None)
    apply_fast_cpu(model, "auto")
    pruned = build_pruned(model, tokenizer, PrunerSpec(checkpoint=args.pruner, prefill_only=True))
    text = "\n".join(json.loads(line)["text"] for line in Path(args.text).open().readlines()[:20])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    n = ids.shape[1]
    result = {"machine": describe_machine(), "pruner": args.pruner, "prompt_tokens": n, "steps_ms": {}}
    with torch.inference_mode(), pruned:
        compacted = new_tree_cache()
        forward(model, ids, compacted, logits_to_keep=1)
        expanded = copy.deepcopy(compacted)
        for layer in expanded.layers:
            layer.expand()
        result["entries_per_block"] = {"compacted": [layer.keys.shape[2] for layer in compacted.layers],
                                       "placeholders": expanded.layers[0].keys.shape[2]}
        forms = {"compacted": compacted, "placeholders": expanded}
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randint(100, 1000, (1, rows))
            kw = {} if rows == 1 else {"attention_mask": tree_mask(n, rows),
                                       "position_ids": torch.arange(n, n + rows)[None]}
            times, logits = {f: [] for f in forms}, {}
            for _ in range(args.repeats + 4):
                for name, cache in forms.items():
                    start = time.perf_counter()
                    logits[name] = forward(model, x, cache, **kw).logits
                    times[name].append(time.perf_counter() - start)
                    truncate(cache, n)
            ms = {f: round(statistics.median(t[4:]) * 1e3, 2) for f, t in times.items()}
            diff = (logits["compacted"] - logits["placeholders"]).abs().max().item()
            result["steps_ms"][rows] = {**ms, "max_logit_diff": diff}
            print(f"{rows} tokens after {n}: compacted {ms['compacted']} ms, placeholders {ms['placeholders']} ms "
                  f"({ms['placeholders'] / ms['compacted']:.2f}x); largest logit difference {diff:.1e}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
