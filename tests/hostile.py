"""Feeding hostile input through the ``turbolm`` command line, in a subprocess.

``run_cli_cases(cases)`` runs many command lines in *one* child Python process (importing torch and
transformers once, ~4 s, instead of once per case): each case calls ``turbolm.cli.main(argv)``
exactly as the ``turbolm`` script does, with its own standard input, environment additions and
working directory; anything that escapes ``main`` (what would print a traceback) is caught and
reported as a traceback. ``run_turbolm(*argv)`` runs one real ``python -m turbolm`` process, for
what only a real process shows (signals, pipes, import-time interrupts).

``assert_clean_error(result, *fragments)``: exit status 2, standard error is one line starting
with ``turbolm: error:`` and holding every fragment (case-insensitive), no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_DRIVER = r"""
import contextlib, io, json, logging, os, sys, traceback
from turbolm.cli import main

cases = json.load(open(sys.argv[1]))
results = []
for case in cases:
    err, out = io.StringIO(), io.StringIO()
    saved_env = {k: os.environ.get(k) for k in case["env"]}
    os.environ.update(case["env"])
    cwd = os.getcwd()
    if case["cwd"]:
        os.chdir(case["cwd"])
    sys.stdin = io.TextIOWrapper(io.BytesIO(case["stdin"].encode("latin-1")), encoding="utf-8",
                                 errors="strict")
    logging.root.handlers.clear()  # main() binds its log handler to this case's stderr, not the first case's
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(case["argv"])
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        rc = "traceback"
        err.write(traceback.format_exc())
    finally:
        os.chdir(cwd)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results.append({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()})
json.dump(results, open(sys.argv[2], "w"))
"""


@dataclass
class Case:
    argv: list[str]
    stdin: bytes = b""
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None


@dataclass
class Result:
    argv: list[str]
    returncode: int | str  # "traceback": an exception escaped main()
    stdout: str
    stderr: str


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def run_cli_cases(cases: list[Case], tmp_path: Path, env: dict[str, str] | None = None, timeout: float = 600) -> list[Result]:
    """Every case through ``turbolm.cli.main`` in one child process, in order."""
    spec = tmp_path / "hostile_cases.json"
    out = tmp_path / "hostile_results.json"
    spec.write_text(json.dumps([{"argv": [str(a) for a in c.argv], "stdin": c.stdin.decode("latin-1"),
                                 "env": c.env, "cwd": c.cwd} for c in cases]))
    p = subprocess.run([sys.executable, "-c", _DRIVER, str(spec), str(out)], env=child_env(env), capture_output=True,
                       text=True, timeout=timeout, cwd=str(tmp_path))
    assert p.returncode == 0 and out.is_file(), f"the driver itself failed:\n{p.stderr[-3000:]}"
    return [Result(c.argv, r["rc"], r["stdout"], r["stderr"]) for c, r in zip(cases, json.loads(out.read_text()))]


def run_turbolm(*argv, stdin: bytes | None = None, env: dict[str, str] | None = None, timeout: float = 300,
                cwd: str | Path | None = None) -> Result:
    """One real ``python -m turbolm`` process."""
    p = subprocess.run([sys.executable, "-m", "turbolm", *map(str, argv)], input=stdin, env=child_env(env),
                       capture_output=True, timeout=timeout, cwd=cwd)
    return Result(list(map(str, argv)), p.returncode, p.stdout.decode("utf-8", "replace"),
                  p.stderr.decode("utf-8", "replace"))


def assert_clean_error(result: Result, *fragments: str, allow_warnings: bool = False) -> None:
    """Exit status 2 and one line ``turbolm: error: ...`` naming every fragment; no traceback. With
    ``allow_warnings``, ``turbolm: warning:`` lines may come before it."""
    where = f"turbolm {' '.join(result.argv)}"
    assert "Traceback" not in result.stderr, f"{where}: traceback\n{result.stderr}"
    assert result.returncode == 2, f"{where}: exit status {result.returncode}, stderr:\n{result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if allow_warnings:
        lines = [line for line in lines if not line.startswith("turbolm: warning:")]
    errors = [line for line in lines if line.startswith("turbolm: error:")]
    assert len(lines) == 1 and len(errors) == 1, f"{where}: expected one 'turbolm: error:' line, got:\n{result.stderr}"
    for fragment in fragments:
        assert fragment.lower() in errors[0].lower(), f"{where}: {fragment!r} not in {errors[0]!r}"
