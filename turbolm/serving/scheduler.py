"""The scheduler: one thread owns the model and decodes every request; the web server only queues
requests (:meth:`Scheduler.submit`) and relays the events each request's ``emit`` receives.

Each round the thread admits waiting requests, first come first served, while fewer than
``max_batch`` run; takes out the requests that were cancelled (the client went away) or ran past
their deadline; then decodes. Continuous batching: an admitted request is prefilled and joins the
running :class:`~.batch.Batch` between two steps, and leaves it when its output ends, so requests
of any length share every forward.

Speculation pays when the model has the CPU to itself and costs throughput under load (a tree
verification is as dear as a batched step), so, as vLLM turns speculation off by batch size, the
configured speculative decoder serves a request that arrives to an idle server (nothing running,
nothing waiting). Requests that arrive while it runs join a plain batch decoded in the same
rounds (one speculative step, then one batched step): nobody waits for the speculative request to
end, and once it has, newcomers join the batch while anything runs. Seeded sampling requests
always decode plainly, so that a seed gives the same text at any load.

Any error while a request is prefilled or decoded fails that request (a failed batched forward:
the requests of that batch), never the thread. :meth:`Scheduler.stop` lets running and waiting
requests finish, then ends the thread (after ``timeout`` it fails what is left).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..core.errors import ParameterError, TurboLMError
from ..core.generation import SamplingParams
from .batch import Batch, Row

log = logging.getLogger("turbolm.serving")

#: OutputTracker's finish reasons as the OpenAI API spells them
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclass(frozen=True)
class Text:
    """More of the answer's text."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The answer ended: its whole text, token counts and why it ended (``stop`` or ``length``)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class Failed:
    """The request failed; ``status`` is the HTTP status that says why."""

    message: str
    status: int = 500
    code: str = "internal_error"


@dataclass(eq=False)
class Job:
    """One request as the scheduler sees it: token ids in, events out (``emit`` is called from
    the scheduler's thread and must not block; :class:`Text` events only with ``stream``).
    ``max_new_tokens`` must fit the model's context (``check_prompt_length``); ``timeout``:
    seconds from arrival to the last token."""

    prompt: Sequence[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    emit: Callable[[Text | Finished | Failed], None] = lambda event: None
    stream: bool = True
    timeout: float | None = None
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    first_token: float | None = None
    last_token: float | None = None

    def cancel(self) -> None:
        """Ask the scheduler to stop this request and free its place (safe from any thread)."""
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.timeout is not None and now - self.arrived > self.timeout


def check_limits(max_batch: int = 1, max_queue: int = 0, request_timeout: float | None = None) -> None:
    """Raise :class:`ParameterError` for limits a server cannot run with."""
    if max_batch < 1:
        raise ParameterError(f"{{}} must be >= 1, got {max_batch}", "max_batch")
    if max_queue < 0:
        raise ParameterError(f"{{}} must be >= 0, got {max_queue}", "max_queue")
    if request_timeout is not None and not request_timeout > 0:
        raise ParameterError(f"{{}} must be > 0 seconds, got {request_timeout}", "request_timeout")


class QueueFull(TurboLMError):
    """``max_batch`` requests run and ``max_queue`` wait: come back later."""


class ShuttingDown(TurboLMError):
    """The server is stopping (or its scheduler died) and takes no new requests."""


class Scheduler:
    """Continuous batching over one model, in a thread of its own (see the module doc).

    ``decoder``: a speculative decoder (``build_decoder``) for requests that run alone; None or
    a vanilla decoder: every request decodes in the batch. ``max_batch``: requests decoded at once;
    ``max_queue``: requests that may wait beyond those. ``metrics``: a :class:`~.metrics.Metrics`.
    """

    def __init__(self, model, tokenizer, decoder=None, *, max_batch: int = 8, max_queue: int = 64, metrics=None):
        check_limits(max_batch, max_queue)
        self.batch = Batch(model, tokenizer)
        if self.batch.max_rows is not None and max_batch > self.batch.max_rows:
            log.warning("turbolm: this model has sliding-window layers; requests decode one at a time")
            max_batch = self.batch.max_rows
        self.max_batch, self.max_queue = max_batch, max_queue
        self.decoder = decoder if getattr(decoder, "tree", None) is not None else None
        self.metrics = metrics
        self._waiting: deque[Job] = deque()
        self._running = 0  # admitted and not ended
        self._spec: tuple[Job, Iterator[str]] | None = None
        self._lock = threading.Condition()
        self._stopping = self._abort = False
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._run, name="turbolm-scheduler", daemon=True)
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFull` or :class:`ShuttingDown` instead."""
        with self._lock:  # before start() it queues (served once the thread runs)
            if self._stopping or (self._thread is not None and not self._thread.is_alive()):
                raise ShuttingDown("the server is shutting down")
            if self._running + len(self._waiting) >= self.max_batch + self.max_queue:
                raise QueueFull(f"the server is full ({self.max_batch} requests running, {self.max_queue} waiting); "
                                "retry later")
            self._waiting.append(job)
            self._lock.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Take no new requests, let the admitted and waiting ones finish (for up to ``timeout``
        seconds; then they fail) and end the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._lock:
                self._abort = True
                self._lock.notify()
            self._thread.join()

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while (admitted := self._next_round()) is not None:
                pending = deque(admitted)
                try:
                    while pending:
                        self._start(pending[0])
                        pending.popleft()
                    self._drop_ended()
                    if self._spec is not None:
                        self._spec_step()
                    if self.batch.rows:
                        self._batch_step()
                except Exception as e:  # a bug here must not stop the server: fail what runs, go on
                    log.exception("turbolm: scheduler error")
                    self._fail_all(Failed(f"internal error: {type(e).__name__}: {e}"), pending)
            if self._abort:
                self._fail_all(Failed("the server shut down before the request finished", 503, "shutting_down"))

    def _next_round(self) -> list[Job] | None:
        """Wait for work; return the jobs admitted this round, or None when it is time to end."""
        with self._lock:
            while not self._waiting and not self._running:
                if self._stopping:
                    return None
                self._lock.wait()
            if self._abort:
                return None
            admitted = []
            while self._waiting and self._running < self.max_batch:
                admitted.append(self._waiting.popleft())
                self._running += 1
            return admitted

    def _start(self, job: Job) -> None:
        if self._ended(job, time.monotonic()):
            return
        if self.decoder is not None and job.sampling.seed is None and self._running == 1 and not self._waiting:
            pieces = self.decoder.stream(job.prompt, job.max_new_tokens, job.sampling, job.stop)
            self._spec = (job, iter(pieces))
            return
        try:
            row = self.batch.add(job, job.prompt, job.max_new_tokens, job.sampling, job.stop,
                                 on_text=(lambda text: self._send(job, Text(text))) if job.stream else None)
        except Exception as e:
            self._fail(job, e)
            return
        self._token(job, time.monotonic())
        if row.tracker.done:
            self._finish_row(row)

    def _spec_step(self) -> None:
        job, pieces = self._spec
        try:
            piece = next(pieces)
        except StopIteration:
            self._spec = None
            result = self.decoder.result
            now = time.monotonic()
            if job.first_token is None:  # no text came out (an EOS first, say)
                self._token(job, now)
            n = result.new_tokens
            if self.metrics is not None:
                self.metrics.speculation(result.stats)
                for _ in range(n - 1):  # the stream gives text, not token times: the mean interval
                    self.metrics.itl.observe((now - job.first_token) / (n - 1))
            self._finish(job, result.text, result.prompt_tokens, n, result.finish_reason)
            return
        except Exception as e:
            self._spec = None
            self._fail(job, e)
            return
        if job.first_token is None:
            self._token(job, time.monotonic())
        if job.stream:
            self._send(job, Text(piece))

    def _batch_step(self) -> None:
        rows = list(self.batch.rows)
        try:
            done = self.batch.step()
        except Exception as e:
            self.batch.remove(rows)
            for row in rows:
                self._fail(row.key, e)
            return
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(rows))
        for row in rows:
            self._token(row.key, now)
        for row in done:
            self._finish_row(row)

    def _drop_ended(self) -> None:
        """Take out the requests that were cancelled or ran out of time, waiting ones included."""
        now = time.monotonic()
        gone = [row for row in self.batch.rows if row.key.cancelled or row.key.expired(now)]
        self.batch.remove(gone)
        for row in gone:
            self._ended(row.key, now)
        if self._spec is not None and self._ended(self._spec[0], now):
            self._spec[1].close()
            self._spec = None
        with self._lock:
            late = [job for job in self._waiting if job.cancelled or job.expired(now)]
            for job in late:
                self._waiting.remove(job)
            self._running += len(late)  # _ended counts them out
        for job in late:
            self._ended(job, now)

    def _ended(self, job: Job, now: float) -> bool:
        """End ``job`` if it was cancelled or ran out of time; return whether it did."""
        if job.cancelled:
            self._end(job, "cancelled")
        elif job.expired(now):
            self._send(job, Failed(f"the request ran out of time ({job.timeout:g} s)", 408, "timeout"))
            self._end(job, "timeout")
        else:
            return False
        return True

    # -- events and bookkeeping ----------------------------------------------------------------

    def _token(self, job: Job, now: float) -> None:
        """``job`` got a token at ``now`` (the first one: time to first token)."""
        if self.metrics is not None:
            if job.first_token is None:
                self.metrics.ttft.observe(now - job.arrived)
            else:
                self.metrics.itl.observe(now - job.last_token)
        if job.first_token is None:
            job.first_token = now
        job.last_token = now

    def _finish_row(self, row: Row) -> None:
        t = row.tracker
        self._finish(row.key, t.text, row.prompt_tokens, len(t.token_ids), t.finish_reason)

    def _finish(self, job: Job, text: str, prompt_tokens: int, completion_tokens: int, reason: str) -> None:
        reason = FINISH_REASONS[reason]
        self._send(job, Finished(text, prompt_tokens, completion_tokens, reason))
        self._end(job, reason, prompt_tokens, completion_tokens)

    def _fail(self, job: Job, error: Exception) -> None:
        log.error("turbolm: a request failed", exc_info=error)
        self._send(job, Failed(f"internal error: {type(error).__name__}: {error}"))
        self._end(job, "error")

    def _fail_all(self, event: Failed, pending: Sequence[Job] = ()) -> None:
        """Fail every admitted job (``pending``: admitted, not started) and, when aborting, every waiting one."""
        jobs = [row.key for row in self.batch.rows] + ([self._spec[0]] if self._spec is not None else [])
        jobs += [job for job in pending if job not in jobs]
        self.batch.remove(list(self.batch.rows))
        if self._spec is not None:
            self._spec[1].close()
            self._spec = None
        with self._lock:
            if self._abort:
                jobs += list(self._waiting)
                self._running += len(self._waiting)
                self._waiting.clear()
        for job in jobs:
            self._send(job, event)
            self._end(job, "error")

    def _end(self, job: Job, reason: str, prompt_tokens: int = 0, generated: int = 0) -> None:
        with self._lock:
            self._running -= 1
        if self.metrics is not None:
            latency = time.monotonic() - job.arrived if reason in ("stop", "length") else None
            self.metrics.finished(reason, prompt_tokens, generated, latency)

    def _send(self, job: Job, event) -> None:
        try:
            job.emit(event)
        except Exception:  # nobody listens any more (the loop closed): stop working for it
            job.cancel()
