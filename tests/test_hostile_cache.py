"""Hostile caches (issue 16, class 3): the ``--tree auto`` timing cache. A cache that cannot be
written or read costs a measurement and one warning line, never the run; a damaged entry is measured
again, never trusted; timings that no longer fit the machine (measured while it was busy) are
measured again; timings taken on a busy machine are not cached; nothing changed, nothing written;
``--retime`` times again on request."""

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from hostile import Case, assert_clean_error, run_cli_cases

import turbolm.core.io as core_io
import turbolm.speculative.sizing as sizing
from turbolm.core.errors import DataError
from turbolm.speculative import DecoderSpec, SpeculativeGenerator
from turbolm.speculative.draft.model import DraftConfig, DraftModel, load_draft
from turbolm.speculative.factory import tree_cache_key
from turbolm.speculative.proposers.jakiro import JakiroProposer
from turbolm.speculative.sizing import AcceptanceTable, SizingGrid, TimingPolicy, auto_tree

GRID = SizingGrid(total_tokens=(2, 4, 8), depths=(2, 3), top_ks=(2,), verify_sizes=(1, 3, 5, 9),
                  prompts=("Hello world",), max_new_tokens=8)
ACCEPTED = {"2": {"2": {"2": 0.9, "4": 1.2}}, "3": {"2": {"4": 1.3, "8": 2.4}}}
ACCEPTANCE = {"accepted": ACCEPTED, "steps": 10, "calibration": {}, "version": 2}


def _entry(step: float, verify_1: float | None = None) -> dict:
    """A valid cache entry for GRID whose one-token step took ``step`` seconds."""
    v = step if verify_1 is None else verify_1
    return {"acceptance": ACCEPTANCE,
            "verify_seconds": {"1": v, "3": v * 1.05, "5": v * 1.1, "9": v * 1.2},
            "draft_seconds": {"2": {"2": 0.001}, "3": {"2": 0.0015}}, "step_seconds": step}


class _Load:
    """Stands in for core.machine.OtherLoad: other processes kept ``cpus`` CPUs busy."""

    def __init__(self, cpus):
        self.cpus = cpus

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture(scope="module")
def draft_dir(tiny, tmp_path_factory):
    target, _ = tiny
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("cache_draft") / "d"
    DraftModel(DraftConfig.for_target(target)).save(d)
    return d


class Sizer:
    """``auto_tree`` on a tiny Jakiro generator with a controlled one-token step (``step``) and
    machine load (``busy``), counting what it measures."""

    def __init__(self, tiny, draft_dir, cache: Path, monkeypatch):
        target, tok = tiny
        self.gen = SpeculativeGenerator(target, tok, JakiroProposer(load_draft(draft_dir, target), target))
        self.step, self.busy, self.timed, self.recorded = 0.002, 0.0, 0, 0
        monkeypatch.setenv("TURBOLM_CACHE", str(cache))
        monkeypatch.setattr(sizing, "time_step", lambda target: self.step)
        monkeypatch.setattr(sizing, "OtherLoad", lambda: _Load(self.busy))
        real_verify, real_record = sizing.time_verification, sizing.record_acceptance

        def verify(*a, **k):
            self.timed += 1
            return real_verify(*a, **k)

        def record(*a, **k):
            self.recorded += 1
            return real_record(*a, **k)

        monkeypatch.setattr(sizing, "time_verification", verify)
        monkeypatch.setattr(sizing, "record_acceptance", record)
        self.file = cache / "tree-sizing" / f"{sizing.timing_key(target, self.gen.proposer, 'd' + GRID.key())}.json"

    def __call__(self, **kw):
        """``(choice, log lines, warning lines)``; resets the counters first."""
        self.timed = self.recorded = 0
        lines = []
        choice = auto_tree(self.gen, draft_id="d", progress=False, log=lines.append, grid=GRID, **kw)
        return choice, lines, [line for line in lines if line.startswith("turbolm: warning:")]

    def seed(self, entry: dict | bytes) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.file.write_bytes(entry if isinstance(entry, bytes) else json.dumps(entry).encode())


@pytest.fixture
def sizer(tiny, draft_dir, tmp_path, monkeypatch):
    return Sizer(tiny, draft_dir, tmp_path / "cache", monkeypatch)


def test_first_use_measures_and_caches_then_trusts_what_still_fits(sizer):
    choice, lines, warnings = sizer()
    assert sizer.timed == 1 and sizer.recorded == 1 and not warnings
    cached = json.loads(sizer.file.read_text())
    assert cached["step_seconds"] == 0.002 and cached["measured"]["other_cpus_busy"] == 0.0
    stat = sizer.file.stat()
    sizer.step = 0.0025  # within the tolerance
    again, lines, warnings = sizer()
    assert sizer.timed == sizer.recorded == 0 and not warnings and again.tree == choice.tree
    assert (sizer.file.stat().st_ino, sizer.file.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)  # not rewritten


@pytest.mark.parametrize("cached, now", [(1.9, 0.03), (0.001, 0.01)])
def test_timings_that_no_longer_fit_are_measured_again(sizer, cached, now):
    """The issue's case: a one-token step cached at 1.9 s on a busy machine (idle: 0.03 s) must not
    size the tree (it promised 21x for a method slower than vanilla); the reverse too."""
    sizer.seed(_entry(cached))
    sizer.step = now
    choice, lines, warnings = sizer()
    assert sizer.timed == 1 and not warnings
    assert any("do not fit" in line and f"{cached * 1e3:.1f} ms" in line and f"{now * 1e3:.1f} ms" in line
               for line in lines)
    fresh = json.loads(sizer.file.read_text())
    assert fresh["step_seconds"] == now and fresh["verify_seconds"]["1"] != cached
    assert choice.vanilla_seconds == pytest.approx(fresh["verify_seconds"]["1"])  # the stale numbers are gone
    sizer()
    assert sizer.timed == 0  # now they fit


def test_old_entries_without_a_recorded_step_are_checked_against_their_one_token_verification(sizer):
    entry = _entry(1.9)
    del entry["step_seconds"]
    sizer.seed(entry)
    sizer.step = 1.8
    sizer()
    assert sizer.timed == 0
    sizer.step = 0.03
    sizer()
    assert sizer.timed == 1


def test_retime_measures_again(sizer):
    sizer.seed(_entry(0.002))
    _, lines, warnings = sizer(retime=True)
    assert sizer.timed == 1 and sizer.recorded == 0 and not warnings and any("again, as asked" in line for line in lines)


def test_busy_machine_timings_are_used_but_not_cached(sizer):
    sizer.busy = 1.5
    choice, _, warnings = sizer()
    assert sizer.timed == 1 and len(warnings) == 1
    assert "1.5 CPUs busy" in warnings[0] and "not cached" in warnings[0]
    assert set(json.loads(sizer.file.read_text())) == {"acceptance"}  # the acceptance (machine-independent) is kept
    # An idle measurement already cached stays; the busy one replaces it for this run only.
    sizer.seed(_entry(0.002))
    sizer.step = 0.01
    choice, _, warnings = sizer()
    assert sizer.timed == 1 and len(warnings) == 1 and json.loads(sizer.file.read_text()) == _entry(0.002)
    assert choice.vanilla_seconds != 0.002
    sizer.busy = 1.5
    assert sizer(policy=TimingPolicy(busy_cpus=None))[2] == []  # a policy may cache them anyway
    assert json.loads(sizer.file.read_text())["step_seconds"] == 0.01


def test_nothing_changed_nothing_written(sizer, monkeypatch):
    """Valid timings that fit: the file is not written at all (a read-only cache works as is)."""
    sizer.seed(_entry(0.002))

    def no_write(*a, **k):
        raise AssertionError("wrote the timing cache though nothing changed")

    monkeypatch.setattr(core_io, "write_json", no_write)
    monkeypatch.setattr(sizing, "write_json", no_write)
    os.chmod(sizer.file.parent, 0o555)
    try:
        _, lines, warnings = sizer()
    finally:
        os.chmod(sizer.file.parent, 0o755)
    assert sizer.timed == sizer.recorded == 0 and not warnings and not lines


@pytest.mark.parametrize("where", ["a file", "below a file", "read-only", "no such parent"])
def test_unwritable_cache_measures_for_this_run_with_one_warning(sizer, tmp_path, monkeypatch, where):
    if where == "a file":
        (tmp_path / "f").write_text("x")
        cache = tmp_path / "f"
    elif where == "below a file":
        (tmp_path / "f").write_text("x")
        cache = tmp_path / "f" / "sub"
    elif where == "no such parent":
        if not Path("/proc/self").is_dir():
            pytest.skip("needs Linux /proc")
        cache = Path("/proc/turbolm-no-such-dir/cache")
    else:  # chmod does not stop root: a file system that refuses writes does
        cache = tmp_path / "ro"

        def refused(*a, **k):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(core_io, "write_json", refused)
    monkeypatch.setenv("TURBOLM_CACHE", str(cache))
    for busy in (0.0, 1.5):  # nothing is kept: the second run measures again (on a busy machine: still one line)
        sizer.busy = busy
        choice, _, warnings = sizer()
        assert sizer.timed == sizer.recorded == 1 and choice.tree.depth in GRID.depths
        assert len(warnings) == 1 and "cannot write" in warnings[0] and str(cache) in warnings[0]
        assert "for this run only" in warnings[0] and "TURBOLM_CACHE" in warnings[0]
        assert ("busy" in warnings[0]) == bool(busy)


def _damage(entry: dict, change) -> bytes:
    entry = json.loads(json.dumps(entry))
    change(entry)
    return json.dumps(entry).encode()


GOOD = _entry(0.002)
DAMAGED = {
    "truncated": json.dumps(GOOD).encode()[:57],
    "not an object": b"[1, 2, 3]",
    "not UTF-8": b"\xff\xfe{",
    "empty": b"",
    "verify NaN": _damage(GOOD, lambda e: e["verify_seconds"].update({"1": float("nan")})),
    "verify negative": _damage(GOOD, lambda e: e["verify_seconds"].update({"3": -0.01})),
    "verify zero": _damage(GOOD, lambda e: e["verify_seconds"].update({"5": 0})),
    "verify a string": _damage(GOOD, lambda e: e["verify_seconds"].update({"9": "fast"})),
    "verify infinite": _damage(GOOD, lambda e: e["verify_seconds"].update({"9": float("inf")})),
    "verify missing a size": _damage(GOOD, lambda e: e["verify_seconds"].pop("9")),
    "verify a list": _damage(GOOD, lambda e: e.update(verify_seconds=[0.1, 0.2])),
    "draft missing a depth": _damage(GOOD, lambda e: e["draft_seconds"].pop("3")),
    "draft negative": _damage(GOOD, lambda e: e["draft_seconds"]["2"].update({"2": -1})),
    "draft a bool": _damage(GOOD, lambda e: e["draft_seconds"]["2"].update({"2": True})),
    "step zero": _damage(GOOD, lambda e: e.update(step_seconds=0)),
    "acceptance a string": _damage(GOOD, lambda e: e["acceptance"]["accepted"]["2"]["2"].update({"2": "most"})),
    "acceptance bad key": _damage(GOOD, lambda e: e["acceptance"]["accepted"].update({"deep": {}})),
    "acceptance no steps": _damage(GOOD, lambda e: e["acceptance"].pop("steps")),
    "acceptance negative": _damage(GOOD, lambda e: e["acceptance"]["accepted"]["3"]["2"].update({"8": -2.0})),
}


@pytest.mark.parametrize("name", list(DAMAGED))
def test_damaged_entries_are_measured_again_not_trusted(sizer, name):
    sizer.seed(DAMAGED[name])
    choice, _, warnings = sizer()
    assert len(warnings) == 1 and str(sizer.file) in warnings[0], warnings
    assert "damaged" in warnings[0] or "cannot read" in warnings[0]
    measured = sizer.timed + sizer.recorded
    assert measured >= 1 and choice.tree.depth in GRID.depths
    # Repaired: the next use finds a valid entry and measures nothing.
    _, _, warnings = sizer()
    assert not warnings and sizer.timed == sizer.recorded == 0


def test_a_damaged_file_is_replaced_even_when_the_new_timings_are_not_cached(sizer):
    sizer.seed(DAMAGED["truncated"])
    sizer.busy = 1.5
    _, _, warnings = sizer()
    assert len(warnings) == 1 and "damaged" in warnings[0] and "busy" in warnings[0]
    assert set(json.loads(sizer.file.read_text())) == {"acceptance"}


def test_a_damaged_acceptance_file_in_a_draft_is_a_data_error(tmp_path):
    (tmp_path / "acceptance.json").write_text(json.dumps({"accepted": {"2": {"2": {"2": "many"}}}, "steps": 3}))
    with pytest.raises(DataError, match="acceptance.json are damaged.*accepted\\[2\\]\\[2\\]\\[2\\]"):
        AcceptanceTable.load(tmp_path / "acceptance.json")
    (tmp_path / "acceptance.json").write_text(json.dumps(ACCEPTANCE))
    assert AcceptanceTable.load(tmp_path / "acceptance.json").expected(sizing.TreeConfig(8, 3, 2)) == 2.4


# --- through the command line ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_draft(draft_dir, tmp_path_factory):
    """A copy of the tiny draft with made-up acceptance statistics: only the timings are measured."""
    draft = tmp_path_factory.mktemp("cli_draft") / "d"
    draft.mkdir()
    for f in draft_dir.iterdir():
        (draft / f.name).write_bytes(f.read_bytes())
    (draft / "acceptance.json").write_text(json.dumps(ACCEPTANCE))
    return draft


def _generate(tiny_dir):
    return ["generate", "--model", str(tiny_dir), "--fast-cpu", "off", "--prompt", "Count to five.",
            "--max-new-tokens", "8", "--json"]


def test_command_line_cache_faults(tiny, tiny_dir, cli_draft, draft_dir, tmp_path):
    """Through ``turbolm.cli.main`` (one child process): unwritable caches warn once and the answer is
    still vanilla's; a damaged cache file is measured again (one warning) and repaired; ``--retime``
    times again; misuse and a damaged acceptance.json in a draft are one clean error."""
    model, tok = tiny
    bad_draft = tmp_path / "bad_draft"
    bad_draft.mkdir()
    for f in draft_dir.iterdir():
        (bad_draft / f.name).write_bytes(f.read_bytes())
    (bad_draft / "acceptance.json").write_text('{"accepted": {"2": {"2": {"2": NaN}}}, "steps": 3}')
    (tmp_path / "a_file").write_text("not a directory")
    damaged = tmp_path / "damaged"
    key = tree_cache_key(model, tok, DecoderSpec("jakiro", draft=str(cli_draft)))
    damaged_file = damaged / "tree-sizing" / f"{key}.json"
    damaged_file.parent.mkdir(parents=True)
    damaged_file.write_text('{"verify_seconds": {"1": 0.0')

    gen = _generate(tiny_dir)
    jakiro = [*gen, "--speculative", "jakiro", "--draft", str(cli_draft)]
    unwritable = {"a file": tmp_path / "a_file", "no such parent": Path("/proc/turbolm-no-such-dir/cache")}
    if not Path("/proc/self").is_dir():
        del unwritable["no such parent"]
    cases = {
        "vanilla": Case(gen),
        **{name: Case(jakiro, env={"TURBOLM_CACHE": str(cache)}) for name, cache in unwritable.items()},
        "damaged": Case(jakiro, env={"TURBOLM_CACHE": str(damaged)}),
        "repaired, retime": Case([*jakiro, "--retime"], env={"TURBOLM_CACHE": str(damaged)}),
        "retime without auto": Case([*gen, "--speculative", "prompt-lookup", "--retime"]),
        "damaged acceptance.json": Case([*gen, "--speculative", "jakiro", "--draft", str(bad_draft)],
                                        env={"TURBOLM_CACHE": str(tmp_path / "c2")}),
    }
    results = dict(zip(cases, run_cli_cases(list(cases.values()), tmp_path)))
    for name, r in results.items():
        assert "Traceback" not in r.stderr and r.returncode != "traceback", f"{name}:\n{r.stderr}"

    vanilla = json.loads(results["vanilla"].stdout)["token_ids"]
    for name, cache in unwritable.items():
        r = results[name]
        assert r.returncode == 0 and json.loads(r.stdout)["token_ids"] == vanilla, f"{name}:\n{r.stderr}"
        warnings = [line for line in r.stderr.splitlines() if line.startswith("turbolm: warning:")]
        assert len(warnings) == 1, f"{name}:\n{r.stderr}"
        # (Timings taken on a busy machine are not cached, so nothing is written and that is the warning.)
        assert ("cannot write" in warnings[0] and str(cache) in warnings[0]) or "busy" in warnings[0], r.stderr
        assert "tree auto:" in r.stderr  # the choice is still made and explained
    r = results["damaged"]
    assert r.returncode == 0 and json.loads(r.stdout)["token_ids"] == vanilla, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("turbolm: warning:")]
    assert len(warnings) == 1 and str(damaged_file) in warnings[0] and "damaged" in warnings[0], r.stderr
    r = results["repaired, retime"]
    assert r.returncode == 0 and "damaged" not in r.stderr, r.stderr
    assert "timing the target and the draft again, as asked" in r.stderr, r.stderr
    assert isinstance(json.loads(damaged_file.read_text()), dict)  # rewritten whole
    assert_clean_error(results["retime without auto"], "--retime", "--tree auto")
    assert_clean_error(results["damaged acceptance.json"], str(bad_draft / "acceptance.json"), "damaged")


@pytest.mark.slow  # ~15 s: two more commands load the model and time the draft
def test_retime_on_bench_spec_and_demo(tiny_dir, cli_draft, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["Hello there"]}) + "\n")
    bench = ["bench", "spec", "--questions", str(questions), "--model", str(tiny_dir), "--fast-cpu", "off",
             "--methods", "vanilla,jakiro", "--draft", f"jakiro={cli_draft}", "--max-new-tokens", "4", "--warmup", "0",
             "--retime"]
    cache = {"TURBOLM_CACHE": str(tmp_path / "cache")}
    cases = {
        # First: logging (bench's progress lines) writes to the first case's standard error.
        "bench": Case([*bench, "--out", str(tmp_path / "b1")], env=cache),
        "demo": Case(["demo", "--model", str(tiny_dir), "--speculative", "jakiro", "--draft", str(cli_draft),
                      "--max-new-tokens", "2", "--retime"], env=cache),
        "bench fixed": Case([*bench, "--tree", "fixed", "--out", str(tmp_path / "b2")]),
    }
    results = dict(zip(cases, run_cli_cases(list(cases.values()), tmp_path)))
    for name in ("bench", "demo"):
        r = results[name]
        assert r.returncode == 0 and "timing the target and the draft again, as asked" in r.stderr, f"{name}:\n{r.stderr}"
    assert_clean_error(results["bench fixed"], "--retime", "--tree auto")
