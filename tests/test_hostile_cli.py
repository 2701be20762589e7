"""Hostile input at the command line itself (issue 16, classes 2 and 8): text that is not UTF-8,
numbers at the edges, a reader that closes the pipe, Ctrl-C while the command starts, and the small
things a user notices. Each case runs through ``turbolm.cli.main`` in a child process
(tests/hostile.py); the pipe and signal cases in a real ``python -m turbolm`` process."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hostile import Case, assert_clean_error, child_env, run_cli_cases, run_turbolm

from turbolm import __version__


@pytest.fixture(scope="module")
def results(tiny_dir, tmp_path_factory):
    """Every one-line-error case of this file, run in one child process."""
    m = ["--model", str(tiny_dir)]
    gen = ["generate", *m, "--max-new-tokens", "4"]
    cases = {
        "argv not UTF-8": (Case([*gen, "--prompt", "caf\udce9"]), ["--prompt", "UTF-8"]),
        "stdin not UTF-8": (Case([*gen, "--prompt", "-"], stdin=b"hello \xff\xfe world"), ["--prompt", "UTF-8", "0xff"]),
        "system not UTF-8": (Case([*gen, "--prompt", "hi", "--system", "\udcff"]), ["--system", "UTF-8"]),
        "stop not UTF-8": (Case([*gen, "--prompt", "hi", "--stop", "\udcff"]), ["--stop", "UTF-8"]),
        "empty stdin": (Case([*gen, "--prompt", "-"], stdin=b"  \n"), ["empty prompt"]),
        "temperature nan": (Case([*gen, "--prompt", "hi", "--temperature", "nan"]), ["--temperature", "nan"]),
        "temperature inf": (Case([*gen, "--prompt", "hi", "--temperature", "inf"]), ["--temperature", "inf"]),
        "top-p nan": (Case([*gen, "--prompt", "hi", "--top-p", "nan"]), ["--top-p"]),
        "top-p 0": (Case([*gen, "--prompt", "hi", "--top-p", "0"]), ["--top-p"]),
        "sampling top-k negative": (Case([*gen, "--prompt", "hi", "--sampling-top-k", "-3"]), ["--sampling-top-k"]),
        "max-new-tokens 0": (Case([*gen, "--prompt", "hi", "--max-new-tokens", "0"]), ["--max-new-tokens"]),
        "draft-layers 0": (Case([*gen, "--prompt", "hi", "--speculative", "model", "--draft-layers", "0"]),
                           ["--draft-layers", ">= 1", "0"]),
        "draft-layers too many": (Case([*gen, "--prompt", "hi", "--speculative", "model", "--draft-layers", "99"]),
                                  ["--draft-layers", "99"]),
        "adaptive without speculation": (Case([*gen, "--prompt", "hi", "--adaptive"]), ["--adaptive"]),
    }
    tmp = tmp_path_factory.mktemp("hostile_cli")
    out = run_cli_cases([case for case, _ in cases.values()], tmp)
    return {name: (r, cases[name][1]) for name, r in zip(cases, out)}


CASES = ["argv not UTF-8", "stdin not UTF-8", "system not UTF-8", "stop not UTF-8", "empty stdin", "temperature nan",
         "temperature inf", "top-p nan", "top-p 0", "sampling top-k negative", "max-new-tokens 0", "draft-layers 0",
         "draft-layers too many", "adaptive without speculation"]


@pytest.mark.parametrize("name", CASES)
def test_one_clean_line(results, name):
    result, fragments = results[name]
    assert_clean_error(result, *fragments)


def test_sampling_options_are_checked_before_the_model_loads(tmp_path):
    """A bad sampling option is reported at once, even when the model would not load either."""
    (result,) = run_cli_cases([Case(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi",
                                     "--temperature", "nan"])], tmp_path)
    assert_clean_error(result, "--temperature")


@pytest.mark.slow  # a fresh interpreter (~6 s): with the slow tests, to keep make test-fast short
def test_version(tmp_path):
    (result,) = run_cli_cases([Case(["--version"])], tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"turbolm {__version__}"


@pytest.mark.slow  # a real process (~6 s): runs with `make test`, as CI does
def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(tiny_dir):
    """``turbolm generate ... | head -c 1``: no BrokenPipeError traceback, status 141 (SIGPIPE)."""
    p = subprocess.Popen([sys.executable, "-m", "turbolm", "generate", "--model", str(tiny_dir), "--prompt", "hello",
                          "--max-new-tokens", "200", "--raw"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    p.stdout.read(1)
    p.stdout.close()
    stderr = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


def test_ctrl_c_while_the_command_starts(tmp_path):
    """SIGINT during the imports (while torch loads): 'interrupted', status 130, no traceback."""
    # A shell's background job inherits SIGINT ignored, and Python then installs no handler: give the
    # child the default disposition, as a terminal's foreground command has.
    p = subprocess.Popen([sys.executable, "-m", "turbolm", "generate", "--prompt", "hi"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=child_env(), cwd=tmp_path,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    maps = Path(f"/proc/{p.pid}/maps")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:  # until torch's library is being loaded:
        try:  # Python's own SIGINT handler is installed by then, the command not yet started
            if "libtorch" in maps.read_text():
                break
        except OSError:
            pass
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err.decode()
    assert "Traceback" not in err.decode() and "interrupted" in err.decode()


def test_import_turbolm_is_light():
    """The package imports torch only when a name that needs it is used."""
    code = "import sys, turbolm; assert 'torch' not in sys.modules; turbolm.generate; assert 'torch' in sys.modules"
    assert run_python(code).returncode == 0


def run_python(code: str):
    return subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # a fresh interpreter (~6 s): with the slow tests, to keep make test-fast short
def test_unknown_subcommand_is_argparse_usage():
    result = run_turbolm("frobnicate")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "invalid choice" in result.stderr
