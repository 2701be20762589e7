"""Hardware-aware tree sizing: ``--tree auto``.

A bigger tree accepts more tokens per step but costs more: the draft runs one forward per
level over ``top_k`` nodes, the target verifies ``total_tokens + 1`` tokens at once. Which
size wins depends on the machine (a GPU verifies 64 tokens for about the price of one; two
CPU cores do not) and on the draft. So, for each candidate (total_tokens, depth, top_k):

    tokens per step  = 1 + E[accepted nodes]          from acceptance statistics (below)
    seconds per step = draft(depth, top_k) + verify(total_tokens + 1)   measured here
    choose the candidate with the most tokens per second; vanilla decoding is 1 / verify(1).

Acceptance statistics come from greedy generations with one big tree: for every step the
tree (parents, draft scores) and the path the target accepted are recorded. Under greedy
verification the accepted path is fixed by the target's own choices, so the path a smaller
tree would have accepted is the part of the recorded path that the smaller tree contains;
the smaller tree is rebuilt inside the big one with EAGLE-2's rule (top_k children per
expanded node, the top_k best nodes of a level expanded, the best total_tokens kept). The
result is a table E[accepted | depth, top_k, total_tokens], stored with a draft checkpoint as
``acceptance.json`` (machine-independent) or calibrated once and cached. Timings are
machine-specific and cached per machine, model, draft and dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..core.errors import TurboLMError
from ..core.generation import synchronize
from ..core.io import write_json
from .tree import Tree, TreeConfig

GRID_TOTAL = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64)
GRID_DEPTH = (1, 2, 3, 4, 5, 6, 7, 8)
GRID_TOP_K = (1, 2, 3, 4, 6, 8, 10)
CALIBRATION_TREE = TreeConfig(total_tokens=64, depth=8, top_k=10)
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
VERIFY_SIZES = (1, 2, 3, 4, 5, 7, 9, 11, 13, 17, 21, 25, 33, 41, 49, 65)


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


def subtree_path_ranks(parents: list[int], scores: list[float], path: list[int], depth: int, top_k: int) -> list[int]:
    """Rebuild the (depth, top_k) EAGLE-2 tree inside a recorded tree and return, for each node
    of the recorded accepted ``path`` that it contains (a prefix of the path), its rank among
    the rebuilt tree's nodes by score. A tree keeping the best N nodes accepts
    ``sum(r < N for r in ranks)`` of them (ranks grow along a path: a child never outranks
    its parent). Children in ``parents`` must be in score order, as :class:`Tree` keeps them."""
    children: list[list[int]] = [[] for _ in parents]
    depths = [0] * len(parents)
    for i in range(1, len(parents)):
        children[parents[i]].append(i)
        depths[i] = depths[parents[i]] + 1
    candidates: list[int] = []
    level = children[0][:top_k]
    for d in range(1, depth + 1):
        candidates += level
        if d == depth:
            break
        expanded = sorted(level, key=lambda i: -scores[i])[:top_k]
        level = [c for e in expanded for c in children[e][:top_k]]
    order = sorted(candidates, key=lambda i: (-scores[i], depths[i]))
    rank = {node: r for r, node in enumerate(order)}
    ranks = []
    for node in path:
        if node not in rank:
            break
        ranks.append(rank[node])
    return ranks


@dataclass
class AcceptanceTable:
    """Mean accepted tree nodes per step (bonus token excluded) for every grid point:
    ``accepted[depth][top_k][total_tokens]`` (string keys, as stored in JSON)."""

    accepted: dict
    steps: int
    calibration: dict = field(default_factory=dict)

    @classmethod
    def from_steps(cls, steps: list[tuple[list[int], list[float], list[int]]], calibration: dict,
                   grid: SizingGrid = SizingGrid()) -> AcceptanceTable:
        if not steps:
            raise TurboLMError("no speculative steps were recorded to measure the draft's acceptance")
        big = TreeConfig(**calibration["tree"]) if "tree" in calibration else CALIBRATION_TREE
        table: dict = {}
        for d in grid.depths:
            if d > big.depth:
                continue
            for k in grid.top_ks:
                if k > big.top_k:
                    continue
                sums = dict.fromkeys(grid.total_tokens, 0)
                for parents, scores, path in steps:
                    ranks = subtree_path_ranks(parents, scores, path, d, k)
                    for n in grid.total_tokens:
                        sums[n] += sum(r < n for r in ranks)
                table.setdefault(str(d), {})[str(k)] = {str(n): sums[n] / len(steps) for n in grid.total_tokens if n <= big.total_tokens}
        return cls(accepted=table, steps=len(steps), calibration=calibration)

    def expected(self, tree: TreeConfig) -> float | None:
        return self.accepted.get(str(tree.depth), {}).get(str(tree.top_k), {}).get(str(tree.total_tokens))

    def candidates(self) -> list[TreeConfig]:
        return [TreeConfig(int(n), int(d), int(k)) for d, ks in self.accepted.items() for k, ns in ks.items() for n in ns
                if int(n) >= int(d)]

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, asdict(self), indent=None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AcceptanceTable:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise TurboLMError(f"cannot read acceptance statistics {path}: {e}") from None


def record_acceptance(generator, tokenizer, prompts: tuple[str, ...] = CALIBRATION_PROMPTS, max_new_tokens: int = 64,
                      tree: TreeConfig = CALIBRATION_TREE, progress: bool = False,
                      grid: SizingGrid = SizingGrid()) -> AcceptanceTable:
    """Greedy generations with ``tree`` on ``prompts``; every step's tree and accepted path
    becomes an :class:`AcceptanceTable`. ``generator`` is a SpeculativeGenerator."""
    from tqdm.auto import tqdm

    from ..core.chat import encode_prompt

    steps: list = []
    saved_tree, saved_hook = generator.proposer.tree, generator.on_step
    generator.proposer.tree = tree
    generator.on_step = lambda t, path: steps.append((t.parents, [round(s, 4) for s in t.scores], path))
    try:
        for p in tqdm(prompts, desc="calibrating acceptance", unit="prompt", disable=not progress):
            generator.generate(encode_prompt(tokenizer, p), max_new_tokens=max_new_tokens)
    finally:
        generator.proposer.tree, generator.on_step = saved_tree, saved_hook
    calibration = {"tree": asdict(tree), "prompts": len(prompts), "max_new_tokens": max_new_tokens,
                   "dtype": str(generator.target.dtype).replace("torch.", "")}
    return AcceptanceTable.from_steps(steps, calibration, grid)


# --- timing ------------------------------------------------------------------------------------


def _median_time(fn, repeats: int, device) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def time_verification(target, sizes: tuple[int, ...] = VERIFY_SIZES, prefix: int = 192,
                      repeats: int = 3) -> dict[int, float]:
    """Seconds for the target to verify ``n`` tree tokens after a ``prefix``-token KV cache,
    with the engine's own mask and positions (a chain of ``n`` tokens; the cost does not
    depend on the tree's shape). Median of ``repeats`` after a warm-up."""
    from ..core.generation import forward
    from .cache import new_tree_cache, truncate
    from .tree import tree_attention_mask, tree_position_ids

    device = target.device
    g = torch.Generator().manual_seed(0)
    vocab = target.config.vocab_size
    ids = torch.randint(100, vocab, (1, prefix + max(sizes)), generator=g)
    cache = new_tree_cache()
    forward(target, ids[:, :prefix].to(device), cache, logits_to_keep=1)
    out = {}
    for n in sizes:
        chain = Tree(ids[0, prefix : prefix + n].tolist(), [-1] + list(range(n - 1)))

        def verify():
            mask = tree_attention_mask(chain, prefix, target.config, target.dtype, device)
            forward(target, torch.tensor([chain.tokens], device=device), cache, attention_mask=mask,
                    position_ids=tree_position_ids(chain, prefix, device))
            truncate(cache, prefix)

        verify()  # warm-up
        out[n] = _median_time(verify, repeats, device)
    return out


@torch.inference_mode()
def time_drafting(proposer, target, tokenizer, depths=GRID_DEPTH, top_ks=GRID_TOP_K, repeats: int = 2,
                  measured_depths=(1, 2, 4, 8)) -> dict:
    """Seconds the proposer needs to draft a (depth, top_k) tree in the steady state:
    ``{depth: {top_k: seconds}}``. Measured as propose() after start() minus the catch-up
    over the prompt (a depth-0 proposal), plus one small catch-up forward (what a step
    feeds the draft after acceptance). Depths between ``measured_depths`` are interpolated
    (a level costs about the same as the one before)."""
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
        return _median_time(go, repeats, device)

    try:
        run(TreeConfig(8, 2, 4), 2)  # warm-up
        base = run(TreeConfig(1, 1, 1), 0)
        catch_up = max(0.0, run(TreeConfig(1, 1, 1), 1) - base)
        measured = [d for d in measured_depths if d <= max(depths)] or [max(depths)]
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

    @property
    def step_seconds(self) -> float:
        return self.draft_seconds + self.verify_seconds

    @property
    def expected_speedup(self) -> float:
        return self.tokens_per_step / self.step_seconds * self.vanilla_seconds

    def explain(self) -> str:
        t = self.tree
        msg = (f"tree auto: {t.total_tokens} tokens, depth {t.depth}, top-k {t.top_k}: expected "
               f"{self.tokens_per_step:.2f} tokens per step at {self.step_seconds * 1e3:.0f} ms "
               f"(draft {self.draft_seconds * 1e3:.0f} + verify {self.verify_seconds * 1e3:.0f}) "
               f"vs vanilla {self.vanilla_seconds * 1e3:.0f} ms per token: {self.expected_speedup:.2f}x")
        if self.expected_speedup < 1:
            msg += " (no tree is expected to beat vanilla decoding on this machine)"
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
        choice = TreeChoice(tree, 1 + acceptance.expected(tree), d, _interpolate(verify_s, tree.total_tokens + 1),
                            _interpolate(verify_s, 1))
        if best is None or choice.tokens_per_step / choice.step_seconds > best.tokens_per_step / best.step_seconds:
            best = choice
    if best is None:
        raise TurboLMError("no tree size could be evaluated (empty acceptance statistics or timings)")
    return best


def timing_key(target, proposer, draft_id: str) -> str:
    """The cache key of a proposer's timings: this machine (CPU, GPU, threads, torch), the
    target (dtype, device, kernels, weights), the proposer and ``draft_id`` (the draft's content)."""
    from ..core.machine import cpu_model
    from ..core.models import model_identity

    cpu = cpu_model()
    device = target.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    from ..core.kernels import is_optimized

    parts = [cpu, gpu, str(torch.get_num_threads()), torch.__version__, str(target.dtype), str(device), str(is_optimized(target)),
             model_identity(target)["embedding_sha256"], proposer.name, draft_id]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def auto_tree(generator, *, acceptance: AcceptanceTable | None = None, draft_id: str = "", progress: bool = True,
              log=None, grid: SizingGrid = SizingGrid()) -> TreeChoice:
    """Choose the tree for ``generator`` (a SpeculativeGenerator) on this machine among ``grid``,
    set it, and return the choice. ``acceptance``: the draft's stored statistics (None: calibrate
    and cache). Timings are cached under the turbolm cache directory, keyed by :func:`timing_key`."""
    from ..core.models import cache_root

    log = log or (lambda msg: None)
    target, proposer = generator.target, generator.proposer
    key = timing_key(target, proposer, draft_id + grid.key())
    path = cache_root() / "tree-sizing" / f"{key}.json"
    cached = {}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except ValueError:
            cached = {}
    measured = False
    if acceptance is None and "acceptance" in cached:
        acceptance = AcceptanceTable(**cached["acceptance"])
    if acceptance is None:
        log("tree auto: measuring this draft's acceptance once (greedy, a few short prompts) ...")
        acceptance = record_acceptance(generator, generator.tokenizer, grid.prompts, grid.max_new_tokens,
                                       progress=progress, grid=grid)
        cached["acceptance"] = asdict(acceptance)
        measured = True
    if "verify_seconds" not in cached:
        log("tree auto: timing the target and the draft on this machine once (cached) ...")
        cached["verify_seconds"] = time_verification(target, grid.verify_sizes)
        cached["draft_seconds"] = time_drafting(proposer, target, generator.tokenizer, grid.depths, grid.top_ks)
        measured = True
    if measured:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, cached, indent=None)
    draft_s = {int(d): {int(k): v for k, v in ks.items()} for d, ks in cached["draft_seconds"].items()}
    choice = choose_tree(acceptance, cached["verify_seconds"], draft_s)
    proposer.tree = choice.tree
    return choice


def stored_acceptance(draft_dir: str | os.PathLike | None, overrides: dict | None = None) -> AcceptanceTable | None:
    """The acceptance statistics stored with a draft checkpoint, if any and if they apply
    (they were measured with the checkpoint's own candidate mode)."""
    if draft_dir is None or overrides or not (Path(draft_dir) / ACCEPTANCE_FILE).is_file():
        return None
    return AcceptanceTable.load(Path(draft_dir) / ACCEPTANCE_FILE)


def calibrate_draft(draft_dir: str | os.PathLike, target, tokenizer, *, max_new_tokens: int = 128,
                    tree: TreeConfig = CALIBRATION_TREE, progress: bool = True) -> AcceptanceTable:
    """Measure a draft checkpoint's acceptance (greedy, the built-in prompts, one big tree) and
    store it as ``acceptance.json`` beside the weights, for ``--tree auto`` on any machine."""
    from .draft.model import load_draft
    from .engine import SpeculativeGenerator
    from .proposers.jakiro import JakiroProposer

    gen = SpeculativeGenerator(target, tokenizer, JakiroProposer(load_draft(draft_dir, target), target))
    table = record_acceptance(gen, tokenizer, max_new_tokens=max_new_tokens, tree=tree, progress=progress)
    table.save(Path(draft_dir) / ACCEPTANCE_FILE)
    return table
