"""``turbolm serve``: an OpenAI-compatible HTTP server (needs the ``serve`` extra: FastAPI, uvicorn,
prometheus-client).

``create_app(model, tokenizer, decoder)`` builds the FastAPI app; ``Scheduler`` is the thread
that decodes every request, continuously batched (``Batch``), the speculative decoder serving a
request that runs alone. docs/serving.md describes the design and what was measured."""

from .app import create_app
from .batch import Batch
from .scheduler import Job, Scheduler

__all__ = ["Batch", "Job", "Scheduler", "create_app"]
