"""User-facing errors: one line that names the file and the field."""
from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input from the user (a file, a field, an option).

    Command lines print ``str(error)`` as one line and exit with status 2; library code raises it
    instead of calling ``sys.exit``.
    """


def one_line(error: BaseException) -> str:
    """The last meaningful line of an error's message.

    A ``UserError`` raised inside a DataLoader worker comes back re-raised with the worker's whole
    traceback as its message; the user only needs the last line.
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1]
    prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


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
