"""The proposer interface: who proposes tokens, separated from who verifies them."""

from __future__ import annotations

from ..tree import Tree, TreeConfig


class Proposer:
    """Proposes a token tree after the committed context; the engine verifies it.

    Lifecycle for one generation: ``start(prompt_ids)``, then per step
    ``propose(context, max_depth)`` -> ``verified(tree, logits)`` -> ``accepted(context, n_new)``. ``context`` is every
    committed token (prompt and output so far); its last token is the tree's root,
    which the target has not seen yet.
    """

    name = "proposer"
    #: True if the proposer reads the target's features (final-norm hidden states)
    needs_features = False
    #: default tree shape for this proposer (the engine's ``tree`` argument overrides it)
    default_tree = TreeConfig()

    def __init__(self, tree: TreeConfig | None = None):
        self.tree = tree or self.default_tree

    def check_compatible(self, target, tokenizer) -> None:
        """Raise TurboLMError if this proposer cannot serve ``target`` (e.g. another vocabulary)."""

    def start(self, prompt_ids: list[int], features=None) -> None:
        """A new sequence begins; drop any state from the previous one. With ``needs_features``,
        ``features`` (len(prompt), H) are the target's features at the prompt positions."""

    def propose(self, context: list[int], max_depth: int) -> Tree:
        """A tree rooted at ``context[-1]`` with no node deeper than ``max_depth``."""
        raise NotImplementedError

    def verified(self, tree: Tree, logits) -> None:
        """The target just verified ``tree``: ``logits[i]`` are its logits after node i (before any
        acceptance). For proposers that measure the target's distribution (calibration); most ignore it."""

    def accepted(self, context: list[int], n_new: int, features=None) -> None:
        """The step committed ``n_new`` tokens; ``context`` now ends with them. With
        ``needs_features``, ``features`` (n_new, H) are the target's features at the positions
        the verification computed: the previous root and the accepted nodes."""

    @property
    def max_nodes(self) -> int:
        """The most proposed nodes a tree of this proposer has (the engine cuts anything beyond)."""
        return self.tree.total_tokens

    def stats(self) -> dict:
        """Proposer-specific statistics of the current generation, added to the result's ``stats``."""
        return {}
