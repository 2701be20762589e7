"""Speculate only where it pays: per step, verify the proposed tree or take a plain step.

``--tree auto`` sizes the tree for the *average* text. Some text defeats every draft (the n-gram
branch finds nothing to copy, a long prompt makes each verification re-read a long cache) and
there a speculative step, measured, commits fewer tokens per second than a plain one-token
forward. The gate measures both on the text being written and picks the faster, per step, after
the proposer has drafted (drafting is cheap next to verifying; the draft's state stays in step
either way):

- the proposed trees are told apart by their number of nodes (a hybrid tree with n-gram nodes
  merged in accepts far more than the draft's tree alone; prompt lookup proposes 10 nodes on a
  match): for each size, running means (exponential, ``smoothing``) of the tokens a verified tree
  committed and of the step's wall seconds (draft, verification, bookkeeping);
- plain steps (the root alone, a one-token forward): a running mean of their seconds;
- a tree is verified when its size's ``tokens / seconds`` >= ``1 / seconds`` of a plain step.

A size is verified the first ``warmup`` times it comes, then one plain step is timed. A size
that loses is verified again after ``interval`` more proposals of it (a probe: the text may
have become draftable; the interval doubles after each probe that loses, up to
``max_interval``, and resets when one wins); while speculation wins, one plain step every
``replain`` steps re-measures the plain cost, which grows with the context. A probe counts with
weight ``PROBE_WEIGHT`` in the running means (it is the only news of the current text).

Lossless: a plain step is a tree of the root alone, verified like any other, and the choice uses
only the proposed tree and earlier steps' outcomes, never the step being verified. The outputs
are the target's own; only the split of the work between the two kinds of steps depends on the
machine's timings.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import ParameterError

PROBE_WEIGHT = 0.5  # a probe's weight in its size's running means: it is the only news of the current text


@dataclass
class _Arm:
    """Running statistics of the verified trees of one size."""

    interval: int
    tokens: float | None = None
    seconds: float | None = None
    verified: int = 0
    skipped: int = 0  # proposals of this size not verified since the last verified one


class SpeculationGate:
    def __init__(self, warmup: int = 3, interval: int = 2, max_interval: int = 16, replain: int = 32,
                 smoothing: float = 0.15):
        for name, value in (("warmup", warmup), ("interval", interval), ("max_interval", max_interval),
                            ("replain", replain)):
            if value < 1:
                raise ParameterError(f"{{}} must be >= 1, got {value}", name)
        if not 0.0 < smoothing <= 1.0:
            raise ParameterError(f"{{}} must be in (0, 1], got {smoothing}", "smoothing")
        self.warmup, self.base_interval, self.max_interval = warmup, interval, max_interval
        self.replain, self.smoothing = replain, smoothing
        self.start()

    def start(self) -> None:
        """A new sequence: forget every measurement (a new prompt is other text)."""
        self.arms: dict[int, _Arm] = {}
        self.plain_seconds: float | None = None
        self.spec_steps = self.plain_steps = 0
        self.since_plain = 0

    def _mean(self, old: float | None, new: float, weight: float | None = None) -> float:
        return new if old is None else old + (weight or self.smoothing) * (new - old)

    def _pays(self, arm: _Arm) -> bool:
        return arm.tokens * self.plain_seconds >= arm.seconds

    def verify(self, nodes: int) -> bool:
        """Whether to verify a proposed tree of ``nodes`` nodes (the root not counted); else the
        step verifies the root alone."""
        if nodes == 0:
            return True  # nothing proposed: a plain step anyway
        arm = self.arms.setdefault(nodes, _Arm(self.base_interval))
        if arm.verified < self.warmup:
            return True
        if self.plain_seconds is None or self.since_plain >= self.replain:
            return False  # (re)measure a plain step
        if self._pays(arm) or arm.skipped >= arm.interval:
            return True  # a winner, or a probe of a loser
        arm.skipped += 1
        return False

    def record(self, nodes: int, tokens: int, seconds: float) -> None:
        """The step just taken: the nodes verified (0: a plain step), the tokens it committed, its
        wall seconds."""
        if nodes == 0:
            self.plain_steps += 1
            self.plain_seconds = self._mean(self.plain_seconds, seconds)
            self.since_plain = 0
            return
        arm = self.arms.setdefault(nodes, _Arm(self.base_interval))
        probe = arm.skipped > 0
        self.spec_steps += 1
        self.since_plain += 1
        arm.verified += 1
        arm.skipped = 0
        weight = max(self.smoothing, PROBE_WEIGHT) if probe else None  # a probe speaks for the text of now
        arm.tokens = self._mean(arm.tokens, float(tokens), weight)
        arm.seconds = self._mean(arm.seconds, seconds, weight)
        if probe and self.plain_seconds is not None:
            arm.interval = self.base_interval if self._pays(arm) else min(2 * arm.interval, self.max_interval)

    def stats(self) -> dict:
        return {"adaptive": {"speculative_steps": self.spec_steps, "plain_steps": self.plain_steps}}
