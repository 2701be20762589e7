"""transformers' DynamicCache (concatenates at every forward) against turbolm's in-place cache
(core.kvcache.growing_cache), side by side on the default model: ms per one-token forward after a
prompt of C random tokens, best of two rounds of 48 steps each, and whether tokens and logits agree.

    python benchmarks/kv_cache.py            # contexts 100, 600, 1500; float32; torch threads as set
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import DynamicCache  # noqa: E402

from turbolm.core.generation import forward  # noqa: E402
from turbolm.core.kvcache import growing_cache  # noqa: E402
from turbolm.core.machine import describe_machine  # noqa: E402
from turbolm.core.models import load_target  # noqa: E402

STEPS = 48


def main() -> None:
    model, _ = load_target(None)
    m = describe_machine()
    print(f"{m['cpu']} ({m['cpu_count']} CPUs), torch threads {m['torch_threads']}, float32, {STEPS} steps")
    makers = {"dynamic": lambda: DynamicCache(config=model.config), "in place": lambda: growing_cache(model.config)}
    for ctx in (100, 600, 1500):
        ids = torch.randint(100, 40000, (1, ctx), generator=torch.Generator().manual_seed(ctx))
        best, outs = {}, {}
        for _ in range(2):
            for name, make in makers.items():
                with torch.inference_mode():
                    cache = make()
                    out = forward(model, ids, cache, logits_to_keep=1)
                    nxt, tokens = out.logits[:, -1:].argmax(-1), []
                    start = time.perf_counter()
                    for _ in range(STEPS):
                        out = forward(model, nxt, cache, logits_to_keep=1)
                        nxt = out.logits[:, -1:].argmax(-1)
                        tokens.append(int(nxt))
                    ms = (time.perf_counter() - start) / STEPS * 1000
                best[name] = min(best.get(name, ms), ms)
                outs[name] = (tokens, out.logits)
        same = outs["dynamic"][0] == outs["in place"][0] and torch.equal(outs["dynamic"][1], outs["in place"][1])
        print(f"context {ctx}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in best.items()) + f"; identical: {same}")


if __name__ == "__main__":
    main()
