"""User-facing errors: one line that names the file and the field; how a command line runs and ends."""
from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import NoReturn


class UserError(Exception):
    """Bad input from the user (a file, a field, an option).

    Command lines print ``str(error)`` as one line and exit with status 2; library code raises it
    instead of calling ``sys.exit``.
    """


def one_line(error: BaseException) -> str:
    """The last meaningful line of an error's message.

    A ``UserError`` raised inside a DataLoader worker or a Ray task comes back re-raised with the
    worker's whole traceback as its message; the user only needs the last line.
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1]
    # the error's own class, or one it derives from: Ray re-raises a task's UserError as a
    # RayTaskError(UserError), whose last line names the UserError
    for kind in type(error).__mro__:
        prefix = f"{kind.__module__}.{kind.__qualname__}: "
        if last.startswith(prefix):
            return last[len(prefix):]
    return last


def run_command(body: Callable[[], int], interrupted: str) -> int:
    """Run a command line's body and return its exit code: a ``UserError`` becomes one line on stderr
    and exit code 2; Ctrl-C prints ``interrupted`` (what to do next) and exit code 130."""
    try:
        return body()
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130


def exit_process(code: int) -> NoReturn:
    """End a command line's process with exit code ``code``, without the garbage collections of the
    interpreter's shutdown: with torch, torchvision and Ray loaded they walk every one of their hundreds of
    thousands of objects, about 1 s after a sweep (1.6 s from the end of ``main`` to the end of the
    process; 0.7 s this way, on the VM of BENCHMARKS.md). What is garbage now is collected here, its
    finalizers run; the rest is set aside (``gc.freeze``) and freed by reference counting as the
    modules are cleared, or with the process. Only for the end of a process: ``main`` itself stays
    callable from a test."""
    gc.collect()
    gc.freeze()
    sys.exit(code)
