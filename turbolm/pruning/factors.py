"""The four router inputs of FTP, per (token, block), and where the attention score comes from.

For block ``l`` and token ``i`` of a sequence whose tokens so far are ``0..N-1``:

1. ``position`` = i / (N - 1): 0 for the first token, 1 for the newest.
2. ``attention`` = log(1 + n * a_i), where a_i is the attention probability token ``i``
   *receives*, averaged over heads and over the last ``m`` queries computed in the most
   recent block that had ``i`` among its keys (``n`` = that block's number of keys, so
   ``n * a_i`` is a_i relative to a uniform share; the log keeps the attention sink's large
   values on the same scale as the rest). Before any block has run, a_i = 1/n (value log 2).
3. ``rank`` = the fraction of the sequence's tokens whose attention score is lower than
   token ``i``'s (ties broken by position): 0 = least attended, 1 = most attended.
4. ``sparsity`` = the block's target sparsity from the schedule.

The attention probabilities are computed from the last ``m`` queries only (their q
projections are captured while the block runs; the keys are the block's own, from its KV
cache or from the k projection), so the cost is m x n dot products per head and block -
never an n x n attention matrix. Rotary embeddings use the standard ``rotate_half`` form
(Llama, Qwen2, Mistral).
"""

from __future__ import annotations

import math

import torch

FACTOR_NAMES = ("position", "attention", "rank", "sparsity")
UNIFORM_ATTENTION = math.log(2.0)  # log(1 + n * (1/n))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: (B, H, T, d); ``cos``/``sin``: (B, T, d)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def received_attention(q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, k_pos: torch.Tensor,
                       scaling: float) -> torch.Tensor:
    """Mean attention probability each key receives from the queries ``q``.

    ``q``: (B, H, m, d) rotated queries at positions ``q_pos`` (B, m); ``k``: (B, Hkv, n, d)
    rotated keys at positions ``k_pos`` (B, n). Causal: a query attends to keys at positions
    <= its own. Returns (B, n) = mean over heads and queries of softmax(q k^T * scaling).
    """
    B, H, m, d = q.shape
    Hkv = k.shape[1]
    qg = q.float().view(B, Hkv, H // Hkv, m, d)
    scores = torch.einsum("bgrmd,bgnd->bgrmn", qg, k.float()) * scaling
    visible = k_pos[:, None, None, None, :] <= q_pos[:, None, None, :, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = scores.softmax(dim=-1)
    return probs.mean(dim=(1, 2, 3))


def attention_value(probs: torch.Tensor) -> torch.Tensor:
    """Factor 2 from the probabilities of :func:`received_attention` over ``n`` keys."""
    n = probs.shape[-1]
    return torch.log1p(probs * n)


def rank_of(values: torch.Tensor) -> torch.Tensor:
    """Factor 3: (B, N) -> fraction of tokens with a lower score, ties broken by position."""
    N = values.shape[-1]
    order = torch.sort(values, dim=-1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(N, device=values.device).expand_as(order))
    return ranks.to(values.dtype) / max(N - 1, 1)


def build_factors(positions: torch.Tensor, seq_len: int, attention: torch.Tensor, sparsity: float,
                  rank: torch.Tensor | None = None) -> torch.Tensor:
    """Stack the four factors for the tokens at ``positions`` (B, T).

    ``attention``: (B, N) factor-2 values of the whole sequence, indexed by position;
    ``rank``: the sequence's ranks (computed from ``attention`` when None).
    Returns (B, T, 4) float32.
    """
    pos = positions.float() / max(seq_len - 1, 1)
    if rank is None:
        rank = rank_of(attention)
    att = attention.gather(1, positions)
    rk = rank.gather(1, positions)
    sp = torch.full_like(pos, float(sparsity))
    return torch.stack((pos, att, rk, sp), dim=-1)
