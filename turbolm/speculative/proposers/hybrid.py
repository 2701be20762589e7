"""Prompt lookup and a trained feature-level draft (Jakiro or EAGLE-2) as one proposer.

Not to be confused with Jakiro's *hybrid schedule* (autoregressive levels, then a contrastive last
level), which the draft keeps here as everywhere. The two sources are good at different text:
n-gram lookup where the answer repeats itself or copies the prompt, the draft elsewhere.

- ``merge``: every step, the n-gram tree (prompt lookup's continuation) is merged into the
  draft's dynamic tree as extra branches: under the root, or under the draft node whose path it
  shares (a trie union, siblings stay distinct tokens). The target verifies both at once; the
  longest accepted path is the longer of the two. The draft keeps its own node budget
  (``tree.total_tokens``); the n-gram branch adds at most ``ngram.tree.total_tokens`` nodes,
  only those the draft tree does not already hold.
- ``choose``: every step, either the n-gram tree or the draft's tree, whichever is expected to
  accept more nodes: running means of the accepted nodes of the draft's trees, and of the n-gram
  trees per matched n-gram length (1..3). Each mean starts with one made-up observation of one
  accepted node, so each source gets tried (a tie goes to the n-gram tree, which costs nothing to
  draft) and is tried again whenever the other one's mean falls below its own. No match: the draft.
  On n-gram steps the draft does not run; the features of every committed position still reach
  it (``accepted`` is forwarded every step), and its next catch-up feeds them all.

Both are lossless: the tree is a function of the context and of earlier steps' outcomes, never of
the step being verified, and siblings are distinct tokens, so the verifier's rules apply as they
are.
"""

from __future__ import annotations

from ...core.errors import ParameterError
from ..tree import Tree, TreeConfig, merge_trees
from .base import Proposer
from .jakiro import JakiroProposer
from .prompt_lookup import PromptLookupProposer

MODES = ("merge", "choose")
PRIOR = 1.0  # choose: the made-up first observation of every source's accepted nodes


class HybridProposer(Proposer):
    needs_features = True
    default_tree = JakiroProposer.default_tree

    def __init__(self, drafter: JakiroProposer, ngram: PromptLookupProposer | None = None, mode: str = "merge",
                 tree: TreeConfig | None = None):
        if mode not in MODES:
            raise ParameterError(f"{{}} must be one of {', '.join(MODES)}, got {mode!r}", "mode")
        self.drafter = drafter
        self.ngram = ngram or PromptLookupProposer()
        self.mode = mode
        self.name = f"hybrid-{mode}+{drafter.name}"
        super().__init__(tree or drafter.tree)
        self._reset()

    # The tree settings are the draft's (what --tree auto sizes); the n-gram tree keeps its own.
    @property
    def tree(self) -> TreeConfig:
        return self.drafter.tree

    @tree.setter
    def tree(self, value: TreeConfig) -> None:
        self.drafter.tree = value

    @property
    def max_nodes(self) -> int:
        if self.mode == "merge":
            return self.drafter.max_nodes + self.ngram.max_nodes
        return max(self.drafter.max_nodes, self.ngram.max_nodes)

    def check_compatible(self, target, tokenizer) -> None:
        self.drafter.check_compatible(target, tokenizer)

    def _reset(self) -> None:
        # choose: running means of accepted nodes per source ("draft", or the matched n-gram length),
        # each seeded with one made-up observation of PRIOR accepted nodes
        self.estimates: dict = {"draft": PRIOR}
        self.counts: dict = {"draft": 1}
        self.source = None  # the source of the tree in flight
        self.steps = {"draft": 0, "ngram": 0}
        self.added_nodes = 0  # merge: n-gram nodes the draft tree did not hold

    def start(self, prompt_ids, features=None) -> None:
        self.drafter.start(prompt_ids, features)
        self.ngram.start(prompt_ids)
        self._reset()

    def accepted(self, context, n_new, features=None) -> None:
        self.drafter.accepted(context, n_new, features)  # every step, whichever tree was verified
        self.ngram.accepted(context, n_new)
        if self.source is not None:
            n = self.counts[self.source] = self.counts[self.source] + 1
            self.estimates[self.source] += (n_new - 1 - self.estimates[self.source]) / n  # bonus excluded
            self.source = None

    def propose(self, context: list[int], max_depth: int) -> Tree:
        ngram_tree = self.ngram.propose(context, max_depth)
        if self.mode == "merge":
            tree, added = merge_trees(self.drafter.propose(context, max_depth), ngram_tree)
            self.added_nodes += added
            self.steps["draft"] += 1
            return tree
        m = self.ngram.match_length
        if len(ngram_tree) > 1:
            if m not in self.estimates:
                self.estimates[m], self.counts[m] = PRIOR, 1
            if self.estimates[m] >= self.estimates["draft"]:  # a tie goes to the n-gram: it costs nothing
                self.source = m
                self.steps["ngram"] += 1
                return ngram_tree
        self.source = "draft"
        self.steps["draft"] += 1
        return self.drafter.propose(context, max_depth)

    def stats(self) -> dict:
        if self.mode == "merge":
            steps = self.steps["draft"]
            return {"hybrid": {"mode": "merge", "mean_ngram_nodes_added": self.added_nodes / steps if steps else 0.0}}
        return {"hybrid": {"mode": "choose", "draft_steps": self.steps["draft"], "ngram_steps": self.steps["ngram"]}}
