"""Can the router's inputs predict which tokens matter? The training signal, and how much of it the factors explain.

Every router here is trained through straight-through gates: a token's gradient is the first-order
effect of its skip on the distillation loss (``-dL/dg``: its *importance*; g = 1 kept, 0 skipped).
This script measures, on the default model and a pruner's schedule (issue 18):

1. **The signal**: importance computed on the held-out chunks at the static choice, then one step
   along it - score = static score + alpha * importance (normalised per block) - judged by the
   held-out KL (the inference path). If this one-shot, text-specific choice does not beat the static
   router, no router trained on this signal can.
2. **What the inputs explain**: importance and the four factors recorded on ``--train-chunks``
   training chunks, a small MLP fit to predict each token's importance rank (within its block and
   chunk) from the factors, and from the factors and the block, then the same one-shot step on the
   held-out chunks with the *predicted* importance; plus the rank correlation of predicted and true
   importance on the held-out tokens, and of each factor alone; and the same with one linear probe per
   block on the block's input hidden state (what the MoD-style router reads) instead of the factors.

    python benchmarks/prune_router_signal.py --pruner turbolm/checkpoints/ftp-smollm2-135m-s30 \\
        --data ../shared/data/text/enwiki_sample_8mb.jsonl --data ../shared/data/alpaca/alpaca_5000.json \\
        --out benchmarks/results_router_oracle/signal-s30.json

About 5-10 minutes on a 2-core CPU; writes its JSON atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from turbolm.core.io import write_json  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_router_oracle import calibration_arguments  # noqa: E402

SLOPE = 4.0  # the static start's slope (LearnedRouter.init_static)


class DeltaRouter(nn.Module):
    """The static router's scores plus a free delta per (block, chunk, token) of one batch; a factor
    router (kind "learned"), so the pruner computes and records the four factors."""

    kind = "learned"

    def __init__(self, blocks: int):
        super().__init__()
        self.blocks = blocks
        self.delta: torch.Tensor | None = None

    def reset(self, batch: int, length: int, requires_grad: bool) -> None:
        self.delta = torch.zeros(self.blocks, batch, length, requires_grad=requires_grad)

    def scores(self, factors: torch.Tensor, block: int | None = None) -> torch.Tensor:
        return SLOPE * (factors[..., 0] - factors[..., 3]) + self.delta[block]

    def keep_decode(self, factors: torch.Tensor, block: int | None = None) -> torch.Tensor:
        raise NotImplementedError("prefill only")


def importance(model, pruner, router, ids, score_last, schedule):
    """(-dL/dg per (block, chunk, token), factors per (block, chunk, token, 4), each block's input
    hidden states (block, chunk, token, H), RMS-normalised, float16) at the static choice."""
    from turbolm.pruning.skipping import decoder_layers
    from turbolm.pruning.train import distillation_loss

    hidden = [None] * len(schedule)

    def keep_input(block):
        def hook(module, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).detach().float()
            hidden[block] = (h * h.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()).half()
        return hook

    hooks = [layer.register_forward_pre_hook(keep_input(i), with_kwargs=True)
             for i, layer in enumerate(decoder_layers(model))]
    router.reset(*ids.shape, requires_grad=True)
    with torch.no_grad(), pruner.disabled():
        dense = model(input_ids=ids, use_cache=False, logits_to_keep=score_last).logits
    pruner.records.clear()
    pruner.training_mode = True
    try:
        pruned = model(input_ids=ids, use_cache=False, logits_to_keep=score_last).logits
    finally:
        pruner.training_mode = False
        for h in hooks:
            h.remove()
    distillation_loss(dense, pruned).backward()
    factors = torch.zeros(len(schedule), *ids.shape, 4)
    for r in pruner.records:
        factors[r["block"]] = r["factors"].detach()
    pruner.records.clear()
    static = SLOPE * (factors[..., 0] - factors[..., 3])
    slope = torch.sigmoid(static) * (1 - torch.sigmoid(static))
    return -router.delta.grad / slope, factors, torch.stack(hidden)


def normalise(imp: torch.Tensor, schedule) -> torch.Tensor:
    """Importance centred per (block, chunk) and in units of its mean magnitude per block; the first
    token (always kept) and dense blocks are zero. Only the order within a block and chunk matters."""
    imp = imp.clone()
    imp[..., 0] = 0.0
    imp[..., 1:] -= imp[..., 1:].mean(dim=-1, keepdim=True)
    scale = imp.abs().mean(dim=(1, 2), keepdim=True).clamp(min=1e-12)
    dense = torch.tensor([s == 0 for s in schedule])[:, None, None]
    return (imp / scale).masked_fill(dense, 0.0)


def ranks(imp: torch.Tensor) -> torch.Tensor:
    """Importance replaced by its rank within (block, chunk), scaled to [-1, 1] (the first token: 0;
    ties share their mean rank): a target the heavy tail of a few very important tokens cannot dominate."""
    rows = imp[..., 1:].reshape(-1, imp.shape[-1] - 1)
    r = torch.stack([average_ranks(row) for row in rows]).float().view(*imp.shape[:-1], -1)
    out = torch.zeros_like(imp)
    out[..., 1:] = 2 * r / max(1, r.shape[-1] - 1) - 1
    return out


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks of a 1-d tensor, tied values sharing the mean of their ranks (the position factor is
    the same for every chunk and block: breaking its ties in any order would invent a correlation)."""
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    return (first + (counts - 1) / 2).double()[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> int:
    from turbolm import load_target
    from turbolm.core.machine import cpu_model
    from turbolm.pruning.calibration import DenseReference
    from turbolm.pruning.checkpoint import read_pruner_config
    from turbolm.pruning.data import pack_rows
    from turbolm.pruning.router import StaticRouter
    from turbolm.pruning.skipping import TokenPruner

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    calibration_arguments(ap, "a pruner checkpoint: its schedule")
    ap.add_argument("--train-chunks", type=int, default=64, help="training chunks to fit the predictor on (default 64)")
    ap.add_argument("--alphas", default="0.001,0.002,0.003,0.005,0.01,0.02", help="one-shot step sizes")
    ap.add_argument("--fit-steps", type=int, default=1500, help="Adam steps of the importance predictor")
    ap.add_argument("--ridge", type=float, default=1e-3, help="ridge strength of the hidden-state probes (x N)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    alphas = [float(x) for x in a.alphas.split(",")]

    t0 = time.perf_counter()
    model, tokenizer = load_target(None)
    model.requires_grad_(False)
    schedule = [float(s) for s in read_pruner_config(a.pruner)["schedule"]]
    packed = pack_rows(tokenizer, a.data, a.seq_len, a.calibration, max_train=a.train_chunks)
    held = packed.calibration
    reference = DenseReference(model, held, batch_size=len(held))
    with TokenPruner(model, StaticRouter(), schedule) as static:
        static_kl = reference.kl(static)
    result = {"pruner": a.pruner, "data": a.data, "held_out_chunks": list(held.shape),
              "train_chunks": list(packed.train.shape), "score_last": reference.score_last,
              "schedule_mean": sum(schedule) / len(schedule), "static_kl": static_kl,
              "machine": f"{cpu_model()}, {torch.get_num_threads()} threads", "torch": torch.__version__}
    print(f"static {static_kl:.5f}", flush=True)

    router = DeltaRouter(len(schedule))
    pruner = TokenPruner(model, router, schedule, train_records=True)

    def one_shot(step: torch.Tensor) -> dict:
        out = {}
        for alpha in alphas:
            router.delta = alpha * step
            out[str(alpha)] = reference.kl(pruner)
        return out

    with pruner:
        true_imp, held_factors, held_hidden = importance(model, pruner, router, held, reference.score_last, schedule)
        true_imp = normalise(true_imp, schedule)
        result["true_importance_one_shot"] = one_shot(true_imp)
        print("true importance:", result["true_importance_one_shot"], flush=True)
        imps, facs, hids = [], [], []
        for i in range(0, len(packed.train), 8):
            imp, fac, hid = importance(model, pruner, router, packed.train[i:i + 8], reference.score_last, schedule)
            imps.append(normalise(imp, schedule))
            facs.append(fac)
            hids.append(hid)
        train_imp, train_fac, train_hid = torch.cat(imps, 1), torch.cat(facs, 1), torch.cat(hids, 1)

        sparse = torch.tensor([s > 0 for s in schedule])
        t = true_imp[sparse][:, :, 1:].flatten()
        result["held_out_spearman_per_factor"] = {
            f: spearman(held_factors[sparse][:, :, 1:, i].flatten(), t) for i, f in enumerate(("position", "attention", "rank"))}
        print("Spearman of each factor with importance (held out):", result["held_out_spearman_per_factor"], flush=True)
        blocks = torch.arange(len(schedule))[:, None, None]

        def features(fac: torch.Tensor, with_block: bool) -> torch.Tensor:
            x = fac
            if with_block:
                onehot = nn.functional.one_hot(blocks.expand(fac.shape[:3]), len(schedule)).float()
                x = torch.cat([fac, onehot], -1)
            return x

        for name, with_block in (("factors", False), ("factors+block", True)):
            torch.manual_seed(0)
            x = features(train_fac, with_block)[sparse][:, :, 1:].reshape(-1, 4 + len(schedule) * with_block)
            y = ranks(train_imp)[sparse][:, :, 1:].reshape(-1)
            net = nn.Sequential(nn.Linear(x.shape[1], 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
            opt = torch.optim.Adam(net.parameters(), lr=3e-3)
            for _ in range(a.fit_steps):
                idx = torch.randint(len(x), (8192,))
                loss = (net(x[idx]).squeeze(-1) - y[idx]).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                pred = net(features(held_factors, with_block)).squeeze(-1)
                train_r2 = 1 - float((net(x).squeeze(-1) - y).pow(2).mean() / y.var())  # of the ranks
            pred = normalise(pred, schedule)
            p, t = pred[sparse][:, :, 1:].flatten(), true_imp[sparse][:, :, 1:].flatten()
            result[name] = {"train_r2": train_r2, "held_out_spearman": spearman(p, t),
                            "held_out_r2": 1 - float((p - t).pow(2).mean() / t.var()),
                            "one_shot": one_shot(pred)}
            print(name, result[name], flush=True)
        # The hidden state at each block's input, one linear probe per block (what the MoD-style router reads):
        # ridge regression to the importance ranks, lambda chosen on the training tokens' own fit (no tuning on held-out).
        pred = torch.zeros_like(true_imp)
        fit = []
        for b in range(len(schedule)):
            if not sparse[b]:
                continue
            x = train_hid[b][:, 1:].reshape(-1, train_hid.shape[-1]).float()
            x = torch.cat([x, torch.ones(len(x), 1)], 1)
            y = ranks(train_imp)[b][:, 1:].reshape(-1)
            w = torch.linalg.solve(x.T @ x + a.ridge * len(x) * torch.eye(x.shape[1]), x.T @ y)
            fit.append(1 - float((x @ w - y).pow(2).mean() / y.var()))
            xh = held_hidden[b].float()
            pred[b] = torch.cat([xh, torch.ones(*xh.shape[:2], 1)], -1) @ w
        pred = normalise(pred, schedule)
        p = pred[sparse][:, :, 1:].flatten()
        result["hidden_state_linear_per_block"] = {"ridge": a.ridge, "train_r2_mean": sum(fit) / len(fit),
                                                   "held_out_spearman": spearman(p, t), "one_shot": one_shot(pred)}
        print("hidden state", result["hidden_state_linear_per_block"], flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
