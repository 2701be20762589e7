"""Lossless tree speculative decoding: proposers draft token trees, the target verifies them."""

from .engine import SpeculativeGenerator
from .proposers import ModelProposer, PromptLookupProposer, Proposer
from .tree import Tree, TreeConfig

__all__ = ["ModelProposer", "PromptLookupProposer", "Proposer", "SpeculativeGenerator", "Tree", "TreeConfig"]
