"""Token routers: a score per (token, block) from the four factors; higher = more worth computing.

In prefill a block computes the top (1 - s_block) fraction of tokens by score; in decoding the
newest token runs a block when :meth:`keep_decode` says so (learned: sigmoid(score) >= threshold).
"""

from __future__ import annotations

import torch
from torch import nn

from .factors import FACTOR_NAMES

ROUTER_KINDS = ("learned", "static", "random", "mod")


class StaticRouter:
    """FTP's fixed priority: the first token (forced by the pruner), then the most recent tokens;
    the early middle tokens are skipped first. The newest decoded token therefore always runs."""

    kind = "static"

    def scores(self, factors: torch.Tensor, block: int | None = None) -> torch.Tensor:
        return factors[..., 0]

    def keep_decode(self, factors: torch.Tensor, block: int | None = None) -> torch.Tensor:
        return torch.ones(factors.shape[:-2], dtype=torch.bool, device=factors.device)


class RandomRouter:
    """Uniformly random token choice (the ablation); in decoding a block runs with probability 1 - s."""

    kind = "random"

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def scores(self, factors: torch.Tensor, block: int | None = None) -> torch.Tensor:
        return torch.rand(factors.shape[:-1], generator=self.generator).to(factors.device)

    def keep_decode(self, factors: torch.Tensor, block: int | None = None) -> torch.Tensor:
        s = factors[..., -1, 3].cpu()
        return (torch.rand(s.shape, generator=self.generator) >= s).to(factors.device)


class LearnedRouter(nn.Module):
    """FTP's global router: one MLP shared by all blocks, 4 -> hidden -> 1 (a logit per token).

    ``blocks`` > 0 (beyond the paper) also tells the router which block it scores, two ways, both
    zero at the start: a learned bias of the hidden layer per block (the MLP's function of the four
    factors can differ between blocks of equal sparsity), and a per-block offset of the score as a
    piecewise-linear function of the position factor over ``knots`` evenly spaced points (which
    positions a block keeps). Measured on the default model it gains nothing (-0.5% held-out KL at
    30%, FTP's router -3.6%): which tokens matter there is unrelated to the block and the factors
    (docs/results.md, "A router that can learn")."""

    kind = "learned"

    def __init__(self, hidden: int = 64, threshold: float = 0.5, inputs: tuple[str, ...] = FACTOR_NAMES,
                 blocks: int = 0, knots: int = 16):
        super().__init__()
        if blocks < 0 or (blocks and knots < 2):
            raise ValueError(f"blocks must be >= 0 and knots >= 2 (got blocks={blocks}, knots={knots})")
        self.inputs = tuple(inputs)
        self.mask = torch.tensor([name in self.inputs for name in FACTOR_NAMES], dtype=torch.float32)
        self.net = nn.Sequential(nn.Linear(len(FACTOR_NAMES), hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.threshold = threshold
        self.blocks = blocks
        if blocks:
            self.block_bias = nn.Parameter(torch.zeros(blocks, hidden))
            self.position_offset = nn.Parameter(torch.zeros(blocks, knots))

    def block_parameters(self) -> list[nn.Parameter]:
        """The per-block parameters (empty for FTP's router): training may give them their own rate."""
        return [self.block_bias, self.position_offset] if self.blocks else []

    @torch.no_grad()
    def init_static(self, slope: float = 4.0, saturated: bool = False, noise: float = 0.01) -> LearnedRouter:
        """Start from the static router: score = slope * (position - sparsity) exactly. Two hidden
        units make it linear (GELU(z) - GELU(-z) = z), so the ranking is the static one (most recent
        first) and sigmoid(score) >= 0.5 exactly for the tokens the static rule keeps (position >=
        the block's sparsity): the one-sided sparsity loss starts at ~0 and decoding keeps the
        newest token. The other hidden units keep their default (random) input weights and get
        zero output weights: the start is exactly static, and each such unit's output weight gets
        a gradient of the size of its activation, so training can move away from the static rule
        along the attention and rank inputs. The gentle ``slope`` keeps sigmoid(score) - the
        straight-through gates' gradient - unsaturated over most tokens. The per-block parameters
        start at zero.

        ``saturated``: the first start (slope 20, every other weight scaled by ``noise``): the
        gates' sigmoid saturates and both layers of the free units are ~0, so their gradients are
        products of small numbers - the router never left this start (kept for that ablation).
        Without the position or sparsity input (an ablation) the default random start is kept."""
        if "position" not in self.inputs or "sparsity" not in self.inputs:
            return self
        if saturated:
            slope = 20.0
            for p in self.net.parameters():
                p.mul_(noise)
        w1, w2 = self.net[0].weight, self.net[2].weight
        w1[:2].zero_()
        w1[0, 0], w1[0, 3] = 1.0, -1.0   # z = position - sparsity
        w1[1, 0], w1[1, 3] = -1.0, 1.0   # -z
        self.net[0].bias[:2] = 0.0
        if not saturated:
            w2.zero_()
        w2[0, 0], w2[0, 1] = slope, -slope
        self.net[2].bias.zero_()
        for p in self.block_parameters():
            p.zero_()
        return self

    def forward(self, factors: torch.Tensor, block: int | None = None) -> torch.Tensor:
        # A removed factor (ablation) is zeroed, so checkpoints keep one shape.
        x = factors.to(self.net[0].weight.dtype) * self.mask.to(factors.device)
        if not self.blocks:
            return self.net(x).squeeze(-1)
        if block is None or not 0 <= block < self.blocks:
            raise ValueError(f"this router scores {self.blocks} blocks: pass block in [0, {self.blocks}), got {block}")
        first, act, last = self.net
        score = last(act(first(x) + self.block_bias[block])).squeeze(-1)
        return score + self._offset(x[..., 0], self.position_offset[block])

    @staticmethod
    def _offset(position: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
        """The piecewise-linear function through ``knots`` (evenly spaced on [0, 1]) at ``position``."""
        at = position.clamp(0, 1) * (len(knots) - 1)
        lo = at.floor().clamp(max=len(knots) - 2)
        frac = at - lo
        lo = lo.long()
        return knots[lo] * (1 - frac) + knots[lo + 1] * frac

    def scores(self, factors: torch.Tensor, block: int | None = None) -> torch.Tensor:
        return self(factors, block)

    def keep_decode(self, factors: torch.Tensor, block: int | None = None) -> torch.Tensor:
        return torch.sigmoid(self(factors[..., -1, :], block)) >= self.threshold


class HiddenStateRouter(nn.Module):
    """Mixture-of-Depths-style router (the ablation FTP compares with): one linear score per block
    read from the token's hidden state at the block's input, instead of the four factors."""

    kind = "mod"
    uses_hidden = True

    def __init__(self, hidden_size: int, num_blocks: int, threshold: float = 0.5):
        super().__init__()
        self.proj = nn.Linear(hidden_size, num_blocks)
        nn.init.normal_(self.proj.weight, std=hidden_size ** -0.5 * 0.1)
        nn.init.zeros_(self.proj.bias)
        self.threshold = threshold

    def scores_hidden(self, hidden: torch.Tensor, block: int) -> torch.Tensor:
        w = self.proj.weight[block].to(hidden.dtype)
        return (hidden @ w + self.proj.bias[block].to(hidden.dtype)).float()

    def keep_decode_hidden(self, hidden: torch.Tensor, block: int) -> torch.Tensor:
        return torch.sigmoid(self.scores_hidden(hidden[..., -1, :], block)) >= self.threshold


def make_router(kind: str, seed: int = 0, **kwargs):
    if kind == "static":
        return StaticRouter()
    if kind == "random":
        return RandomRouter(seed)
    if kind == "learned":
        return LearnedRouter(**kwargs)
    if kind == "mod":
        return HiddenStateRouter(**kwargs)
    raise ValueError(f"unknown router {kind!r}; choose one of {', '.join(ROUTER_KINDS)}")
