"""Child-process plumbing shared by every `start_*_process` entry."""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import signal
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable


@dataclass
class ChildStatus:
    """Sent once by a child over its start pipe: ready (with facts the launcher needs) or failed."""

    name: str
    ok: bool
    error: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so no child outlives the launcher."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def setup_child_logging(level: str, name: str) -> None:
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")


def run_child(name: str, pipe: Connection, log_level: str, setup: Callable[[], tuple[Callable[[], None], dict]]) -> None:
    """Run `setup()` (which returns the loop and facts for the launcher), report, then loop.

    Any exception during setup is reported to the launcher with its traceback, so the launcher
    can stop everything and show why.
    """
    die_with_parent()
    # A session of its own: a signal sent to the launcher's process group (Ctrl-C's SIGINT,
    # `kill -TERM -PGID`, `timeout`) reaches the launcher only, which lets the requests in flight
    # finish and then stops the children. Had the children received it too, they would have died
    # at once and the launcher would have reported a crash.
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_child_logging(log_level, name)
    try:
        loop, info = setup()
    except BaseException:
        pipe.send(ChildStatus(name, ok=False, error=traceback.format_exc()))
        raise SystemExit(1)
    pipe.send(ChildStatus(name, ok=True, info=info))
    pipe.close()
    loop()


@dataclass(frozen=True)
class EntryPoint:
    """A child's `start_*_process` named by module, imported only in the child.

    The launcher starts children with `spawn`, which pickles the target by reference; naming the
    module instead keeps the launcher from importing torch and the model code of every child
    before it can start the first one.
    """

    module: str
    function: str

    def __call__(self, *args: Any) -> None:
        getattr(importlib.import_module(self.module), self.function)(*args)
