"""SpeculativeGenerator: prefill -> (propose -> verify -> accept -> compact) ... -> output.

One step: the proposer drafts a tree after the committed context; the target runs
once over the root and every tree node (tree attention mask, position = depth); the
acceptance rule keeps the longest path the target agrees with plus the target's own
next token; the KV cache keeps only that path. Output is exactly the target's own
(greedy) or distributed as the target's (sampling).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext

import torch

from ..core.generation import (
    FeatureCapture,
    GenerationResult,
    OutputTracker,
    SamplingParams,
    check_prompt_length,
    drain,
    eos_token_ids,
    forward,
    logits_to_probs,
    next_token,
    stream_text,
)
from .cache import keep_only, new_tree_cache
from .gate import SpeculationGate
from .proposers.base import Proposer
from .tree import Tree, TreeConfig, tree_attention_mask, tree_position_ids
from .verify import accept_greedy, accept_sampling


class SpeculativeGenerator:
    """Lossless speculative decoding of ``target`` with any :class:`Proposer` (batch size 1).

    ``adaptive``: per step, verify the proposed tree or only its root (a plain one-token step),
    whichever the measured rates say is faster on the text being written
    (:class:`~.gate.SpeculationGate`; True for the default gate).
    """

    tree_choice = None  # set by build_decoder when --tree auto chose the tree

    def __init__(self, target, tokenizer, proposer: Proposer, tree: TreeConfig | None = None,
                 adaptive: bool | SpeculationGate = False):
        self.target = target
        self.tokenizer = tokenizer
        self.proposer = proposer
        self.gate = SpeculationGate() if adaptive is True else (adaptive or None)
        self.result: GenerationResult | None = None
        if tree is not None:
            proposer.tree = tree
        proposer.check_compatible(target, tokenizer)

    @property
    def name(self) -> str:
        return self.proposer.name

    @property
    def tree(self) -> TreeConfig:
        return self.proposer.tree

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Sequence[int],
        max_new_tokens: int = 256,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        self.result = drain(self._run(list(input_ids), max_new_tokens, sampling or SamplingParams(), stop, on_text))
        return self.result

    def stream(
        self,
        input_ids: Sequence[int],
        max_new_tokens: int = 256,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[str]:
        """Yield the answer's text as it is produced; ``self.result`` holds the statistics afterwards."""
        def run(on_text):
            return self._run(list(input_ids), max_new_tokens, sampling or SamplingParams(), stop, on_text)

        return stream_text(run, lambda r: setattr(self, "result", r))

    def _run(self, prompt: list[int], max_new_tokens: int, sampling: SamplingParams, stop, on_text):
        target = self.target
        budget = check_prompt_length(len(prompt), max_new_tokens, target, self.tokenizer)
        tracker = OutputTracker(self.tokenizer, eos_token_ids(target, self.tokenizer), budget, stop, on_text)
        generator = sampling.generator(target.device)
        capture = FeatureCapture(target) if self.proposer.needs_features else nullcontext()
        with capture:
            return (yield from self._loop(prompt, budget, tracker, sampling, generator, capture))

    def _loop(self, prompt, budget, tracker, sampling, generator, capture):
        target, device = self.target, self.target.device
        histogram: Counter[int] = Counter()
        draft_s = verify_s = 0.0
        tree_nodes = 0

        def features(rows=None):
            if not self.proposer.needs_features:
                return None
            f = capture.features[0]
            return f if rows is None else f[rows]

        start = time.perf_counter()
        cache = new_tree_cache()
        out = forward(target, torch.tensor([prompt], device=device), cache, logits_to_keep=1)
        forwards = 1
        prefill_s = time.perf_counter() - start
        context = prompt + [next_token(out.logits[0, -1], sampling, generator)]
        done = tracker.push(context[-1:])
        self.proposer.start(prompt, features())
        gate = self.gate
        if gate is not None:
            gate.start()
        yield
        while not done:
            # The root sits at position len(context) - 1; a node at depth d at len(context) - 1 + d.
            # A step adds the accepted path plus one bonus token; the budget already fits the context.
            room = budget - len(tracker.token_ids)
            t0 = time.perf_counter()
            tree = self.proposer.propose(context, max_depth=room - 1)
            tree = tree.limited(room - 1, self.proposer.max_nodes)
            if gate is not None and not gate.verify(len(tree) - 1):
                tree = Tree.root_only(context[-1])
            t1 = time.perf_counter()
            prefix = len(context) - 1
            mask = tree_attention_mask(tree, prefix, target.config, target.dtype, device)
            out = forward(
                target,
                torch.tensor([tree.tokens], device=device),
                cache,
                attention_mask=mask,
                position_ids=tree_position_ids(tree, prefix, device),
            )
            logits = out.logits[0]
            forwards += 1
            self.proposer.verified(tree, logits)
            if sampling.greedy:
                path, bonus = accept_greedy(tree, logits.argmax(-1).tolist())
            else:
                path, bonus = accept_sampling(tree, lambda i: logits_to_probs(logits[i], sampling), generator)
            keep_only(cache, prefix, [0] + path)
            t2 = time.perf_counter()
            draft_s += t1 - t0
            verify_s += t2 - t1
            histogram[len(path) + 1] += 1  # tokens this step, bonus included (its mean is tau)
            tree_nodes += len(tree) - 1
            new = [tree.tokens[i] for i in path] + [bonus]
            context.extend(new)
            done = tracker.push(new)
            self.proposer.accepted(context, len(new), features([0] + path))
            if gate is not None:
                gate.record(len(tree) - 1, len(new), time.perf_counter() - t0)
            yield

        seconds = time.perf_counter() - start
        steps = forwards - 1
        return GenerationResult(
            token_ids=tracker.token_ids,
            text=tracker.text,
            prompt_tokens=len(prompt),
            finish_reason=tracker.finish_reason,
            target_forwards=forwards,
            seconds=seconds,
            prefill_seconds=prefill_s,
            stats={
                "method": self.proposer.name,
                "tree": vars(self.proposer.tree).copy(),
                "steps": steps,
                "tokens_per_step_histogram": {str(k): histogram[k] for k in sorted(histogram)},
                "mean_tree_nodes": tree_nodes / steps if steps else 0.0,
                "draft_seconds": draft_s,
                "verify_seconds": verify_s,
                "other_seconds": seconds - prefill_s - draft_s - verify_s,
                **self.proposer.stats(),
                **(gate.stats() if gate is not None else {}),
            },
        )
