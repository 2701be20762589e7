"""What a reduced draft vocabulary saves at inference: time of one draft tree (propose) with
the full target vocabulary vs a reduced one, on the default model, same tree settings.

Timing only (the draft's weights do not change its cost), so untrained drafts are used.
  python benchmarks/draft_vocab_cost.py --vocab 0 8192 --total-tokens 60 --depth 5 --top-k 10
"""

import argparse
import platform
import statistics
import time

import torch

from turbolm import encode_prompt, load_target
from turbolm.core.generation import FeatureCapture
from turbolm.speculative import TreeConfig
from turbolm.speculative.draft.model import DraftConfig, DraftModel
from turbolm.speculative.proposers.jakiro import JakiroProposer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, nargs="+", default=[0, 8192])
    ap.add_argument("--total-tokens", type=int, default=60)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    target, tok = load_target()
    ids = encode_prompt(tok, "Write a short story about a lighthouse keeper.")
    with torch.inference_mode(), FeatureCapture(target) as cap:
        target(torch.tensor([ids]))
        feats = cap.features[0]
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"tree {args.total_tokens}/{args.depth}/{args.top_k}")
    for vocab in args.vocab:
        for arch in ("jakiro", "eagle2"):
            draft = DraftModel(DraftConfig.for_target(target, arch=arch, draft_vocab_size=vocab)).eval()
            if vocab:
                draft.draft_vocab.copy_(torch.arange(vocab))
            proposer = JakiroProposer(draft, target, TreeConfig(args.total_tokens, args.depth, args.top_k))
            times = []
            with torch.inference_mode():
                for r in range(args.repeats + 1):
                    proposer.start(ids[:-1], feats[:-1])
                    t0 = time.perf_counter()
                    proposer.propose(ids, max_depth=args.depth)
                    if r:
                        times.append(time.perf_counter() - t0)
            print(f"{arch:7s} vocab {vocab or 'full':>6}: {statistics.median(times) * 1000:6.1f} ms per tree (median of {args.repeats})")


if __name__ == "__main__":
    main()
