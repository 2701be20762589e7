"""Lossless tree speculative decoding: proposers draft token trees, the target verifies them.

``build_decoder(model, tokenizer, DecoderSpec(...))`` builds any decoder (vanilla, prompt lookup, a
small draft model, Jakiro, EAGLE-2, prompt lookup with a trained draft) from a plain description."""

from .engine import SpeculativeGenerator
from .factory import DecoderSpec, build_decoder
from .proposers import ModelProposer, PromptLookupProposer, Proposer
from .tree import Tree, TreeConfig

__all__ = ["DecoderSpec", "ModelProposer", "PromptLookupProposer", "Proposer", "SpeculativeGenerator", "Tree",
           "TreeConfig", "build_decoder"]
