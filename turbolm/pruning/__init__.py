"""FTP token-wise pruning: token skipping, router factors, routers, sparsity search, router training."""

from .baselines import LayerDropper, block_influence, blockpruner_blocks, blockpruner_order, shortgpt_layers
from .router import HiddenStateRouter, LearnedRouter, RandomRouter, StaticRouter, make_router
from .skipping import SkipStats, TokenPruner

__all__ = ["HiddenStateRouter", "LayerDropper", "LearnedRouter", "RandomRouter", "SkipStats", "StaticRouter",
           "TokenPruner", "block_influence", "blockpruner_blocks", "blockpruner_order", "make_router",
           "shortgpt_layers"]
