"""Prompt lookup: propose what followed earlier occurrences of the context's last n-gram.

Works without a draft model; strong when the answer copies from the prompt
(summarisation, RAG, code editing). Several distinct continuations form a small tree.
"""

from __future__ import annotations

from ..tree import Tree, TreeConfig, tree_from_sequences
from .base import Proposer


class PromptLookupProposer(Proposer):
    """Match the last ``max_ngram`` .. ``min_ngram`` tokens against the earlier context.

    The longest n-gram that matches wins; up to ``tree.top_k`` different continuations
    (most recent match first, each at most ``tree.depth`` tokens) are merged into a trie
    of at most ``tree.total_tokens`` nodes. No match: an empty tree (a plain decode step).
    ``match_length`` is the n-gram length the last proposal matched (0: none).
    """

    name = "prompt-lookup"
    default_tree = TreeConfig(total_tokens=10, depth=10, top_k=1)

    def __init__(self, tree: TreeConfig | None = None, max_ngram: int = 3, min_ngram: int = 1):
        super().__init__(tree)
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.match_length = 0

    def propose(self, context: list[int], max_depth: int) -> Tree:
        depth = min(self.tree.depth, max_depth)
        root = context[-1]
        self.match_length = 0
        if depth < 1:
            return Tree.root_only(root)
        n_ctx = len(context)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            pattern = context[n_ctx - n :]
            found, seen = [], set()
            # Most recent occurrence first; the match may not be the suffix itself.
            for start in range(n_ctx - n - 1, -1, -1):
                if context[start : start + n] == pattern:
                    cont = tuple(context[start + n : start + n + depth])
                    if cont and cont not in seen:
                        seen.add(cont)
                        found.append(cont)
                        if len(found) >= self.tree.top_k:
                            break
            if found:
                self.match_length = n
                weights = [len(found) - i for i in range(len(found))]  # more recent = preferred
                return tree_from_sequences(root, found, weights).limited(depth, self.tree.total_tokens)
        return Tree.root_only(root)
