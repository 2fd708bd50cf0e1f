"""User errors: what every command reports as one line on stderr with exit status 2.

A ``UserError`` is a problem with the user's input (a config value, a data folder, a
command-line argument); a ``StorageError`` a file that could not be written (a full disk),
status 74; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

EXIT_USER_ERROR = 2
# EX_IOERR from sysexits.h: something the run must write could not be written, most often
# because the disk is full. Deliberately not EXIT_PREEMPTED (75): the SLURM wrapper requeues
# only that, and a job rerun on a full disk would fail again.
EXIT_IO_ERROR = 74


class UserError(Exception):
    """A problem with the user's input: reported as one line and exit status 2, no traceback."""


class SharedUserError(UserError):
    """A user error every process of a run raises alike (they agreed on it): reported once."""


class StorageError(Exception):
    """A file the run must keep could not be written (a full disk, a quota, an I/O error):
    reported as one line and exit status EXIT_IO_ERROR, and not requeued."""


def first_line(exc: BaseException, with_type: bool = False) -> str:
    """The line of an exception worth showing, also when a DataLoader worker re-raised it.

    A worker's exception comes back as 'Caught X in DataLoader worker ...' followed by the
    original traceback, whose last line is 'module.X: message'. ``with_type`` prefixes the
    exception's class name, for errors of other libraries whose message alone is unclear.
    """
    text = str(exc).strip()
    lines = text.splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught "):
        last = lines[-1]
        name = type(exc).__name__
        return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    if not lines:
        return type(exc).__name__
    return f"{type(exc).__name__}: {lines[0]}" if with_type else lines[0]


def report_error(exc: BaseException, prefix: str = "") -> int:
    """Print ``error: <first line>`` on stderr; returns EXIT_USER_ERROR for ``main`` to return."""
    print(f"error: {prefix}{first_line(exc)}", file=sys.stderr)
    return EXIT_USER_ERROR
