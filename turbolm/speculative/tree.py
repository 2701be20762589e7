"""Token trees: what a proposer hands to the verifier.

Node 0 is the root: the last committed token, not yet seen by the target. Every
other node is a proposed token whose parent comes before it (nodes are stored in
breadth-first order, so ``parents[i] < i``). The target verifies all nodes in one
forward: each node attends to the committed prefix and to its own ancestors, at
position ``prefix_length + depth``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..core.errors import TurboLMError


@dataclass(frozen=True)
class TreeConfig:
    """Tree size: at most ``total_tokens`` proposed nodes, ``depth`` levels, ``top_k`` branches per node."""

    total_tokens: int = 16
    depth: int = 4
    top_k: int = 4

    def __post_init__(self):
        for name, lo, hi in (("total_tokens", 1, 1024), ("depth", 1, 64), ("top_k", 1, 64)):
            v = getattr(self, name)
            if not isinstance(v, int) or not lo <= v <= hi:
                raise TurboLMError(f"invalid tree setting {name}={v!r}: must be an integer in [{lo}, {hi}]")


@dataclass
class Tree:
    tokens: list[int]  # tokens[0] is the root
    parents: list[int]  # parents[0] == -1
    scores: list[float] = field(default_factory=list)  # cumulative draft log-prob (root 0.0); orders siblings

    def __post_init__(self):
        if not self.scores:
            self.scores = [0.0] * len(self.tokens)
        if not (len(self.tokens) == len(self.parents) == len(self.scores)) or self.parents[0] != -1:
            raise ValueError("malformed tree: tokens, parents and scores must align and node 0 must be the root")
        if any(not 0 <= p < i for i, p in enumerate(self.parents) if i):
            raise ValueError("malformed tree: every parent must come before its child")
        self.depths = [0] * len(self.tokens)
        self.children: list[list[int]] = [[] for _ in self.tokens]
        for i in range(1, len(self.tokens)):
            self.depths[i] = self.depths[self.parents[i]] + 1
            self.children[self.parents[i]].append(i)
        for c in self.children:  # the draft's preferred candidate first
            c.sort(key=lambda i: -self.scores[i])

    @classmethod
    def root_only(cls, root: int) -> Tree:
        return cls([root], [-1])

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depth(self) -> int:
        return max(self.depths)

    def path_to(self, node: int) -> list[int]:
        """Node ids from the root's child down to ``node``."""
        path = []
        while node > 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def paths(self) -> list[list[int]]:
        """Root-to-leaf paths (node ids, root excluded), one per leaf."""
        return [self.path_to(i) for i in range(1, len(self)) if not self.children[i]]

    def ancestor_mask(self) -> torch.Tensor:
        """(n, n) bool: ``[i, j]`` is True when j is i or an ancestor of i (the root included)."""
        n = len(self)
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            if i:
                mask[i] = mask[self.parents[i]]
            mask[i, i] = True
        return mask

    def best(self, total: int) -> Tree:
        """The ``total`` best nodes by score (EAGLE-2's rerank, as :func:`build_dynamic_tree` keeps them):
        a tree built with a large ``total_tokens``, cut to a smaller one."""
        return _keep_best(self.tokens, self.parents, self.scores, self.depths, total)

    def limited(self, max_depth: int, max_nodes: int | None = None) -> Tree:
        """The same tree without nodes deeper than ``max_depth`` (and beyond ``max_nodes`` proposed nodes)."""
        keep = [i for i in range(len(self)) if self.depths[i] <= max_depth]
        if max_nodes is not None:
            keep = keep[: max_nodes + 1]
        if len(keep) == len(self):
            return self
        index = {old: new for new, old in enumerate(keep)}
        return Tree(
            [self.tokens[i] for i in keep],
            [index[self.parents[i]] if i else -1 for i in keep],
            [self.scores[i] for i in keep],
        )


def tree_attention_mask(tree: Tree, prefix_length: int, config, dtype: torch.dtype, device):
    """Mask for verifying ``tree`` after ``prefix_length`` cached tokens: a float 4D mask
    (1, 1, n, prefix + n), 0 where a node may attend (the prefix, its ancestors, itself),
    dtype-min elsewhere; see :func:`model_attention_mask` for sliding-window models.
    """
    n = len(tree)
    allowed = torch.ones(n, prefix_length + n, dtype=torch.bool)
    allowed[:, prefix_length:] = tree.ancestor_mask()
    node_pos = prefix_length + torch.tensor(tree.depths)
    k_pos = torch.cat([torch.arange(prefix_length), node_pos])
    return model_attention_mask(config, allowed, node_pos, k_pos, dtype, device)


def model_attention_mask(config, allowed, q_pos, k_pos, dtype, device):
    """The ``attention_mask`` argument for a custom (tree) forward of a model with ``config``.

    Full-attention models get one float mask. Sliding-window models get the window applied
    by position; models mixing both layer kinds (``config.layer_types``) get a dict keyed by
    layer kind, which transformers' decoder models accept in place of their own masks.
    """
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or [])
    if window is None or (kinds and "sliding_attention" not in kinds) or int(q_pos.max()) < window:
        return float_mask(allowed, q_pos, k_pos, dtype, device)
    sliding = float_mask(allowed, q_pos, k_pos, dtype, device, window)
    if kinds - {"sliding_attention"}:
        full = float_mask(allowed, q_pos, k_pos, dtype, device)
        return {kind: (sliding if kind == "sliding_attention" else full) for kind in kinds}
    return sliding


def float_mask(allowed, q_pos, k_pos, dtype, device, sliding_window: int | None = None) -> torch.Tensor:
    """(q, kv) bool -> (1, 1, q, kv) additive float mask; applies a sliding window by positions."""
    if sliding_window is not None:
        allowed = allowed & (k_pos.unsqueeze(0) > q_pos.unsqueeze(1) - sliding_window)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None].to(device)


def frontier_attention(frontier: list[int], parents: list[int], slot: dict[int, int], base: int) -> torch.Tensor:
    """For a draft that feeds a tree level by level into its own cache: which cache entries each
    frontier node may attend to, (len(frontier), base + len(slot)) bool. Entries 0..base-1 are
    the committed context (all visible); ``slot[node]`` is the cache entry of a node fed so far
    (the frontier's included); a node sees its own ancestors' entries and itself."""
    allowed = torch.zeros(len(frontier), base + len(slot), dtype=torch.bool)
    allowed[:, :base] = True
    for j, f in enumerate(frontier):
        node = f
        while node > 0:
            allowed[j, slot[node]] = True
            node = parents[node]
    return allowed


def tree_position_ids(tree: Tree, prefix_length: int, device) -> torch.Tensor:
    return (prefix_length + torch.tensor(tree.depths, device=device)).unsqueeze(0)


def build_dynamic_tree(
    root: int,
    root_logprobs: torch.Tensor,
    expand: Callable[[list[int], list[int], list[int], list[int]], torch.Tensor],
    config: TreeConfig,
    max_depth: int | None = None,
) -> Tree:
    """EAGLE-2 dynamic tree from per-node draft distributions.

    Level 1: the ``top_k`` most likely children of the root. At each further level the
    ``top_k`` frontier nodes with the best cumulative log-prob are expanded, each with its
    ``top_k`` most likely children. ``expand(frontier, tokens, parents, depths)`` returns the
    draft's log-probs (len(frontier), V) for the frontier's next tokens; the pool lists are
    indexed by candidate id (0 = root). After ``depth`` levels every candidate is reranked by
    cumulative log-prob and the best ``total_tokens`` are kept (a parent always outranks its
    child, so kept nodes form a tree).
    """
    depth = config.depth if max_depth is None else min(config.depth, max_depth)
    if depth < 1:
        return Tree.root_only(root)
    k = min(config.top_k, root_logprobs.shape[-1])
    tokens, parents, scores, depths = [root], [-1], [0.0], [0]
    top = torch.topk(root_logprobs.float(), k)
    frontier = []
    for lp, tok in zip(top.values.tolist(), top.indices.tolist()):
        frontier.append(len(tokens))
        tokens.append(tok), parents.append(0), scores.append(lp), depths.append(1)
    for level in range(2, depth + 1):
        top = torch.topk(expand(frontier, tokens, parents, depths).float(), k, dim=-1)
        values, indices = top.values.cpu(), top.indices.cpu().tolist()  # one device sync per level
        cand = (torch.tensor([scores[f] for f in frontier]).unsqueeze(1) + values).flatten()
        new = []
        for flat, score in zip(range(cand.numel()), cand.tolist()):
            row, col = divmod(flat, k)
            new.append(len(tokens))
            tokens.append(indices[row][col]), parents.append(frontier[row]), scores.append(score), depths.append(level)
        frontier = sorted(new, key=lambda i: -scores[i])[:k]
    return _keep_best(tokens, parents, scores, depths, config.total_tokens)


def _keep_best(tokens, parents, scores, depths, total: int) -> Tree:
    """EAGLE-2's rerank: the ``total`` best candidates by cumulative score, as a breadth-first Tree.
    Ties are broken by depth, so a parent is never dropped in favour of its equal-scored child."""
    ranked = sorted(range(1, len(tokens)), key=lambda i: (-scores[i], depths[i]))[:total]
    keep = [0] + sorted(ranked, key=lambda i: (depths[i], -scores[i]))
    index = {old: new for new, old in enumerate(keep)}
    return Tree([tokens[i] for i in keep], [index[parents[i]] if i else -1 for i in keep], [scores[i] for i in keep])


def merge_trees(first: Tree, second: Tree) -> tuple[Tree, int]:
    """The trie union of two trees with the same root: ``second``'s nodes hang under ``first``'s
    matching nodes (same token path), so siblings stay distinct tokens (what lossless sampling
    needs) and the longest path the target accepts is the longer of the two trees' own.
    ``first``'s nodes keep their order; each added node takes its parent's score, so it is tried
    before the parent's ``first`` children. Returns the merged tree and the number of added nodes."""
    merged, _ = union_trees([first, second])
    return merged, len(merged) - len(first)


def union_trees(trees: Sequence[Tree]) -> tuple[Tree, list[list[int]]]:
    """The trie union of trees with the same root, as :func:`merge_trees` builds it (the first tree's
    nodes first, in order; each later node not already there takes its parent's score), and for each
    tree the union node of each of its nodes."""
    first = trees[0]
    if any(t.tokens[0] != first.tokens[0] for t in trees):
        raise ValueError("union_trees needs trees with the same root")
    tokens, parents, scores = list(first.tokens), list(first.parents), list(first.scores)
    node_of = {(parents[i], tokens[i]): i for i in range(1, len(tokens))}
    maps = [list(range(len(first)))]
    for tree in trees[1:]:
        mapped = [0] * len(tree)
        for j in range(1, len(tree)):  # parents come first, so a parent is always mapped already
            key = (mapped[tree.parents[j]], tree.tokens[j])
            if key not in node_of:
                node_of[key] = len(tokens)
                tokens.append(key[1]), parents.append(key[0]), scores.append(scores[key[0]])
            mapped[j] = node_of[key]
        maps.append(mapped)
    return Tree(tokens, parents, scores), maps


def tree_from_sequences(root: int, sequences: Sequence[Sequence[int]], weights: Sequence[float] | None = None) -> Tree:
    """A trie of candidate continuations of ``root``; a node's score is the total weight through it."""
    weights = list(weights) if weights is not None else [1.0] * len(sequences)
    tokens, parents, scores, depths = [root], [-1], [0.0], [0]
    child_of: dict[tuple[int, int], int] = {}
    for seq, w in zip(sequences, weights):
        node = 0
        for tok in seq:
            key = (node, int(tok))
            if key not in child_of:
                child_of[key] = len(tokens)
                tokens.append(int(tok)), parents.append(node), scores.append(0.0), depths.append(depths[node] + 1)
            node = child_of[key]
            scores[node] += w
    order = [0] + sorted(range(1, len(tokens)), key=lambda i: (depths[i], -scores[i]))
    index = {old: new for new, old in enumerate(order)}
    return Tree([tokens[i] for i in order], [index[parents[i]] if i else -1 for i in order], [scores[i] for i in order])
