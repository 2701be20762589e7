"""Ctrl-C and SIGTERM for long-running work: nothing measured or trained is lost.

``sigterm_as_interrupt()``: SIGTERM (a job scheduler, ``kill``, a closing terminal multiplexer)
raises KeyboardInterrupt as Ctrl-C does, so whatever a command does on Ctrl-C (write the report
of what was measured, save the training state) it also does on SIGTERM.

``stop_at_safe_point()``: inside a training loop the first Ctrl-C or SIGTERM only asks the loop
to stop; it finishes the step it is in, saves, and raises :class:`Interrupted` (a
KeyboardInterrupt with a message saying where the state is). A second one stops at once.

Signal handlers can only be set in the main thread; elsewhere both do nothing.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM after the work so far was saved; the message says where and how to continue."""


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def _handlers(handler, signals):
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt():
    """Inside the block SIGTERM raises KeyboardInterrupt, as Ctrl-C does; the previous handler
    comes back afterwards."""
    if not _in_main_thread():
        yield
        return
    with _handlers(_raise_interrupt, [signal.SIGTERM]):
        yield


class StopRequest:
    """Set by the first Ctrl-C / SIGTERM inside :func:`stop_at_safe_point`."""

    def __init__(self):
        self.requested = False


@contextmanager
def stop_at_safe_point(notice: str = "stopping after this step; press Ctrl-C again to stop at once"):
    """Yields a :class:`StopRequest`: the first Ctrl-C or SIGTERM sets ``requested`` (and writes
    ``notice`` to standard error), the loop checks it between steps; a second one raises
    KeyboardInterrupt at once. The previous handlers come back afterwards."""
    stop = StopRequest()
    if not _in_main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        try:  # os.write, not print: a handler may run in the middle of another write to stderr
            os.write(2, f"\nturbolm: {notice}\n".encode())
        except OSError:
            pass

    with _handlers(handler, [signal.SIGINT, signal.SIGTERM]):
        yield stop
