"""Genetic search over per-block token-sparsity schedules (FTP: Fine-grained Token-wise Pruner).

FTP prunes a fraction ``s_l`` of the tokens at every transformer block ``l``. Blocks differ in how
much pruning they tolerate, so instead of a flat schedule we search for a vector ``s`` with every
``s_l`` in ``[min_sparsity, max_sparsity]`` whose *mean* equals a global target (0.22, 0.30, 0.40...):
the mean is what fixes the compute saved, the shape is what decides the quality lost.

The search is a small genetic algorithm. Fitness is supplied by the caller (e.g. minus the KL
divergence between the pruned and the dense next-token distributions on calibration text; higher is
better) and is the expensive part, so the algorithm is frugal with it:

* every individual is projected onto the constraint set after each crossover and mutation, so no
  evaluation is wasted on a schedule that misses the target;
* evaluations of identical schedules (rounded to 1e-6) are cached, so elites carried over unchanged
  are never re-evaluated;
* the state after each generation is a :class:`SearchResult` that round-trips through JSON, so a
  long search can be saved after every generation (``on_generation``) and resumed (``resume``).

Everything is pure Python and deterministic given ``SearchConfig.seed``: generation ``g`` draws from
its own RNG seeded with ``(seed, g)``, so a resumed run makes exactly the draws an uninterrupted one
would have made.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from ..core.errors import TurboLMError

Schedule = list[float]
Fitness = Callable[[Schedule], float]

_KEY_DIGITS = 6  # schedules equal to 1e-6 share one cached fitness
_MEAN_TOL = 1e-9  # how far a projected mean may drift from the target (float rounding only)
_DEDUP_TRIES = 10  # attempts at breeding a child not already in the new population


class ScheduleError(TurboLMError, ValueError):
    """An infeasible target or a bad search setting.

    A ``ValueError`` for library callers, a ``TurboLMError`` so the CLI prints it as one line.
    """


@dataclass
class SearchConfig:
    """Genetic-algorithm settings.

    ``generations`` counts populations evaluated, the initial one (generation 0) included, so the
    search calls ``fitness`` at most ``population + (generations - 1) * (population - elite)`` times.
    """

    population: int = 16
    generations: int = 12
    mutation: float = 0.08  # std of the gaussian mutation, in sparsity units
    mutation_rate: float = 0.3  # per-gene probability of mutation
    crossover: float = 0.7  # probability a child comes from crossover of two parents (else a mutated copy)
    elite: int = 2  # best individuals carried over unchanged
    tournament: int = 3
    max_sparsity: float = 0.9  # per-block upper bound
    min_sparsity: float = 0.0
    seed: int = 0
    # Share of the initial population drawn at random (Dirichlet); the rest are mutated copies of
    # the seeds (uniform + ``initial``). Random schedules are mostly far worse than the seeds on a
    # real model (sensitive blocks get high sparsity), so most of the budget searches near them.
    random_fraction: float = 0.25

    def validate(self) -> None:
        """Fail early, with the setting named, rather than deep inside a long search."""
        checks = [
            ("population", isinstance(self.population, int) and self.population >= 2, "an integer >= 2"),
            ("generations", isinstance(self.generations, int) and self.generations >= 1, "an integer >= 1"),
            ("mutation", _finite(self.mutation) and self.mutation >= 0, "a number >= 0"),
            ("mutation_rate", _finite(self.mutation_rate) and 0 <= self.mutation_rate <= 1, "in [0, 1]"),
            ("crossover", _finite(self.crossover) and 0 <= self.crossover <= 1, "in [0, 1]"),
            (
                "elite",
                isinstance(self.elite, int) and 0 <= self.elite < self.population,
                f"an integer in [0, population - 1] = [0, {self.population - 1}]",
            ),
            ("tournament", isinstance(self.tournament, int) and self.tournament >= 1, "an integer >= 1"),
            ("min_sparsity", _finite(self.min_sparsity), "a finite number"),
            ("max_sparsity", _finite(self.max_sparsity), "a finite number"),
            ("seed", isinstance(self.seed, int), "an integer"),
            ("random_fraction", _finite(self.random_fraction) and 0 <= self.random_fraction <= 1, "in [0, 1]"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ScheduleError(f"invalid search setting {name}={getattr(self, name)!r}: must be {what}")
        if self.min_sparsity > self.max_sparsity:
            raise ScheduleError(
                f"invalid search setting: min_sparsity={self.min_sparsity} exceeds max_sparsity={self.max_sparsity}"
            )


@dataclass
class SearchResult:
    """The best schedule found, and enough state to resume the search.

    ``history`` has one entry per generation: ``generation``, ``best`` (best fitness so far),
    ``best_schedule`` (its schedule), ``mean`` (mean finite fitness of that generation's population)
    and ``evaluations`` (cumulative ``fitness`` calls). ``population`` / ``population_fitness`` are
    the last generation, the parents of the next one. ``archive`` holds every cached
    ``[schedule, fitness]`` pair, so a resumed run skips exactly the evaluations an uninterrupted one
    would have skipped (empty when the search ran with ``cache=False``).
    """

    best: list[float]  # per-block sparsity, mean == target (to 1e-6)
    best_fitness: float
    history: list[dict] = field(default_factory=list)
    evaluations: int = 0
    population: list[list[float]] = field(default_factory=list)
    population_fitness: list[float] = field(default_factory=list)
    archive: list[list] = field(default_factory=list)  # [[schedule, fitness], ...]
    target: float | None = None
    fixed: dict[int, float] = field(default_factory=dict)

    @property
    def generations_done(self) -> int:
        return len(self.history)

    def to_json(self) -> dict:
        """A plain dict for ``json.dump`` (non-finite fitness is written as -Infinity/NaN, as ``json`` does)."""
        d = copy.deepcopy(asdict(self))
        d["fixed"] = {str(k): v for k, v in self.fixed.items()}  # JSON object keys are strings
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> SearchResult:
        """Inverse of :meth:`to_json`; optional fields may be missing (older or hand-written files)."""
        try:
            return cls(
                best=[float(x) for x in d["best"]],
                best_fitness=float(d["best_fitness"]),
                history=copy.deepcopy(list(d.get("history", []))),
                evaluations=int(d.get("evaluations", 0)),
                population=[[float(x) for x in s] for s in d.get("population", [])],
                population_fitness=[float(f) for f in d.get("population_fitness", [])],
                archive=[[[float(x) for x in s], float(f)] for s, f in d.get("archive", [])],
                target=None if d.get("target") is None else float(d["target"]),
                fixed={int(k): float(v) for k, v in (d.get("fixed") or {}).items()},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ScheduleError(f"not a saved schedule search: {type(e).__name__}: {e}") from e


# --- constraint handling ---------------------------------------------------------------------


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _clip(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


def _normalize_fixed(fixed: Mapping[int, float] | None, n: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for i, v in (fixed or {}).items():
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n:
            raise ScheduleError(f"pinned block index {i!r} is out of range for {n} blocks")
        if not _finite(float(v)):
            raise ScheduleError(f"pinned sparsity for block {i} must be finite, got {v!r}")
        out[i] = float(v)
    return out


def _free_target(n: int, target: float, lo: float, hi: float, fixed: dict[int, float]) -> float | None:
    """The mean the unpinned blocks must reach, or None when every block is pinned.

    Raises when no schedule within bounds can meet ``target``: better to say so than to return a
    schedule that silently misses the requested compute saving.
    """
    if n <= 0:
        raise ScheduleError(f"a schedule needs at least one block, got {n}")
    if not _finite(float(target)):
        raise ScheduleError(f"target sparsity must be finite, got {target!r}")
    if lo > hi:
        raise ScheduleError(f"sparsity bounds are empty: lo={lo} > hi={hi}")
    m = n - len(fixed)
    need = target * n - sum(fixed.values())
    if m == 0:
        if abs(need) > _MEAN_TOL * n:
            raise ScheduleError(
                f"target mean sparsity {target} is infeasible: all {n} blocks are pinned and their mean is "
                f"{sum(fixed.values()) / n:.6g}"
            )
        return None
    ft = need / m
    if not lo - _MEAN_TOL <= ft <= hi + _MEAN_TOL:
        pinned = f" with {len(fixed)} pinned block(s) summing to {sum(fixed.values()):.6g}" if fixed else ""
        raise ScheduleError(
            f"target mean sparsity {target} is infeasible for {n} blocks{pinned}: the {m} free block(s) would "
            f"need mean {ft:.6g}, outside the per-block bounds [{lo}, {hi}]"
        )
    return _clip(ft, lo, hi)


def _shift_to_mean(x: list[float], ft: float, lo: float, hi: float) -> list[float]:
    """clip(x + t) with the shift t chosen so the mean is ``ft`` (``x`` already within bounds).

    The mean of clip(x + t) is monotone in t, so bisection finds t; the clipped set is then known,
    and t is recomputed in closed form on the unclipped entries so the mean is exact, not just close.
    """
    m = len(x)
    if ft <= lo:
        return [lo] * m
    if ft >= hi:
        return [hi] * m

    def mean_at(t: float) -> float:
        return sum(_clip(v + t, lo, hi) for v in x) / m

    a, b = lo - max(x), hi - min(x)  # mean_at(a) == lo <= ft <= hi == mean_at(b)
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mid in (a, b):
            break
        if mean_at(mid) < ft:
            a = mid
        else:
            b = mid
    t = 0.5 * (a + b)
    y = [_clip(v + t, lo, hi) for v in x]
    inside = [i for i, v in enumerate(x) if lo < v + t < hi]
    if inside:
        inside_set = set(inside)
        at_bounds = sum(v for i, v in enumerate(y) if i not in inside_set)
        t = (ft * m - at_bounds - sum(x[i] for i in inside)) / len(inside)
        for i in inside:
            y[i] = _clip(x[i] + t, lo, hi)
    return y


def project_to_mean(
    vec: Sequence[float],
    target: float,
    lo: float = 0.0,
    hi: float = 0.9,
    fixed: Mapping[int, float] | None = None,
) -> list[float]:
    """Nearest-ish schedule to ``vec`` with every free entry in ``[lo, hi]`` and mean exactly ``target``.

    Entries are clipped to the bounds, then shifted by one common amount (found by bisection, clipped
    again after the shift): a uniform shift keeps the *shape* of the schedule, which is what the
    search is about, and is the Euclidean projection onto {mean = target} ∩ box. ``fixed`` maps a
    block index to a pinned sparsity (e.g. ``{0: 0.0}`` keeps block 0 dense); pinned blocks keep
    their value, even outside ``[lo, hi]``, and the other blocks absorb the mean.

    Raises ``ValueError`` (:class:`ScheduleError`) when the target cannot be met within the bounds.
    """
    n = len(vec)
    values = [float(v) for v in vec]
    if any(not math.isfinite(v) for v in values):
        raise ScheduleError(f"schedule has a non-finite entry: {values}")
    lo, hi = float(lo), float(hi)
    pinned = _normalize_fixed(fixed, n)
    ft = _free_target(n, float(target), lo, hi, pinned)
    free = [i for i in range(n) if i not in pinned]
    out = list(values)
    for i, v in pinned.items():
        out[i] = v
    if ft is None:
        return out
    shifted = _shift_to_mean([_clip(values[i], lo, hi) for i in free], ft, lo, hi)
    for i, v in zip(free, shifted):
        out[i] = v
    return out


def uniform_schedule(
    num_blocks: int,
    target: float,
    fixed: Mapping[int, float] | None = None,
    lo: float = 0.0,
    hi: float = 0.9,
) -> list[float]:
    """The flat baseline: every free block at the same sparsity, pinned blocks as given."""
    return project_to_mean([float(target)] * num_blocks, target, lo=lo, hi=hi, fixed=fixed)


# --- genetic operators (pure given the rng) ----------------------------------------------------


def _key(schedule: Sequence[float]) -> tuple[float, ...]:
    # + 0.0 folds -0.0 into 0.0 so the two share a cache entry
    return tuple(round(v, _KEY_DIGITS) + 0.0 for v in schedule)


def generation_rng(seed: int, generation: int) -> random.Random:
    """The RNG for one generation: re-seeded per generation so a resumed run is deterministic.

    A string seed is hashed with SHA-512 by ``random`` (independent of PYTHONHASHSEED) and keeps
    (seed, generation) pairs distinct, which ``seed + generation`` would not.
    """
    return random.Random(f"turbolm.ftp.schedule/{seed}/{generation}")


def random_schedule(
    rng: random.Random, num_blocks: int, target: float, lo: float, hi: float, fixed: Mapping[int, float]
) -> list[float]:
    """A Dirichlet-distributed split of the free blocks' sparsity budget, projected onto the bounds.

    The concentration is itself random (0.5 to 4) so the initial population mixes spiky and
    near-flat schedules.
    """
    free = [i for i in range(num_blocks) if i not in fixed]
    vec = [float(target)] * num_blocks
    for i, v in fixed.items():
        vec[i] = v
    if free:
        ft = (target * num_blocks - sum(fixed.values())) / len(free)
        alpha = 2.0 ** rng.uniform(-1.0, 2.0)
        w = [rng.gammavariate(alpha, 1.0) for _ in free]
        total = sum(w) or 1.0
        for i, wi in zip(free, w):
            vec[i] = wi / total * ft * len(free)
    return project_to_mean(vec, target, lo=lo, hi=hi, fixed=fixed)


def tournament_select(rng: random.Random, fitness: Sequence[float], size: int) -> int:
    """Index of the fittest of ``size`` distinct random contestants (ties: the lower index)."""
    contestants = rng.sample(range(len(fitness)), min(size, len(fitness)))
    return max(sorted(contestants), key=lambda i: fitness[i])


def crossover_uniform(rng: random.Random, a: Sequence[float], b: Sequence[float], free: Sequence[int]) -> list[float]:
    """Uniform crossover: each free gene comes from either parent with probability 1/2.

    Chosen over blending because a block's tolerance to pruning is largely its own property: mixing
    keeps each parent's per-block values intact, whereas averaging pulls every child toward the flat
    schedule and collapses diversity. The child is re-projected to the mean afterwards.
    """
    child = list(a)
    for i in free:
        if rng.random() < 0.5:
            child[i] = b[i]
    return child


def mutate_gaussian(
    rng: random.Random, schedule: Sequence[float], free: Sequence[int], std: float, rate: float, force: bool = False
) -> list[float]:
    """Add N(0, std) to each free gene with probability ``rate``; ``force`` guarantees one gene changes.

    ``force`` is for mutated copies, which would otherwise be clones of their parent.
    """
    child = list(schedule)
    changed = False
    for i in free:
        if rng.random() < rate:
            child[i] += rng.gauss(0.0, std)
            changed = True
    if force and not changed and free and std > 0:
        i = free[rng.randrange(len(free))]
        child[i] += rng.gauss(0.0, std)
    return child


# --- the search --------------------------------------------------------------------------------


def _nan_to_neg_inf(f: float) -> float:
    return -math.inf if math.isnan(f) else f


def _population_mean(fitness: Sequence[float]) -> float:
    finite = [f for f in fitness if math.isfinite(f)]
    return sum(finite) / len(finite) if finite else -math.inf


class _Evaluator:
    """Calls ``fitness`` through the cache, counts the calls, and tracks the best schedule seen."""

    def __init__(self, fitness: Fitness, cache: bool, archive: Sequence = (), evaluations: int = 0):
        self.fitness = fitness
        self.cache_on = cache
        self.cache: dict[tuple[float, ...], tuple[list[float], float]] = {}
        if cache:
            for s, f in archive:
                self.cache[_key(s)] = (list(s), float(f))
        self.evaluations = evaluations
        self.best: list[float] | None = None
        self.best_fitness = -math.inf

    def offer(self, schedule: list[float], f: float) -> None:
        if self.best is None or f > self.best_fitness:
            self.best, self.best_fitness = list(schedule), f

    def __call__(self, schedule: list[float]) -> float:
        key = _key(schedule)
        if self.cache_on and key in self.cache:
            f = self.cache[key][1]
        else:
            f = _nan_to_neg_inf(float(self.fitness(list(schedule))))
            self.evaluations += 1
            if self.cache_on:
                self.cache[key] = (list(schedule), f)
        self.offer(schedule, f)
        return f

    def archive(self) -> list[list]:
        return [[list(s), f] for s, f in self.cache.values()]


def _initial_population(
    rng: random.Random,
    num_blocks: int,
    target: float,
    cfg: SearchConfig,
    fixed: dict[int, float],
    initial: Sequence[Sequence[float]] | None,
) -> list[list[float]]:
    """Uniform schedule first, then the given seeds (projected), then mutated copies of the seeds and
    random schedules (``cfg.random_fraction`` of the population); no duplicates where avoidable."""
    lo, hi = cfg.min_sparsity, cfg.max_sparsity
    pop: list[list[float]] = []
    seen: set[tuple[float, ...]] = set()

    def add(s: list[float]) -> None:
        if len(pop) < cfg.population and _key(s) not in seen:
            pop.append(s)
            seen.add(_key(s))

    add(uniform_schedule(num_blocks, target, fixed=fixed, lo=lo, hi=hi))
    for s in initial or []:
        if len(s) != num_blocks:
            raise ScheduleError(f"initial schedule has {len(s)} entries, expected {num_blocks} blocks")
        add(project_to_mean(s, target, lo=lo, hi=hi, fixed=fixed))
    seeds = list(pop)
    free = [i for i in range(num_blocks) if i not in fixed]
    n_random = round(cfg.random_fraction * cfg.population)
    tries = 0
    while len(pop) < cfg.population - n_random and cfg.mutation > 0 and free and tries < _DEDUP_TRIES * cfg.population:
        parent = seeds[tries % len(seeds)]
        add(project_to_mean(mutate_gaussian(rng, parent, free, cfg.mutation, cfg.mutation_rate, force=True),
                            target, lo=lo, hi=hi, fixed=fixed))
        tries += 1
    tries = 0
    while len(pop) < cfg.population:
        s = random_schedule(rng, num_blocks, target, lo, hi, fixed)
        tries += 1
        if _key(s) in seen and tries < _DEDUP_TRIES * cfg.population:
            continue
        pop.append(s)  # a duplicate only when the feasible set is (nearly) a single point
        seen.add(_key(s))
    return pop


def _next_population(
    rng: random.Random,
    pop: Sequence[list[float]],
    fit: Sequence[float],
    target: float,
    cfg: SearchConfig,
    fixed: dict[int, float],
) -> list[list[float]]:
    """Elites unchanged, then tournament-selected children (crossover and/or mutation), all projected."""
    lo, hi = cfg.min_sparsity, cfg.max_sparsity
    free = [i for i in range(len(pop[0])) if i not in fixed]
    new: list[list[float]] = []
    seen: set[tuple[float, ...]] = set()
    for i in sorted(range(len(pop)), key=lambda i: -fit[i]):  # stable: ties keep population order
        if len(new) >= cfg.elite:
            break
        if _key(pop[i]) not in seen:
            new.append(list(pop[i]))
            seen.add(_key(pop[i]))
    while len(new) < cfg.population:
        for _ in range(_DEDUP_TRIES):
            a = pop[tournament_select(rng, fit, cfg.tournament)]
            if rng.random() < cfg.crossover:
                b = pop[tournament_select(rng, fit, cfg.tournament)]
                child = crossover_uniform(rng, a, b, free)
                child = mutate_gaussian(rng, child, free, cfg.mutation, cfg.mutation_rate)
            else:
                child = mutate_gaussian(rng, a, free, cfg.mutation, cfg.mutation_rate, force=True)
            child = project_to_mean(child, target, lo=lo, hi=hi, fixed=fixed)
            if _key(child) not in seen:
                break
        new.append(child)
        seen.add(_key(child))
    return new


def _check_resume(resume: SearchResult, num_blocks: int, target: float, fixed: dict[int, float], cfg: SearchConfig):
    """A saved state only continues the *same* search; say what differs rather than mixing two."""
    if not resume.population or len(resume.population) != len(resume.population_fitness):
        raise ScheduleError("cannot resume: the saved search has no population (was it saved mid-generation?)")
    if len(resume.population) != cfg.population:
        raise ScheduleError(
            f"cannot resume: saved population has {len(resume.population)} individuals, config says {cfg.population}"
        )
    if resume.target is not None and abs(resume.target - target) > 1e-6:
        raise ScheduleError(f"cannot resume: saved search targets mean sparsity {resume.target}, not {target}")
    if resume.fixed != fixed:
        raise ScheduleError(f"cannot resume: saved search pins blocks {resume.fixed}, not {fixed}")
    for s in resume.population:
        if len(s) != num_blocks:
            raise ScheduleError(f"cannot resume: saved schedules have {len(s)} blocks, not {num_blocks}")
        if abs(sum(s) / num_blocks - target) > 1e-6:
            raise ScheduleError(f"cannot resume: saved schedule mean {sum(s) / num_blocks:.6g} is not {target}")


def search_schedule(
    num_blocks: int,
    target: float,
    fitness: Fitness,
    config: SearchConfig | None = None,
    initial: Sequence[Sequence[float]] | None = None,
    fixed: Mapping[int, float] | None = None,
    progress: bool = True,
    on_generation: Callable[[int, SearchResult], None] | None = None,
    cache: bool = True,
    resume: SearchResult | None = None,
) -> SearchResult:
    """Search per-block sparsities of mean ``target`` that maximize ``fitness(schedule)``.

    Generation 0 is the uniform schedule, the ``initial`` schedules (e.g. the previous best, for the
    pass after router training) and Dirichlet-random ones; each later generation keeps ``elite``
    individuals unchanged and breeds the rest by tournament selection, uniform crossover (with
    probability ``crossover``, else a copy) and gaussian mutation, projecting every child onto the
    constraint. ``fixed`` pins blocks (e.g. ``{0: 0.0}``) everywhere.

    ``fitness`` must be deterministic for ``cache=True`` to be sound; NaN counts as -inf. Use
    ``cache=False`` for a noisy fitness (elites are then re-evaluated every generation).

    ``on_generation(g, result)`` runs after generation ``g`` is evaluated with a self-contained
    snapshot; save ``result.to_json()`` there and pass ``SearchResult.from_json(...)`` back as
    ``resume`` to continue with the remaining generations. Because generation ``g`` always draws from
    ``generation_rng(seed, g)`` and the snapshot carries the population and the evaluation cache, a
    resumed run ends exactly where an uninterrupted one would (same config, same fitness).
    ``config.generations`` may be raised on resume to extend a finished search.
    """
    cfg = config if config is not None else SearchConfig()
    cfg.validate()
    lo, hi = cfg.min_sparsity, cfg.max_sparsity
    pinned = _normalize_fixed(fixed, num_blocks)
    _free_target(num_blocks, float(target), lo, hi, pinned)  # fail before any evaluation if infeasible

    if resume is not None:
        _check_resume(resume, num_blocks, target, pinned, cfg)
        ev = _Evaluator(fitness, cache, resume.archive, resume.evaluations)
        ev.offer(resume.best, resume.best_fitness)
        history = copy.deepcopy(resume.history)
        pop = [list(s) for s in resume.population]
        fit = list(resume.population_fitness)
        start = len(history)
    else:
        ev = _Evaluator(fitness, cache)
        history, pop, fit, start = [], [], [], 0

    def snapshot() -> SearchResult:
        return SearchResult(
            best=list(ev.best),
            best_fitness=ev.best_fitness,
            history=copy.deepcopy(history),
            evaluations=ev.evaluations,
            population=[list(s) for s in pop],
            population_fitness=list(fit),
            archive=ev.archive(),
            target=float(target),
            fixed=dict(pinned),
        )

    bar = tqdm(total=cfg.generations, initial=min(start, cfg.generations), desc="schedule search", disable=not progress)
    try:
        for g in range(start, cfg.generations):
            rng = generation_rng(cfg.seed, g)
            if g == 0:
                pop = _initial_population(rng, num_blocks, target, cfg, pinned, initial)
            else:
                pop = _next_population(rng, pop, fit, target, cfg, pinned)
            fit = [ev(s) for s in pop]
            history.append(
                {
                    "generation": g,
                    "best": ev.best_fitness,
                    "mean": _population_mean(fit),
                    "best_schedule": list(ev.best),
                    "evaluations": ev.evaluations,
                }
            )
            bar.update(1)
            bar.set_postfix(best=f"{ev.best_fitness:.5g}", evals=ev.evaluations)
            if on_generation is not None:
                on_generation(g, snapshot())
    finally:
        bar.close()
    if ev.best is None:  # only when resuming a search with nothing in it
        raise ScheduleError("the search evaluated no schedule")
    return snapshot()
