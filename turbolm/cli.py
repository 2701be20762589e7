"""The ``turbolm`` command: builds the parser from :mod:`turbolm.commands` and dispatches.

A library error becomes one line, ``turbolm: error: ...`` (exit status 2), with the library's
parameter names spelled as the command's flags; Ctrl-C (or SIGTERM where a command turns it into
an interrupt) exits with status 130, also while the command is still starting; a reader that
closes the output early (``turbolm generate ... | head``) ends the command quietly (status 141,
as a shell reports SIGPIPE).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

BROKEN_PIPE = 141  # 128 + SIGPIPE


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .commands import MODULES

    parser = argparse.ArgumentParser(prog="turbolm", description="Faster inference for Hugging Face causal language models.")
    parser.add_argument("--version", action="version", version=f"turbolm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("\nturbolm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    from .commands.common import error_message
    from .core.errors import TurboLMError

    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    _quiet_transformers()
    try:
        return args.run(args)
    except TurboLMError as e:
        print(f"turbolm: error: {error_message(e, getattr(args, 'flags', None))}", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """After the reader went away, Python's final flush of stdout would fail again (and print an
    'Exception ignored' line): point stdout at /dev/null."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (tests)
        pass


def _quiet_transformers() -> None:
    """Progress bars and advisory warnings from transformers would clutter a streamed answer."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
