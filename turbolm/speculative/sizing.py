"""Hardware-aware tree sizing: ``--tree auto``.

A bigger tree accepts more tokens per step but costs more: the draft runs one forward per
level over ``top_k`` nodes, the target verifies ``total_tokens + 1`` tokens at once. Which
size wins depends on the machine (a GPU verifies 64 tokens for about the price of one; two
CPU cores do not) and on the draft. So, for each candidate (total_tokens, depth, top_k):

    tokens per step  = 1 + E[accepted nodes]          from acceptance statistics (below)
    seconds per step = draft(depth, top_k) + verify(total_tokens + 1)   measured here
    choose the candidate with the most tokens per second; vanilla decoding is 1 / verify(1).

Acceptance statistics come from greedy generations on built-in prompts. At every step the
draft drafts, at the same state, the tree of every grid depth with the largest top_k and every
candidate kept (:meth:`propose_per_depth`: a real tree of that depth, so a Jakiro tree's last
level comes from its contrastive branch, as when it decodes). Under greedy verification what a
tree accepts is fixed by the target's own continuation, which the finished output holds (the
output is the target's own), so every tree is scored against it: a smaller top_k or total_tokens
is rebuilt inside the tree of its depth with EAGLE-2's rule (top_k children per expanded node,
the top_k best nodes of a level expanded, the best total_tokens kept), and the path it would have
accepted is the part of the continuation it contains. The table E[accepted | depth, top_k,
total_tokens] is exact for the recorded steps (tested against trees built directly). The same
steps give the table of a hybrid ``merge`` tree (the draft's tree plus prompt lookup's branch:
it accepts the longer of the two matches) and its mean number of added n-gram nodes. Stored with
a draft checkpoint as ``acceptance.json`` (machine-independent, ``version`` 2) or calibrated once
and cached. Version-1 files (one recording with one depth-8 tree, every smaller depth rebuilt
inside it) are still read: exact enough for EAGLE-2, optimistic for Jakiro trees shallower than 8
levels; ``turbolm draft calibrate`` rewrites them. Timings are machine-specific and cached per
machine, model, draft and dtype.

A cached timing can lie: measured while other processes kept the CPUs busy, it describes that
moment, not the machine (a one-token step cached at 1.9 s instead of 0.03 s promised a 21x speed-up
for a tree slower than vanilla). So every use re-times the one-token target step first (a few
forwards) and times everything again when it is off by more than ``TimingPolicy.tolerance`` either
way; timings taken while other processes kept CPUs busy are used for that run but never cached;
``retime`` times again on request. A cache that cannot be read or written, or holds damaged
entries, costs a measurement and one warning, never the run; the file is only rewritten (atomically)
when something in it changed.

Tree sizes everywhere: ``total_tokens`` counts the proposed nodes, not the root (the last
committed token); ``depth`` counts levels below the root. EAGLE-2's "60 / 5 / 10" (60 with the
root, depth 5 meaning 6 levels) is 59 / 6 / 10 here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from ..core.errors import DataError, ParameterError, TurboLMError
from ..core.generation import synchronize
from ..core.io import read_cache_json, write_cache_json, write_json
from ..core.machine import BUSY_CPUS, OtherLoad, load_average, too_busy
from .proposers.base import Proposer
from .tree import Tree, TreeConfig, union_trees

GRID_TOTAL = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64)
GRID_DEPTH = (1, 2, 3, 4, 5, 6, 7, 8)
GRID_TOP_K = (1, 2, 3, 4, 6, 8, 10)
CALIBRATION_TREE = TreeConfig(total_tokens=64, depth=8, top_k=10)
# Sampling: every step verifies all of the trees recorded (a depth-6, top-4 tree has 84 candidates, plus
# the contrastive last levels of the shallower ones), and sampling accepts fewer nodes than greedy
# decoding, so trees bigger than this are rarely worth their verification.
SAMPLED_CALIBRATION_TREE = TreeConfig(total_tokens=64, depth=6, top_k=4)
CALIBRATION_PROMPTS = (
    "Write a short story about a robot who learns to paint.",
    "Explain how a hash table works and give a Python example.",
    "What are the main causes of climate change? Answer in a few sentences.",
    "Translate to French: The weather is nice today and we are going to the beach.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Summarize: The Industrial Revolution began in Britain in the late 18th century and spread to "
    "Europe and North America, transforming economies from agriculture to manufacturing.",
    "Pretend you are a tour guide in Rome and welcome a group of visitors.",
    "Extract the names and dates from this text: Marie Curie won the Nobel Prize in 1903 and again in 1911.",
    "Write a Python function that checks whether a string is a palindrome.",
    "If a train travels 60 miles in 1.5 hours, what is its average speed? Explain step by step.",
    "Describe the water cycle for a ten-year-old.",
    "Give three tips for staying productive while working from home.",
)
ACCEPTANCE_FILE = "acceptance.json"
ACCEPTANCE_VERSION = 2  # 1: one big tree, smaller depths rebuilt inside it; 2: every depth's own tree
CONVENTION = "nodes excluding the root, depth in levels below it: EAGLE-2's 60 / 5 / 10 is 59 / 6 / 10 here"
VERIFY_SIZES = (1, 2, 3, 4, 5, 7, 9, 11, 13, 17, 21, 25, 33, 41, 49, 65)
TIMINGS_DIR = "tree-sizing"  # under the cache root: one JSON file per timing_key

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SizingGrid:
    """What ``--tree auto`` measures and chooses among: candidate tree sizes, the verification
    sizes timed, and the calibration generations for a draft without stored statistics."""

    total_tokens: tuple[int, ...] = GRID_TOTAL
    depths: tuple[int, ...] = GRID_DEPTH
    top_ks: tuple[int, ...] = GRID_TOP_K
    verify_sizes: tuple[int, ...] = VERIFY_SIZES
    prompts: tuple[str, ...] = CALIBRATION_PROMPTS
    max_new_tokens: int = 64

    def key(self) -> str:
        """'' for the default grid, else a short digest (timings of another grid are cached apart)."""
        return "" if self == SizingGrid() else hashlib.sha256(repr(self).encode()).hexdigest()[:12]


# --- acceptance statistics -----------------------------------------------------------------------


def candidate_ranks(children: list[list[int]], scores: list[float], depths: list[int], depth: int,
                    top_k: int) -> dict[int, int]:
    """Rebuild the (depth, top_k) EAGLE-2 tree inside a recorded tree: ``{node: rank}`` for its
    candidates, ranked by score as the final rerank ranks them (a tree keeping the best N nodes
    holds those of rank < N). ``children`` must be in score order, as :class:`Tree` keeps them;
    the recorded tree must hold every candidate of the rebuilt one (same depth, a top_k and every
    candidate kept)."""
    candidates: list[int] = []
    level = children[0][:top_k]
    for d in range(1, depth + 1):
        candidates += level
        if d == depth:
            break
        expanded = sorted(level, key=lambda i: -scores[i])[:top_k]
        level = [c for e in expanded for c in children[e][:top_k]]
    order = sorted(candidates, key=lambda i: (-scores[i], depths[i]))
    return {node: r for r, node in enumerate(order)}


def _path_ranks(rank: dict[int, int], path: list[int]) -> list[int]:
    """Ranks of the part of ``path`` (root's child first) the rebuilt tree contains (a prefix: a
    child never outranks its parent, so ranks grow along it)."""
    out = []
    for node in path:
        if node not in rank:
            break
        out.append(rank[node])
    return out


def subtree_path_ranks(parents: list[int], scores: list[float], path: list[int], depth: int, top_k: int) -> list[int]:
    """:func:`candidate_ranks` for a tree given by ``parents`` and ``scores``, of the nodes of
    ``path`` the rebuilt tree contains. A tree keeping the best N nodes accepts
    ``sum(r < N for r in ranks)`` of them."""
    tree = Tree([0] * len(parents), parents, scores)
    return _path_ranks(candidate_ranks(tree.children, scores, tree.depths, depth, top_k), path)


def _follow(tree: Tree, tokens: list[int]) -> list[int]:
    """The nodes of ``tree`` that spell the longest prefix of ``tokens``: the path greedy verification
    accepts when ``tokens`` is the target's own continuation."""
    path, node = [], 0
    for tok in tokens:
        node = next((c for c in tree.children[node] if tree.tokens[c] == tok), None)
        if node is None:
            break
        path.append(node)
    return path


def _mapping(tree: Tree, other: Tree) -> list[int | None]:
    """For each node of ``other`` (same root), the node of ``tree`` with the same token path, or None."""
    mapped: list[int | None] = [0] + [None] * (len(other) - 1)
    for j in range(1, len(other)):
        parent = mapped[other.parents[j]]
        if parent is not None:
            mapped[j] = next((c for c in tree.children[parent] if tree.tokens[c] == other.tokens[j]), None)
    return mapped


def reach_probabilities(tree: Tree, probs: torch.Tensor) -> list[float]:
    """For each node, the probability that sampling verification (:func:`verify.accept_sampling`)
    accepts it: the product of the target's probabilities along its path. ``probs[i]`` is the
    target's sampling distribution after node i. Recursive rejection over distinct, deterministic
    candidates accepts a child exactly when the target's own sample is that child's token, so the
    expected number of accepted nodes of any tree is the sum of its nodes' reach probabilities."""
    child_p = probs[torch.tensor(tree.parents[1:]), torch.tensor(tree.tokens[1:])].tolist() if len(tree) > 1 else []
    reach = [1.0] * len(tree)
    for i in range(1, len(tree)):
        reach[i] = reach[tree.parents[i]] * child_p[i - 1]
    return reach


def sampling_settings(sampling) -> dict:
    """What a sampled acceptance table depends on: temperature, top-p, top-k ({} for greedy)."""
    if sampling is None or sampling.greedy:
        return {}
    return {"temperature": float(sampling.temperature), "top_p": float(sampling.top_p), "top_k": int(sampling.top_k)}


def ngram_settings(ngram) -> dict:
    """What a hybrid ``merge`` table depends on: the prompt-lookup proposer's settings."""
    return {"tree": asdict(ngram.tree), "max_ngram": ngram.max_ngram, "min_ngram": ngram.min_ngram}


@dataclass
class AcceptanceTable:
    """Mean accepted tree nodes per step (bonus token excluded) for every grid point:
    ``accepted[depth][top_k][total_tokens]`` (string keys, as stored in JSON).

    ``version``: 1 for old files (one big tree, smaller depths rebuilt inside it: optimistic for
    Jakiro's hybrid trees), 2 for exact tables. ``ngram``: version 2's table for a hybrid ``merge``
    tree, ``{"settings", "accepted", "extra_nodes"}``, the latter the mean number of n-gram nodes
    the merge adds to the draft's tree. ``extra_nodes``: set on the view :meth:`with_ngram` returns.
    ``sampling``: the sampling settings the table was recorded with (:func:`sampling_settings`; empty:
    greedy). ``sampled``: tables of the same draft recorded while sampling, in their JSON form (a
    greedy table's statistics overestimate what sampling accepts; :meth:`for_sampling` picks one)."""

    accepted: dict
    steps: int
    calibration: dict = field(default_factory=dict)
    version: int = 1
    ngram: dict = field(default_factory=dict)
    extra_nodes: dict = field(default_factory=dict)
    sampling: dict = field(default_factory=dict)
    sampled: list = field(default_factory=list)
    #: a merge view (:meth:`with_ngram`): the most nodes prompt lookup's branch adds (its tree's
    #: total_tokens); not a field, never stored
    ngram_branch = 0

    @property
    def exact(self) -> bool:
        return self.version >= ACCEPTANCE_VERSION

    def expected(self, tree: TreeConfig) -> float | None:
        return self.accepted.get(str(tree.depth), {}).get(str(tree.top_k), {}).get(str(tree.total_tokens))

    def extra(self, tree: TreeConfig) -> float:
        """Nodes verified beyond ``tree.total_tokens``, mean per step (the n-gram branch of a merge)."""
        return self.extra_nodes.get(str(tree.depth), {}).get(str(tree.top_k), {}).get(str(tree.total_tokens), 0.0)

    def with_ngram(self, settings: dict) -> AcceptanceTable | None:
        """The table of the hybrid ``merge`` tree (the draft's tree plus prompt lookup's branch), if
        it was recorded with these prompt-lookup ``settings`` (:func:`ngram_settings`)."""
        if not self.ngram or self.ngram.get("settings") != settings:
            return None
        view = AcceptanceTable(self.ngram["accepted"], self.steps, self.calibration, self.version,
                               extra_nodes=self.ngram["extra_nodes"], sampling=self.sampling)
        view.ngram_branch = int((settings.get("tree") or {}).get("total_tokens") or 0)
        return view

    def for_sampling(self, sampling) -> AcceptanceTable | None:
        """The table for decoding with ``sampling`` (a SamplingParams; None or temperature 0: greedy):
        this one if it was recorded that way, else the stored table recorded with the same settings,
        else None."""
        want = sampling_settings(sampling)
        if self.sampling == want:
            return self
        return next((t for t in map(AcceptanceTable.from_dict, self.sampled) if t.sampling == want), None)

    def candidates(self) -> list[TreeConfig]:
        return [TreeConfig(int(n), int(d), int(k)) for d, ks in self.accepted.items() for k, ns in ks.items() for n in ns
                if int(n) >= int(d)]

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, asdict(self), indent=None)

    @classmethod
    def from_dict(cls, obj) -> AcceptanceTable:
        """The table whose JSON form is ``obj``, checked (fields it does not know are ignored);
        ValueError says what is wrong."""
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        if "accepted" not in obj or "steps" not in obj:
            raise ValueError("no accepted / steps fields")
        table = cls(**{f.name: obj[f.name] for f in fields(cls) if f.name in obj})
        _check_table(table.accepted, "accepted")
        if not table.candidates():
            raise ValueError("accepted holds no tree size")
        if not _is_number(table.steps) or table.steps != int(table.steps) or table.steps < 1:
            raise ValueError(f"steps is {table.steps!r}, not a positive count")
        if not isinstance(table.version, int) or isinstance(table.version, bool):
            raise ValueError(f"version is {table.version!r}")
        for name in ("calibration", "ngram", "extra_nodes", "sampling"):
            if not isinstance(getattr(table, name), dict):
                raise ValueError(f"{name} is not a JSON object")
        if not isinstance(table.sampled, list):
            raise ValueError("sampled is not a JSON list")
        for i, entry in enumerate(table.sampled):
            try:
                if not cls.from_dict(entry).sampling:
                    raise ValueError("no sampling settings")
            except ValueError as e:
                raise ValueError(f"sampled[{i}]: {e}") from None
        if table.ngram:
            if not isinstance(table.ngram.get("settings"), dict):
                raise ValueError("ngram.settings is not a JSON object")
            _check_table(table.ngram.get("accepted"), "ngram.accepted")
            _check_table(table.ngram.get("extra_nodes"), "ngram.extra_nodes")
        if table.extra_nodes:
            _check_table(table.extra_nodes, "extra_nodes")
        return table

    @classmethod
    def load(cls, path: str | os.PathLike) -> AcceptanceTable:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except OSError as e:
            raise DataError(f"cannot read acceptance statistics {path}: {e.strerror or e}") from None
        except (ValueError, RecursionError) as e:
            raise DataError(f"acceptance statistics {path} are damaged ({e}); `turbolm draft calibrate` with this "
                            "draft measures them again") from None


def _is_number(x) -> bool:
    """A finite JSON number (not a bool, not NaN or infinite)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_table(d, what: str, levels: int = 3) -> None:
    """``d``: ``levels`` nested JSON objects keyed by positive integers (depth, top_k, total_tokens)
    down to numbers >= 0, as :class:`AcceptanceTable` stores them; ValueError says what is not."""
    if not isinstance(d, dict):
        raise ValueError(f"{what} is not a JSON object")
    for k, v in d.items():
        if not (isinstance(k, str) and k.isdecimal() and int(k) >= 1):
            raise ValueError(f"{what} has the key {k!r}, not a positive integer")
        if levels > 1:
            _check_table(v, f"{what}[{k}]", levels - 1)
        elif not _is_number(v) or v < 0:
            raise ValueError(f"{what}[{k}] is {v!r}, not a number >= 0")


class AcceptanceCounts:
    """Sums over recorded steps for an :class:`AcceptanceTable`. Each step gives, for every depth,
    the tree of that depth with ``max(top_ks)`` and every candidate kept, the target's own
    continuation, and optionally the n-gram tree a hybrid ``merge`` would add."""

    def __init__(self, depths, top_ks, totals):
        self.depths, self.top_ks, self.totals = sorted(depths), sorted(top_ks), sorted(totals)
        self.steps = 0

        def zeros():
            return {str(d): {str(k): {str(n): 0 for n in self.totals} for k in self.top_ks} for d in self.depths}

        self.sums, self.merged, self.added = zeros(), zeros(), zeros()

    def add(self, trees: dict[int, Tree], continuation: list[int], ngram: Tree | None = None) -> None:
        """One greedy step: a node is accepted when it spells part of the target's own ``continuation``."""
        def on_path(tree):
            return dict.fromkeys(_follow(tree, continuation), 1.0)

        self.add_weighted(trees, {d: on_path(trees[d]) for d in self.depths}, ngram,
                          on_path(ngram) if ngram is not None else None)

    def add_weighted(self, trees: dict[int, Tree], weights: dict[int, dict[int, float]], ngram: Tree | None = None,
                     ngram_weights: dict[int, float] | None = None) -> None:
        """One step in which verification accepts node n of the depth-d tree with probability
        ``weights[d][n]`` (absent: 0) and n-gram node g with ``ngram_weights[g]``: a tree rebuilt
        inside it (or merged with the n-gram tree) accepts, on average, the sum of its nodes'
        weights (greedy: 1 on the target's own continuation; sampling: the reach probability)."""
        self.steps += 1
        for d in self.depths:
            tree, weight = trees[d], weights[d]
            in_tree = _mapping(tree, ngram)[1:] if ngram is not None else []
            for k in self.top_ks:
                rank = candidate_ranks(tree.children, tree.scores, tree.depths, d, k)
                weighted = [(rank[n], w) for n, w in weight.items() if n in rank]
                # n-gram nodes with the rank of their twin in the rebuilt tree (math.inf: none there)
                grams = [(rank.get(t, math.inf) if t is not None else math.inf, ngram_weights.get(g, 0.0))
                         for g, t in enumerate(in_tree, 1)]
                sums, merged, added = self.sums[str(d)][str(k)], self.merged[str(d)][str(k)], self.added[str(d)][str(k)]
                for n in self.totals:
                    accepts = sum(w for r, w in weighted if r < n)
                    sums[str(n)] += accepts
                    if ngram is not None:
                        outside = [w for r, w in grams if r >= n]  # the n-gram nodes the merge adds
                        merged[str(n)] += accepts + sum(outside)
                        added[str(n)] += len(outside)

    def table(self, calibration: dict, ngram: dict | None = None, sampling: dict | None = None) -> AcceptanceTable:
        """The means; ``ngram``: the prompt-lookup settings of the n-gram trees given to :meth:`add`;
        ``sampling``: the sampling settings of the steps (:func:`sampling_settings`)."""
        if not self.steps:
            raise TurboLMError("no speculative steps were recorded to measure the draft's acceptance")

        def mean(sums):
            return {d: {k: {n: v / self.steps for n, v in ns.items()} for k, ns in ks.items()} for d, ks in sums.items()}

        extra = {"settings": ngram, "accepted": mean(self.merged), "extra_nodes": mean(self.added)} if ngram else {}
        return AcceptanceTable(mean(self.sums), self.steps, calibration, ACCEPTANCE_VERSION, extra,
                               sampling=sampling or {})


class AcceptanceRecorder(Proposer):
    """Wraps a draft proposer for calibration. Each step the draft drafts, at one state, the tree
    of every recorded depth with ``tree``'s top_k and every candidate kept.

    Greedy (``sampling`` None): the engine verifies the deepest tree cut to ``tree.total_tokens``
    nodes. Steps whose root is one of the first ``max_new_tokens`` answer tokens are scored once the
    target's own continuation is known (the answer ``lookahead`` tokens further on): generate
    ``max_new_tokens + lookahead`` tokens and call :meth:`finish` with the whole sequence after each
    generation.

    Sampling: for those steps the engine verifies the union of every tree (and the n-gram tree),
    and the target's distribution at each of its nodes (:meth:`verified`) gives every node's
    probability of being accepted (:func:`reach_probabilities`); the step is scored at once
    (generate ``max_new_tokens + lookahead`` tokens all the same, so no recorded step's trees are cut
    for the end of the budget)."""

    def __init__(self, proposer, grid: SizingGrid, tree: TreeConfig, ngram=None, max_new_tokens: int = 64,
                 sampling=None):
        depths = [d for d in grid.depths if d <= tree.depth]
        top_ks = [k for k in grid.top_ks if k <= tree.top_k]
        if not hasattr(proposer, "propose_per_depth"):
            raise TurboLMError(f"cannot measure the acceptance of {proposer.name}: it does not draft a dynamic tree")
        if not depths or not top_ks:
            raise ParameterError(f"{{}} has no depth / top_k within the calibration tree {tree}", "grid")
        deepest, k = max(depths), max(top_ks)
        every = k + (deepest - 1) * k * k  # candidates of a depth-D, top-k tree
        if every > 1024:
            raise ParameterError(f"{{}}: a depth-{deepest}, top-k {k} tree has {every} candidates; at most 1024 can "
                                 "be recorded", "grid")
        super().__init__(TreeConfig(tree.total_tokens, deepest, k))  # the tree verified each step
        self.inner, self.name, self.needs_features = proposer, proposer.name, proposer.needs_features
        self.every = TreeConfig(every, deepest, k)
        self.ngram = ngram
        self.counts = AcceptanceCounts(depths, top_ks, grid.total_tokens)
        self.sampling = None if sampling is None or sampling.greedy else sampling
        # greedy: the continuation that scores a step; both: room that no recorded step's trees are cut for
        self.lookahead = max(deepest, ngram.tree.depth if ngram is not None else 0)
        self.max_new_tokens = max_new_tokens
        self._prompt_length = 0
        self._open: list = []  # greedy: (context length, trees, n-gram tree) waiting for their continuation
        self._union = None  # sampling: (union tree, trees, n-gram tree, node maps) of the step being verified

    @property
    def max_nodes(self) -> int:
        return 1024 if self.sampling else self.tree.total_tokens

    def check_compatible(self, target, tokenizer) -> None:
        self.inner.check_compatible(target, tokenizer)

    def start(self, prompt_ids, features=None) -> None:
        self._open, self._union, self._prompt_length = [], None, len(prompt_ids)
        self.inner.start(prompt_ids, features)

    def propose(self, context: list[int], max_depth: int) -> Tree:
        trees = self.inner.propose_per_depth(context, self.every, self.counts.depths)
        if len(context) - self._prompt_length <= self.max_new_tokens:
            ngram = self.ngram.propose(context, self.ngram.tree.depth) if self.ngram is not None else None
            if self.sampling:
                parts = [trees[d] for d in sorted(trees, reverse=True)] + ([ngram] if ngram is not None else [])
                union, maps = union_trees(parts)
                self._union = (union, trees, ngram, maps)
                return union
            self._open.append((len(context), trees, ngram))
        return trees[self.tree.depth].best(self.tree.total_tokens)

    def verified(self, tree: Tree, logits) -> None:
        pending, self._union = self._union, None
        if pending is None or len(tree) != len(pending[0]):  # not a recorded step (or cut short: not scored)
            return
        from ..core.generation import logits_to_probs

        union, trees, ngram, maps = pending
        reach = reach_probabilities(union, logits_to_probs(logits, self.sampling))
        depths = sorted(trees, reverse=True)
        weights = {d: {n: reach[u] for n, u in enumerate(maps[i]) if n} for i, d in enumerate(depths)}
        grams = {g: reach[u] for g, u in enumerate(maps[-1]) if g} if ngram is not None else None
        self.counts.add_weighted(trees, weights, ngram, grams)

    def accepted(self, context, n_new, features=None) -> None:
        self.inner.accepted(context, n_new, features)
        self._score(context, final=False)

    def finish(self, token_ids: list[int]) -> None:
        """The generation ended with ``token_ids`` (prompt and answer): score the steps left (a
        continuation cut short by the end of the answer counts as far as it goes)."""
        self._score(token_ids, final=True)

    def _score(self, ids: list[int], final: bool) -> None:
        waiting = []
        for n, trees, ngram in self._open:
            if len(ids) < n + self.lookahead and not final:
                waiting.append((n, trees, ngram))
            else:
                self.counts.add(trees, ids[n : n + self.lookahead], ngram)
        self._open = waiting


def record_acceptance(target, tokenizer, proposer, prompts: tuple[str, ...] = CALIBRATION_PROMPTS,
                      max_new_tokens: int = 64, tree: TreeConfig | None = None, progress: bool = False,
                      grid: SizingGrid = SizingGrid(), ngram=None, sampling=None) -> AcceptanceTable:
    """Generations of up to ``max_new_tokens`` scored steps on ``prompts`` with a draft ``proposer``
    (one with ``propose_per_depth``: JakiroProposer, ModelProposer); the :class:`AcceptanceTable` of
    every grid point within ``tree``, and of hybrid ``merge`` trees with ``ngram`` (default: prompt
    lookup's defaults, as the hybrid proposer uses them).

    Greedy (``sampling`` None or temperature 0; ``tree`` default :data:`CALIBRATION_TREE`): costs
    greedy generation with ``tree`` (the trees of smaller depths share its draft forwards), plus
    ``lookahead`` more tokens per prompt, one draft lm_head per shallower hybrid tree's last level
    and the scoring. Sampling (``tree`` default :data:`SAMPLED_CALIBRATION_TREE`): each step verifies
    the union of every depth's tree, so a smaller calibration tree; prompt i samples with seed i
    (the sampling's own seed ignored), so a recording is reproducible."""
    from tqdm.auto import tqdm

    from ..core.chat import encode_prompt
    from .engine import SpeculativeGenerator
    from .proposers.prompt_lookup import PromptLookupProposer

    sampling = None if sampling is None or sampling.greedy else sampling
    tree = tree or (SAMPLED_CALIBRATION_TREE if sampling else CALIBRATION_TREE)
    ngram = ngram or PromptLookupProposer()
    recorder = AcceptanceRecorder(proposer, grid, tree, ngram, max_new_tokens, sampling)
    gen = SpeculativeGenerator(target, tokenizer, recorder)
    for i, p in enumerate(tqdm(prompts, desc="calibrating acceptance", unit="prompt", disable=not progress)):
        ids = encode_prompt(tokenizer, p)
        kwargs = {"sampling": replace(sampling, seed=i)} if sampling else {}
        recorder.finish(ids + gen.generate(ids, max_new_tokens=max_new_tokens + recorder.lookahead, **kwargs).token_ids)
    calibration = {"tree": asdict(recorder.tree), "every_depth": True, "prompts": len(prompts),
                   "max_new_tokens": max_new_tokens, "dtype": str(target.dtype).replace("torch.", "")}
    return recorder.counts.table(calibration, ngram_settings(ngram), sampling_settings(sampling))


# --- timing ------------------------------------------------------------------------------------


def _times(fn, repeats: int, device) -> list[float]:
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


@torch.inference_mode()
def time_step(target, prefix: int = 16, warmup: int = 2, repeats: int = 7) -> float:
    """Seconds of vanilla decoding's step, one target forward over one token after a ``prefix``-token
    KV cache: the fastest of ``repeats`` after ``warmup`` (the fastest: a stray busy moment slows
    some repeats, rarely all). A few forwards: the cheap check that cached timings still fit."""
    from ..core.generation import forward
    from .cache import new_tree_cache, truncate

    ids = torch.randint(100, target.config.vocab_size, (1, prefix + 1), generator=torch.Generator().manual_seed(0))
    ids = ids.to(target.device)
    cache = new_tree_cache()
    forward(target, ids[:, :prefix], cache, logits_to_keep=1)

    def step():
        forward(target, ids[:, prefix:], cache)
        truncate(cache, prefix)

    for _ in range(warmup):
        step()
    return min(_times(step, repeats, target.device))


@torch.inference_mode()
def time_verification(target, sizes: tuple[int, ...] = VERIFY_SIZES, prefix: int = 192,
                      repeats: int = 3) -> dict[int, float]:
    """Seconds for the target to verify ``n`` tree tokens after a ``prefix``-token KV cache,
    with the engine's own mask and positions (a chain of ``n`` tokens; the cost does not
    depend on the tree's shape). The fastest of ``repeats`` after a warm-up, the sizes timed in
    rounds (every size once per round): a burst of other work (another process starting) slows the
    sizes of one round, not every repeat of a few sizes, and the fastest repeat skips it."""
    from ..core.generation import forward
    from .cache import new_tree_cache, truncate
    from .tree import tree_attention_mask, tree_position_ids

    device = target.device
    g = torch.Generator().manual_seed(0)
    vocab = target.config.vocab_size
    ids = torch.randint(100, vocab, (1, prefix + max(sizes)), generator=g)
    cache = new_tree_cache()
    forward(target, ids[:, :prefix].to(device), cache, logits_to_keep=1)

    def verifier(n: int):
        chain = Tree(ids[0, prefix : prefix + n].tolist(), [-1] + list(range(n - 1)))

        def verify():
            mask = tree_attention_mask(chain, prefix, target.config, target.dtype, device)
            forward(target, torch.tensor([chain.tokens], device=device), cache, attention_mask=mask,
                    position_ids=tree_position_ids(chain, prefix, device))
            truncate(cache, prefix)

        return verify

    verifiers = {n: verifier(n) for n in sizes}
    for verify in verifiers.values():
        verify()  # warm-up
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeats):
        for n, verify in verifiers.items():
            times[n] += _times(verify, 1, device)
    return {n: min(ts) for n, ts in times.items()}


@torch.inference_mode()
def time_drafting(proposer, target, tokenizer, depths=GRID_DEPTH, top_ks=GRID_TOP_K, repeats: int = 2,
                  measured_depths=(1, 2, 4, 8)) -> dict:
    """Seconds the proposer needs to draft a (depth, top_k) tree in the steady state:
    ``{depth: {top_k: seconds}}``. Measured as propose() after start() minus the catch-up
    over the prompt (a depth-0 proposal), plus one small catch-up forward (what a step
    feeds the draft after acceptance), each the fastest of ``repeats``. Depths between
    ``measured_depths`` (and the deepest) are interpolated (a level costs about the same as the one
    before)."""
    from ..core.chat import encode_prompt
    from ..core.generation import FeatureCapture, forward
    from .cache import new_tree_cache

    device = target.device
    prompt = encode_prompt(tokenizer, CALIBRATION_PROMPTS[1])
    capture = FeatureCapture(target)
    with capture:
        out = forward(target, torch.tensor([prompt], device=device), new_tree_cache())
    features = capture.features[0] if proposer.needs_features else None
    context = prompt + [int(out.logits[0, -1].argmax())]
    saved = proposer.tree

    def run(tree: TreeConfig, max_depth: int):
        def go():
            proposer.start(prompt, features)
            proposer.propose(context, max_depth=max_depth)
        proposer.tree = tree
        return min(_times(go, repeats, device))

    try:
        run(TreeConfig(8, 2, 4), 2)  # warm-up
        base = run(TreeConfig(1, 1, 1), 0)
        catch_up = max(0.0, run(TreeConfig(1, 1, 1), 1) - base)
        # The deepest too: extrapolating a line through two noisy points can fall below zero.
        measured = sorted({d for d in measured_depths if d <= max(depths)} | {max(depths)})
        per_k = {k: {d: max(0.0, run(TreeConfig(max(d, k), d, k), d) - base) + catch_up for d in measured} for k in top_ks}
    finally:
        proposer.tree = saved
    return {d: {k: _interpolate(per_k[k], d) for k in top_ks} for d in depths}


# --- the choice ----------------------------------------------------------------------------------


@dataclass
class TreeChoice:
    tree: TreeConfig
    tokens_per_step: float
    draft_seconds: float
    verify_seconds: float
    vanilla_seconds: float  # one target forward over one token: vanilla decoding's step
    ngram_nodes: float = 0.0  # hybrid merge: n-gram nodes verified beyond tree.total_tokens, mean per step
    exact: bool = True  # False: from a version-1 acceptance table (optimistic for Jakiro's hybrid trees)

    @property
    def step_seconds(self) -> float:
        return self.draft_seconds + self.verify_seconds

    @property
    def expected_speedup(self) -> float:
        return self.tokens_per_step / self.step_seconds * self.vanilla_seconds

    def explain(self) -> str:
        t = self.tree
        extra = f" + {self.ngram_nodes:.1f} n-gram nodes on average" if self.ngram_nodes else ""
        msg = (f"tree auto: {t.total_tokens} nodes, depth {t.depth}, top-k {t.top_k}{extra} ({CONVENTION}): expected "
               f"{self.tokens_per_step:.2f} tokens per step at {self.step_seconds * 1e3:.0f} ms "
               f"(draft {self.draft_seconds * 1e3:.0f} + verify {self.verify_seconds * 1e3:.0f}) "
               f"vs vanilla {self.vanilla_seconds * 1e3:.0f} ms per token: {self.expected_speedup:.2f}x")
        if self.expected_speedup < 1:
            msg += " (no tree is expected to beat vanilla decoding on this machine)"
        if not self.exact:
            msg += (" (acceptance from a version-1 table, recorded with one big tree: optimistic for Jakiro trees "
                    "shallower than it; `turbolm draft calibrate` rewrites it)")
        return msg


def _interpolate(points: dict[int, float], n: int) -> float:
    xs = sorted(points)
    if n <= xs[0]:
        return points[xs[0]]
    for a, b in zip(xs, xs[1:]):
        if a <= n <= b:
            return points[a] + (points[b] - points[a]) * (n - a) / (b - a)
    a, b = xs[-2], xs[-1]  # extrapolate linearly past the largest measured size
    return points[b] + (points[b] - points[a]) * (n - b) / (b - a)


def verify_cost(verify_s: dict[int, float], rows: int, extra: float = 0.0, branch: int = 0) -> float:
    """Expected seconds to verify ``rows`` tree tokens plus a merge's n-gram nodes, ``extra`` of
    them on average out of at most ``branch``. Prompt lookup's branch is all or nothing - a match
    adds (most of) its chain, no match adds none - so the cost is priced at those two sizes, weighted
    to the mean: ``(1 - p) v(rows) + p v(rows + branch)`` with ``p = extra / branch``. Pricing the mean
    size instead (``v(rows + extra)``) is optimistic wherever the cost is not linear in the rows: on a
    2-core AMD EPYC 2 rows cost more than 5 (oneDNN's few-row kernels), and a 1-node draft tree plus
    3.8 n-gram nodes on average was priced at 37 ms a step where the engine measured 43."""
    if extra <= 0 or branch <= 0:  # (no branch size known: at the mean size)
        return _interpolate(verify_s, rows + max(extra, 0.0))
    p = min(1.0, extra / branch)
    return (1 - p) * _interpolate(verify_s, rows) + p * _interpolate(verify_s, rows + branch)


def choose_tree(acceptance: AcceptanceTable, verify_s: dict[int, float], draft_s: dict) -> TreeChoice:
    """The candidate with the most expected tokens per second."""
    verify_s = {int(k): v for k, v in verify_s.items()}
    best = None
    for tree in acceptance.candidates():
        per_k = draft_s.get(tree.depth) or draft_s.get(str(tree.depth))
        if per_k is None:
            continue
        d = per_k.get(tree.top_k, per_k.get(str(tree.top_k)))
        if d is None:
            continue
        extra = acceptance.extra(tree)  # a merge's n-gram nodes, all or nothing (verify_cost)
        choice = TreeChoice(tree, 1 + acceptance.expected(tree), d,
                            verify_cost(verify_s, tree.total_tokens + 1, extra, acceptance.ngram_branch),
                            _interpolate(verify_s, 1), extra, acceptance.exact)
        if best is None or choice.tokens_per_step / choice.step_seconds > best.tokens_per_step / best.step_seconds:
            best = choice
    if best is None:
        raise TurboLMError("no tree size could be evaluated (empty acceptance statistics or timings)")
    return best


def timing_key(target, proposer, draft_id: str) -> str:
    """The cache key of a proposer's timings: this machine (CPU, GPU, threads, torch), the
    target (dtype, device, kernels - which ones per row count, and whether sibling layers join -,
    weights), the proposer and ``draft_id`` (the draft's content)."""
    from ..core.kernels import is_optimized, table_of
    from ..core.machine import cpu_model
    from ..core.models import model_identity

    cpu = cpu_model()
    device = target.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    table = table_of(target)
    kernels = "" if table is None else repr((sorted(table.kernels.items()), table.joins))
    parts = [cpu, gpu, str(torch.get_num_threads()), torch.__version__, str(target.dtype), str(device), str(is_optimized(target)),
             model_identity(target)["embedding_sha256"], proposer.name, draft_id]
    if kernels:  # (a model without a kernel table keeps the key it had)
        parts.append(kernels)
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _roles(proposer):
    """``(recorded, timed, merged_ngram)``: the draft proposer whose acceptance is recorded, the
    proposer whose drafting is timed, and for a hybrid ``merge`` its n-gram proposer (the table of
    merged trees applies). A hybrid ``choose`` is sized as its draft alone."""
    from .proposers.hybrid import HybridProposer

    if not isinstance(proposer, HybridProposer):
        return proposer, proposer, None
    if proposer.mode == "merge":
        return proposer.drafter, proposer, proposer.ngram
    return proposer.drafter, proposer.drafter, None


def _applicable(table: AcceptanceTable | None, ngram) -> AcceptanceTable | None:
    if table is None or ngram is None:
        return table
    return table.with_ngram(ngram_settings(ngram))


@dataclass(frozen=True)
class TimingPolicy:
    """When ``--tree auto`` trusts cached timings and caches fresh ones. ``tolerance``: the one-token
    target step timed now (:func:`time_step`) may differ from the one timed with the cached timings
    by this factor either way, else everything is timed again. ``busy_cpus``: timings during which
    other processes kept more CPUs than this busy on average are used for the run but not cached
    (None: cached all the same)."""

    tolerance: float = 1.5
    busy_cpus: float | None = BUSY_CPUS


@dataclass
class Timings:
    """What ``--tree auto`` times on this machine: ``verify[n]``, seconds for the target to verify
    ``n`` tokens; ``draft[depth][top_k]``, seconds to draft a tree; ``step``, the one-token target
    step (:func:`time_step`) timed with them; ``measured``: when, and how busy the machine was."""

    verify: dict[int, float]
    draft: dict[int, dict[int, float]]
    step: float
    measured: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"verify_seconds": {str(n): s for n, s in self.verify.items()},
                "draft_seconds": {str(d): {str(k): s for k, s in ks.items()} for d, ks in self.draft.items()},
                "step_seconds": self.step, "measured": self.measured}

    @classmethod
    def from_json(cls, entry: dict, grid: SizingGrid) -> Timings:
        """The timings of a cache entry, every grid point present and a finite number of seconds
        (> 0; a draft may cost 0); ValueError says what is wrong. An entry from before the one-token
        step was recorded is checked against its verification of one token."""
        verify, draft = entry.get("verify_seconds"), entry.get("draft_seconds")
        if not isinstance(verify, dict) or not isinstance(draft, dict):
            raise ValueError("verify_seconds / draft_seconds are not JSON objects")
        v = {n: _seconds(verify.get(str(n)), f"verify_seconds[{n}]") for n in grid.verify_sizes}
        d = {}
        for depth in grid.depths:
            per_k = draft.get(str(depth))
            if not isinstance(per_k, dict):
                raise ValueError(f"draft_seconds[{depth}] is missing")
            d[depth] = {k: _seconds(per_k.get(str(k)), f"draft_seconds[{depth}][{k}]", zero=True) for k in grid.top_ks}
        step = _seconds(entry["step_seconds"], "step_seconds") if "step_seconds" in entry else _interpolate(v, 1)
        measured = entry.get("measured")
        return cls(v, d, step, measured if isinstance(measured, dict) else {})


def _seconds(x, what: str, zero: bool = False) -> float:
    if not _is_number(x) or x < 0 or (x == 0 and not zero):
        raise ValueError(f"{what} is {x!r}, not a {'' if zero else 'positive '}number of seconds")
    return float(x)


def _timings_file(key: str) -> tuple[Path | None, str | None]:
    """``(path, problem)``: the cache file of ``key``, or None and why there is none."""
    from ..core.io import cache_root

    try:
        return cache_root() / TIMINGS_DIR / f"{key}.json", None
    except (RuntimeError, KeyError, OSError, TurboLMError) as e:  # e.g. no home directory to put it in
        return None, f"no cache directory ({e})"


def _differ(now: float, then: float, tolerance: float) -> bool:
    return not then / tolerance <= now <= then * tolerance


def auto_tree(generator, *, acceptance: AcceptanceTable | None = None, draft_id: str = "", progress: bool = True,
              log=None, grid: SizingGrid = SizingGrid(), retime: bool = False,
              policy: TimingPolicy = TimingPolicy(), sampling=None) -> TreeChoice:
    """Choose the tree for ``generator`` (a SpeculativeGenerator) on this machine among ``grid``,
    set it, and return the choice. ``acceptance``: the draft's stored statistics (None, or without
    what this proposer needs: calibrate and cache). Timings are cached under the turbolm cache
    directory, keyed by :func:`timing_key`, and checked on every use (``policy``); ``retime``: time
    again all the same. A hybrid ``merge`` proposer is sized with the table of merged trees; a
    hybrid ``choose`` one as its draft alone. ``sampling`` (a SamplingParams; None: greedy): size the
    tree for decoding with these settings, from statistics recorded with them (stored with the draft,
    or recorded once and cached: sampling accepts less than greedy decoding). ``log`` receives progress lines and, when the cache
    cannot be used or the timings cannot be cached, one ``turbolm: warning:`` line (without ``log``,
    the warning goes to this module's logger)."""
    warn = log or _logger.warning
    log = log or (lambda msg: None)
    target, proposer = generator.target, generator.proposer
    recorded, timed, merged_ngram = _roles(proposer)
    path, problem = _timings_file(timing_key(target, proposer, draft_id + grid.key()))
    entry, problem = read_cache_json(path) if path is not None else ({}, problem)
    problems = [problem] if problem else []  # why the cache is not used as it should be: one warning at the end
    # What the file will hold: its valid parts and what was measured (a damaged or unreadable file is
    # replaced even when nothing new can be cached).
    store, changed = {}, bool(problem)
    step = time_step(target)  # first thing, so that it is timed alike on every use

    settings = sampling_settings(sampling)
    key = "sampled_acceptance" if settings else "acceptance"  # sampled: a list of tables, one per setting
    table = _applicable(acceptance.for_sampling(sampling) if acceptance is not None else None, merged_ngram)
    for name in ("acceptance", "sampled_acceptance"):
        if name not in entry:
            continue
        try:
            raw = entry[name] if name == "sampled_acceptance" else [entry[name]]
            cached = [AcceptanceTable.from_dict(t) for t in raw]
            store[name] = entry[name]
            if name == key and table is None:
                table = next((_applicable(t, merged_ngram) for t in cached if t.exact and t.sampling == settings), None)
        except (ValueError, TypeError) as e:
            problems.append(f"{path} is damaged ({name}: {e}), not used")
            changed = True
    if table is None:
        how = "sampling at temperature " + f"{sampling.temperature:g}" if settings else "greedy"
        log(f"tree auto: measuring this draft's acceptance once ({how}, a few short prompts) ...")
        full = record_acceptance(target, generator.tokenizer, recorded, grid.prompts, grid.max_new_tokens,
                                 progress=progress, grid=grid, ngram=getattr(proposer, "ngram", None), sampling=sampling)
        if settings:
            store[key] = [t for t in store.get(key, []) if t.get("sampling") != settings] + [asdict(full)]
        else:
            store[key] = asdict(full)
        changed = True
        table = _applicable(full, merged_ngram)

    timings = None
    if "verify_seconds" in entry or "draft_seconds" in entry:
        try:
            timings = Timings.from_json(entry, grid)
            store.update(timings.to_json())
        except ValueError as e:
            problems.append(f"{path} is damaged ({e}), not used")
            changed = True
    busy = None
    if timings is None or retime or _differ(step, timings.step, policy.tolerance):
        if retime:
            log("tree auto: timing the target and the draft again, as asked ...")
        elif timings is None:
            log("tree auto: timing the target and the draft on this machine once (cached) ...")
        else:
            log(f"tree auto: the cached timings do not fit this machine now (a one-token step took "
                f"{timings.step * 1e3:.1f} ms when they were measured, {step * 1e3:.1f} ms now): timing again ...")
        with OtherLoad() as load:
            verify = time_verification(target, grid.verify_sizes)
            draft = time_drafting(timed, target, generator.tokenizer, grid.depths, grid.top_ks)
        timings = Timings(verify, draft, step, {"unix_time": round(time.time()), "other_cpus_busy": load.cpus,
                                                "load_average": load_average()})
        if too_busy(load.cpus, policy.busy_cpus):
            busy = (f"other processes kept {load.cpus:.1f} CPUs busy while timing, so these timings are used for "
                    "this run only, not cached (run again when the machine is quieter)")
        else:
            store.update(timings.to_json())
            changed = True

    if changed and path is not None:
        error = write_cache_json(path, store)
        if error:
            problems.append(f"{error}: the measurements are used for this run only; "
                            "set TURBOLM_CACHE to a writable directory to keep them")
    elif path is None:
        problems.append("the measurements are used for this run only")
    if busy:
        problems.append(busy)
    if problems:
        warn("turbolm: warning: tree auto: " + "; ".join(problems))
    choice = choose_tree(table, timings.verify, timings.draft)
    proposer.tree = choice.tree
    return choice


def stored_acceptance(draft_dir: str | os.PathLike | None, overrides: dict | None = None) -> AcceptanceTable | None:
    """The acceptance statistics stored with a draft checkpoint, if any and if they apply
    (they were measured with the checkpoint's own candidate mode)."""
    if draft_dir is None or overrides or not (Path(draft_dir) / ACCEPTANCE_FILE).is_file():
        return None
    return AcceptanceTable.load(Path(draft_dir) / ACCEPTANCE_FILE)


def calibrate_draft(draft_dir: str | os.PathLike, target, tokenizer, *, max_new_tokens: int = 128,
                    tree: TreeConfig = CALIBRATION_TREE, progress: bool = True,
                    temperatures: tuple[float, ...] = (1.0,)) -> AcceptanceTable:
    """Measure a draft checkpoint's acceptance (:func:`record_acceptance`: greedy, the built-in
    prompts, every grid depth's own tree; then sampling at each of ``temperatures``, stored in the
    greedy table's ``sampled``) and store it as ``acceptance.json`` beside the weights, for ``--tree
    auto`` on any machine (the draft alone, and hybrid ``merge`` trees)."""
    from ..core.generation import SamplingParams
    from .draft.model import load_draft
    from .proposers.jakiro import JakiroProposer

    proposer = JakiroProposer(load_draft(draft_dir, target), target)
    table = record_acceptance(target, tokenizer, proposer, max_new_tokens=max_new_tokens, tree=tree, progress=progress)
    for t in temperatures:
        if t > 0:
            sampled = record_acceptance(target, tokenizer, proposer, max_new_tokens=max_new_tokens, progress=progress,
                                        sampling=SamplingParams(temperature=t))
            table.sampled.append(asdict(sampled))
    table.save(Path(draft_dir) / ACCEPTANCE_FILE)
    return table
