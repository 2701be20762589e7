"""Acceptance rules: the only code that decides which proposed tokens are kept.

Both rules walk the tree from the root. At each node the target's own next-token
choice decides which child (if any) is accepted; when none is, the target's choice
becomes the bonus token and the step ends. So every emitted token is a token the
target itself would have produced (greedy), or is distributed exactly as the
target's sampling distribution (sampling).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .tree import Tree


def accept_greedy(tree: Tree, target_argmax: list[int]) -> tuple[list[int], int]:
    """Longest path whose tokens equal the target's argmax at their parents, plus the bonus token.

    ``target_argmax[i]``: the target's greedy next token after node i. Returns the accepted
    node ids (root excluded) and the bonus token (the target's argmax after the last one).
    """
    path, node = [], 0
    while True:
        want = target_argmax[node]
        nxt = next((c for c in tree.children[node] if tree.tokens[c] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        node = nxt


def accept_sampling(
    tree: Tree, target_probs: Callable[[int], torch.Tensor], generator: torch.Generator | None = None
) -> tuple[list[int], int]:
    """Recursive rejection over the draft's distinct, deterministic candidates (SpecInfer / EAGLE-2).

    ``target_probs(i)``: the target's sampling distribution after node i (temperature, top-k,
    top-p already applied). At each node the children are tried in the draft's order: child x is
    accepted with probability r(x) / sum(r), where r starts as the target distribution; on
    rejection r(x) is set to 0. If every child is rejected, the bonus token is sampled from r.
    Since each candidate is proposed with certainty, this emits exactly the target's distribution.
    """
    path, node = [], 0
    while True:
        residual = target_probs(node).float().clone()
        accepted = None
        for c in tree.children[node]:
            x = tree.tokens[c]
            total = residual.sum()
            u = torch.rand((), generator=generator, device=residual.device)
            if u * total < residual[x]:
                accepted = c
                break
            residual[x] = 0.0
        if accepted is None:
            return path, int(torch.multinomial(residual, 1, generator=generator))
        path.append(accepted)
        node = accepted
