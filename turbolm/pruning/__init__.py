"""FTP token-wise pruning: token skipping, router factors, routers, sparsity search, router training."""

from .router import LearnedRouter, RandomRouter, StaticRouter, make_router
from .skipping import SkipStats, TokenPruner

__all__ = ["LearnedRouter", "RandomRouter", "SkipStats", "StaticRouter", "TokenPruner", "make_router"]
