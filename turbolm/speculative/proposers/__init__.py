"""Proposers: interchangeable sources of draft token trees behind one small interface."""

from .base import Proposer
from .prompt_lookup import PromptLookupProposer
from .small_model import ModelProposer

__all__ = ["ModelProposer", "PromptLookupProposer", "Proposer"]
