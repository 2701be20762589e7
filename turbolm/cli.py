"""The ``turbolm`` command: builds the parser from :mod:`turbolm.commands` and dispatches.

A library error becomes one line, ``turbolm: error: ...`` (exit status 2), with the library's
parameter names spelled as the command's flags; Ctrl-C exits with status 130.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from .commands import MODULES

    parser = argparse.ArgumentParser(prog="turbolm", description="Faster inference for Hugging Face causal language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
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
    except KeyboardInterrupt:
        print("\nturbolm: interrupted", file=sys.stderr)
        return 130


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
