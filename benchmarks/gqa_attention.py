"""Tree verification forwards with transformers' sdpa against turbolm_sdpa (core/attention.py),
side by side on the default model: the median of 12 forwards of N tree nodes (a chain mask)
after a prefilled context, for a few context lengths and node counts.

    python benchmarks/gqa_attention.py

Prints the machine, then per (context, nodes) the milliseconds of each and the ratio.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from turbolm import load_target  # noqa: E402
from turbolm.core.generation import forward, new_cache  # noqa: E402
from turbolm.core.kernels import apply_fast_cpu  # noqa: E402
from turbolm.core.machine import describe_machine  # noqa: E402
from turbolm.speculative.cache import truncate  # noqa: E402

TEXT = Path(__file__).resolve().parents[2] / "shared/data/language_modeling/wikitext-2-raw/wiki.test.raw"


def main() -> None:
    model, tok = load_target(None)
    apply_fast_cpu(model, "auto")
    print(describe_machine(), flush=True)
    allids = tok(TEXT.read_text()[:20000], return_tensors="pt")["input_ids"]
    for ctx in (100, 900, 1800):
        ids = allids[:, :ctx]
        for nodes in (1, 10, 30):
            mask = torch.zeros(1, 1, nodes, ctx + nodes)
            mask[..., ctx:] = torch.zeros(nodes, nodes).masked_fill(
                torch.ones(nodes, nodes, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
            pos = torch.arange(ctx, ctx + nodes)[None]
            res = {}
            for impl in ("sdpa", "turbolm_sdpa"):
                model.set_attn_implementation(impl)
                with torch.inference_mode():
                    cache = new_cache(model)
                    forward(model, ids, cache, logits_to_keep=1)
                    times = []
                    for _ in range(12):
                        t0 = time.perf_counter()
                        forward(model, allids[:, ctx:ctx + nodes], cache, attention_mask=mask, position_ids=pos)
                        times.append(time.perf_counter() - t0)
                        truncate(cache, ctx)
                res[impl] = sorted(times)[6] * 1000
            print(f"context {ctx:5d}, {nodes:2d} nodes: sdpa {res['sdpa']:.1f} ms, turbolm_sdpa "
                  f"{res['turbolm_sdpa']:.1f} ms, {res['sdpa'] / res['turbolm_sdpa']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
