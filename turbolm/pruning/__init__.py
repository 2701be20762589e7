"""FTP token-wise pruning: token skipping, router factors, routers, sparsity search, router training,
and the layer-pruning baselines. ``build_pruned(model, tokenizer, PrunerSpec(...))`` builds any of
them from a plain description."""

from .baselines import LayerDropper, block_influence, blockpruner_blocks, blockpruner_order, shortgpt_layers
from .factory import PrunedModel, PrunerSpec, build_pruned
from .router import HiddenStateRouter, LearnedRouter, RandomRouter, StaticRouter, make_router
from .skipping import SkipStats, TokenPruner

__all__ = ["HiddenStateRouter", "LayerDropper", "LearnedRouter", "PrunedModel", "PrunerSpec", "RandomRouter",
           "SkipStats", "StaticRouter", "TokenPruner", "block_influence", "blockpruner_blocks", "blockpruner_order",
           "build_pruned", "make_router", "shortgpt_layers"]
