"""Prometheus metrics of the server, named as vLLM names its own (``turbolm:`` for ``vllm:``) so
that dashboards carry over. Each server has its own registry (several servers in one process,
as in the tests, do not mix their counts)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # no *_created series (process-wide, as vLLM does)

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """What the scheduler reports as it runs; ``render()`` is the /metrics page."""

    def __init__(self, model_name: str, running: Callable[[], float], waiting: Callable[[], float]):
        self.registry = r = CollectorRegistry()
        label = {"model_name": model_name}

        def gauge(name, doc, read):
            g = Gauge(name, doc, ["model_name"], registry=r).labels(**label)
            g.set_function(read)

        def counter(name, doc, extra=()):
            c = Counter(name, doc, ["model_name", *extra], registry=r)
            return c if extra else c.labels(**label)

        def histogram(name, doc, buckets=_LATENCY_BUCKETS):
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=r).labels(**label)

        self._label = label
        gauge("turbolm:num_requests_running", "Requests in the running batch (or decoding speculatively).", running)
        gauge("turbolm:num_requests_waiting", "Requests queued for a place in the batch.", waiting)
        self.ttft = histogram("turbolm:time_to_first_token_seconds",
                              "From a request's arrival to its first generated token (queueing and prefill included).")
        self.itl = histogram("turbolm:inter_token_latency_seconds", "Time between two generated tokens of a request.")
        self.e2e = histogram("turbolm:e2e_request_latency_seconds", "From a request's arrival to its last token.")
        self.batch_size = histogram("turbolm:batch_size", "Rows per batched decoding forward.", _BATCH_BUCKETS)
        self.prompt_tokens = counter("turbolm:prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("turbolm:generation_tokens", "Tokens generated (finished requests).")
        self.requests = counter("turbolm:request_success", "Requests that ended, by finish reason (stop, length, "
                                "cancelled: the client went away, timeout, error).", ["finish_reason"])
        self.rejected = counter("turbolm:request_rejected", "Requests refused before they ran (queue full, "
                                "shutting down).", ["reason"])
        self.speculative_requests = counter("turbolm:spec_decode_requests",
                                            "Requests decoded speculatively (they ran alone).")
        self.drafts = counter("turbolm:spec_decode_num_drafts", "Draft trees verified (one target forward each).")
        self.draft_tokens = counter("turbolm:spec_decode_num_draft_tokens", "Draft tokens proposed (tree nodes).")
        self.accepted_tokens = counter("turbolm:spec_decode_num_accepted_tokens",
                                       "Draft tokens the target accepted (bonus tokens not counted).")
        self.accepted_per_pos = counter("turbolm:spec_decode_num_accepted_tokens_per_pos",
                                        "Accepted draft tokens by depth in the tree (1: the first drafted token).",
                                        ["position"])

    def finished(self, reason: str, prompt_tokens: int = 0, generated: int = 0, latency: float | None = None) -> None:
        self.requests.labels(finish_reason=reason, **self._label).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)
        if latency is not None:
            self.e2e.observe(latency)

    def rejected_request(self, reason: str) -> None:
        self.rejected.labels(reason=reason, **self._label).inc()

    def speculation(self, stats: dict) -> None:
        """Counts from a speculative result's ``stats``: ``steps`` drafts, ``mean_tree_nodes`` per
        draft, and ``tokens_per_step_histogram`` (tokens per step, bonus included: a step of k tokens
        accepted the draft's tokens at depths 1 .. k-1)."""
        steps = int(stats.get("steps", 0))
        self.speculative_requests.inc()
        self.drafts.inc(steps)
        self.draft_tokens.inc(round(stats.get("mean_tree_nodes", 0.0) * steps))
        per_step = {int(k): n for k, n in stats.get("tokens_per_step_histogram", {}).items()}
        self.accepted_tokens.inc(sum((k - 1) * n for k, n in per_step.items()))
        for depth in range(1, max(per_step, default=1)):
            self.accepted_per_pos.labels(position=str(depth), **self._label).inc(
                sum(n for k, n in per_step.items() if k - 1 >= depth))

    content_type = CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        return generate_latest(self.registry)
