"""Hand-written token-choice rules on FTP's factors, against the static rule, at one sparsity.

Held-out KL(dense || pruned) on the last quarter of 8 Alpaca chunks of 256 tokens (the search's
fitness), the shipped pruner's searched schedule, every rule through the same TokenPruner. It
answers "is there an easy better rule the learned router failed to find?".

  python benchmarks/prune_router_rules.py --sparsity 30
"""

from __future__ import annotations

import argparse
import time

import torch

from turbolm import load_target
from turbolm.pruning.calibration import DenseReference
from turbolm.pruning.checkpoint import read_pruner_config, shipped_pruner
from turbolm.pruning.factory import calibration_chunks
from turbolm.pruning.skipping import TokenPruner

# factors[..., i]: 0 position (0 = first token, 1 = newest), 1 attention received, 2 rank, 3 sparsity
RULES = {
    "static (position)": lambda x: x[..., 0],
    "attention received": lambda x: x[..., 1],
    "attention rank": lambda x: x[..., 2],
    "position + 0.3 attention": lambda x: x[..., 0] + 0.3 * x[..., 1],
    "position + 0.5 rank": lambda x: x[..., 0] + 0.5 * x[..., 2],
    "position + rank": lambda x: x[..., 0] + x[..., 2],
    "first 4 tokens, then position": lambda x: torch.where(x[..., 0] < 4 / 255, 2.0, x[..., 0]),
}


class RuleRouter:
    kind = "learned"  # so that the pruner tracks the attention factor

    def __init__(self, rule):
        self.rule = rule

    def scores(self, factors, block=None):
        return self.rule(factors)

    def keep_decode(self, factors, block=None):
        return torch.ones(factors.shape[:-2], dtype=torch.bool, device=factors.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=int, default=30, help="shipped pruner level: 22, 30 or 40")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_target()
    ref = DenseReference(model, calibration_chunks(tokenizer, None, 256, 8))
    schedule = read_pruner_config(shipped_pruner(args.sparsity / 100))["schedule"]
    print(f"held-out KL at {args.sparsity}% (schedule of the shipped pruner, {torch.get_num_threads()} threads)")
    for name, rule in RULES.items():
        pruner = TokenPruner(model, RuleRouter(rule), schedule, track_attention=True).attach()
        t = time.time()
        try:
            kl = ref.kl(pruner)
        finally:
            pruner.detach()
        print(f"{name:32s} KL {kl:.4f}   ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
