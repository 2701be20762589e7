"""The FTP sparsity-schedule search: projection onto the mean constraint, and the genetic search itself
on synthetic fitness functions (no models; seconds)."""

from __future__ import annotations

import json
import math
import random

import pytest

from turbolm import TurboLMError
from turbolm.pruning.genetic import (
    SearchConfig,
    SearchResult,
    project_to_mean,
    search_schedule,
    uniform_schedule,
)

TARGET = 0.3
S_STAR = [0.0, 0.1, 0.2, 0.5, 0.6, 0.3, 0.4, 0.3]  # 8 blocks, mean 0.3, within [0, 0.9]
assert abs(sum(S_STAR) / len(S_STAR) - TARGET) < 1e-12


def quadratic(schedule):
    return -sum((s - t) ** 2 for s, t in zip(schedule, S_STAR))


def mean(v):
    return sum(v) / len(v)


def assert_feasible(s, target, lo=0.0, hi=0.9, fixed=None, n=None):
    if n is not None:
        assert len(s) == n
    assert abs(mean(s) - target) < 1e-9, (mean(s), target)
    fixed = fixed or {}
    for i, v in enumerate(s):
        if i in fixed:
            assert v == fixed[i]
        else:
            assert lo - 1e-12 <= v <= hi + 1e-12, (i, v)


# --- projection ----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.0, 0.05, 0.22, 0.3, 0.4, 0.85, 0.9])
@pytest.mark.parametrize("fixed", [None, {0: 0.0}, {0: 0.0, 5: 0.1}])
def test_projection_keeps_mean_and_bounds(target, fixed):
    rng = random.Random(1)
    for _ in range(30):
        n = rng.randint(6, 30)
        vec = [rng.uniform(-1.0, 2.0) for _ in range(n)]
        free_need = (target * n - sum((fixed or {}).values())) / (n - len(fixed or {}))
        if not 0.0 <= free_need <= 0.9:
            continue
        out = project_to_mean(vec, target, fixed=fixed)
        assert_feasible(out, target, fixed=fixed, n=n)


def test_projection_is_a_uniform_shift_when_no_bound_binds():
    vec = [0.1, 0.2, 0.3, 0.4]
    out = project_to_mean(vec, 0.35)
    assert out == pytest.approx([0.2, 0.3, 0.4, 0.5], abs=1e-12)
    assert project_to_mean(out, 0.35) == pytest.approx(out, abs=1e-12)  # idempotent on feasible input


def test_projection_clips_then_redistributes():
    out = project_to_mean([5.0, -3.0, 0.2, 0.2], 0.4, lo=0.0, hi=0.9)
    assert_feasible(out, 0.4, n=4)
    # clipped to [0.9, 0, 0.2, 0.2] (mean 0.325), then shifted by 0.1 with the first entry held at hi
    assert out[0] == 0.9
    assert out[1:] == pytest.approx([0.1, 0.3, 0.3], abs=1e-12)


def test_projection_pins_fixed_blocks_even_outside_bounds():
    out = project_to_mean([0.5] * 6, 0.3, lo=0.1, hi=0.9, fixed={0: 0.0})
    assert out[0] == 0.0
    assert out[1:] == pytest.approx([0.36] * 5)
    assert abs(mean(out) - 0.3) < 1e-12


def test_uniform_schedule():
    assert uniform_schedule(4, 0.22) == pytest.approx([0.22] * 4)
    s = uniform_schedule(10, 0.3, fixed={0: 0.0})
    assert s[0] == 0.0 and s[1:] == pytest.approx([1 / 3] * 9)
    assert abs(mean(s) - 0.3) < 1e-12


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(vec=[0.5] * 4, target=0.95),  # above hi
        dict(vec=[0.5] * 4, target=-0.1),  # below lo
        dict(vec=[0.5] * 3, target=0.7, fixed={0: 0.0, 1: 0.0}),  # free block would need 2.1
        dict(vec=[0.5] * 2, target=0.3, fixed={0: 0.0, 1: 0.0}),  # all pinned, wrong mean
        dict(vec=[0.5] * 4, target=0.3, fixed={7: 0.0}),  # index out of range
        dict(vec=[0.5] * 4, target=0.3, lo=0.6, hi=0.5),  # empty bounds
        dict(vec=[], target=0.3),
        dict(vec=[0.1, float("nan")], target=0.3),
    ],
)
def test_infeasible_projection_raises(kwargs):
    with pytest.raises(ValueError) as e:
        project_to_mean(**kwargs)
    assert isinstance(e.value, TurboLMError)  # the CLI prints it as one line
    assert str(e.value)


def test_infeasible_message_is_clear():
    with pytest.raises(ValueError, match=r"infeasible.*\[0.0, 0.9\]"):
        uniform_schedule(3, 0.7, fixed={0: 0.0, 1: 0.0})


def test_infeasible_search_fails_before_evaluating():
    def never(s):
        raise AssertionError("fitness must not be called")

    with pytest.raises(ValueError):
        search_schedule(4, 0.95, never, progress=False)


@pytest.mark.parametrize(
    "bad", [dict(population=1), dict(elite=16), dict(generations=0), dict(mutation_rate=1.5), dict(tournament=0)]
)
def test_bad_config_raises(bad):
    with pytest.raises(ValueError):
        search_schedule(4, 0.3, quadratic, SearchConfig(**bad), progress=False)


# --- the search --------------------------------------------------------------------------------------


def test_every_evaluated_schedule_is_feasible():
    fixed = {0: 0.0}
    seen = []

    def checked(s):
        assert_feasible(s, TARGET, fixed=fixed, n=8)
        seen.append(list(s))
        return quadratic(s)

    res = search_schedule(8, TARGET, checked, SearchConfig(seed=3), fixed=fixed, progress=False)
    assert len(seen) == res.evaluations > 16
    assert_feasible(res.best, TARGET, fixed=fixed, n=8)
    for s in res.population:
        assert_feasible(s, TARGET, fixed=fixed, n=8)


def test_bounds_respected_with_custom_range():
    def checked(s):
        assert_feasible(s, 0.4, lo=0.1, hi=0.6, n=8)
        return quadratic(s)

    cfg = SearchConfig(min_sparsity=0.1, max_sparsity=0.6, mutation=0.3, mutation_rate=0.8, generations=5)
    search_schedule(8, 0.4, checked, cfg, progress=False)


def test_finds_known_optimum_better_than_uniform():
    uniform_fit = quadratic(uniform_schedule(8, TARGET))  # -0.28
    res = search_schedule(8, TARGET, quadratic, SearchConfig(population=24, generations=25), progress=False)
    assert res.best_fitness == pytest.approx(quadratic(res.best))
    assert res.best_fitness > 0.1 * uniform_fit  # recovers > 90 % of the gap to the optimum
    assert max(abs(a - b) for a, b in zip(res.best, S_STAR)) < 0.12
    assert abs(mean(res.best) - TARGET) < 1e-6
    bests = [h["best"] for h in res.history]
    assert bests == sorted(bests)  # best-so-far never gets worse
    assert bests[0] >= uniform_fit  # the uniform schedule is in generation 0

    default = search_schedule(8, TARGET, quadratic, progress=False)  # 16 x 12: still far better than flat
    assert default.best_fitness > 0.2 * uniform_fit


def test_deterministic_given_seed():
    a = search_schedule(8, TARGET, quadratic, SearchConfig(seed=5), progress=False)
    b = search_schedule(8, TARGET, quadratic, SearchConfig(seed=5), progress=False)
    c = search_schedule(8, TARGET, quadratic, SearchConfig(seed=6), progress=False)
    assert a.to_json() == b.to_json()
    assert a.history != c.history


def test_elites_are_not_reevaluated():
    calls = []

    def counted(s):
        calls.append(tuple(round(v, 6) for v in s))
        return quadratic(s)

    cfg = SearchConfig(population=16, generations=12, elite=2)
    res = search_schedule(8, TARGET, counted, cfg, progress=False)
    assert res.evaluations == len(calls) == len(set(calls))  # nothing evaluated twice
    assert res.evaluations < cfg.population * cfg.generations
    assert res.evaluations <= cfg.population + (cfg.generations - 1) * (cfg.population - cfg.elite)

    calls.clear()
    res = search_schedule(8, TARGET, counted, cfg, progress=False, cache=False)
    assert res.evaluations == len(calls) == cfg.population * cfg.generations


def test_initial_schedules_seed_the_population():
    res = search_schedule(8, TARGET, quadratic, SearchConfig(generations=1), initial=[S_STAR], progress=False)
    assert res.best == pytest.approx(S_STAR, abs=1e-12)
    assert res.best_fitness == pytest.approx(0.0, abs=1e-20)
    assert res.history[0]["best"] == res.best_fitness


def test_nan_fitness_is_worst():
    def f(s):
        return float("nan") if s[0] > 0.3 else quadratic(s)

    res = search_schedule(8, TARGET, f, SearchConfig(generations=4), progress=False)
    assert math.isfinite(res.best_fitness) and res.best[0] <= 0.3


def test_on_generation_and_resume_match_uninterrupted_run():
    cfg = SearchConfig(population=12, generations=10, seed=11)
    full_calls = []

    def f_full(s):
        full_calls.append(s)
        return quadratic(s)

    saved = {}

    def on_gen(g, result):
        saved[g] = json.dumps(result.to_json())  # what the CLI writes to disk

    full = search_schedule(8, TARGET, f_full, cfg, fixed={0: 0.0}, progress=False, on_generation=on_gen)
    assert sorted(saved) == list(range(cfg.generations))
    assert json.loads(saved[cfg.generations - 1]) == full.to_json()

    mid = SearchResult.from_json(json.loads(saved[4]))
    assert len(mid.history) == 5
    resumed_calls = []

    def f_resumed(s):
        resumed_calls.append(s)
        return quadratic(s)

    resumed = search_schedule(8, TARGET, f_resumed, cfg, fixed={0: 0.0}, progress=False, resume=mid)
    assert resumed.best == full.best
    assert resumed.best_fitness == full.best_fitness
    assert resumed.history == full.history
    assert resumed.population == full.population
    assert resumed.evaluations == full.evaluations
    assert resumed_calls == full_calls[mid.evaluations :]  # only the remaining evaluations ran

    done = search_schedule(8, TARGET, f_resumed, cfg, fixed={0: 0.0}, progress=False, resume=full)
    assert done.to_json() == full.to_json()  # a finished search resumes to itself

    longer = search_schedule(
        8, TARGET, quadratic, SearchConfig(population=12, generations=12, seed=11), fixed={0: 0.0},
        progress=False, resume=full,
    )
    assert len(longer.history) == 12 and longer.best_fitness >= full.best_fitness


def test_resume_rejects_a_different_search():
    cfg = SearchConfig(generations=3)
    res = search_schedule(8, TARGET, quadratic, cfg, progress=False)
    with pytest.raises(ValueError, match="targets mean sparsity"):
        search_schedule(8, 0.4, quadratic, cfg, progress=False, resume=res)
    with pytest.raises(ValueError, match="pins blocks"):
        search_schedule(8, TARGET, quadratic, cfg, fixed={0: 0.0}, progress=False, resume=res)
    with pytest.raises(ValueError, match="blocks"):
        search_schedule(6, TARGET, quadratic, cfg, progress=False, resume=res)


def test_json_round_trip():
    res = search_schedule(8, TARGET, quadratic, SearchConfig(generations=3), fixed={2: 0.1}, progress=False)
    d = json.loads(json.dumps(res.to_json()))
    back = SearchResult.from_json(d)
    assert back == res
    assert back.to_json() == res.to_json()
    assert set(d) >= {"best", "best_fitness", "history", "evaluations", "population", "population_fitness"}
    assert set(d["history"][0]) >= {"generation", "best", "mean", "best_schedule"}

    minimal = SearchResult.from_json({"best": [0.3, 0.3], "best_fitness": -1.0})
    assert minimal.history == [] and minimal.evaluations == 0
    with pytest.raises(ValueError):
        SearchResult.from_json({"best_fitness": 1.0})


def test_progress_bar_shows_best(capsys):
    search_schedule(8, TARGET, quadratic, SearchConfig(generations=2), progress=True)
    err = capsys.readouterr().err
    assert "schedule search" in err and "best=" in err
