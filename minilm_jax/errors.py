"""Errors a user can fix, kept apart from bugs.

Command lines print a `UserError` as one line (`error: ...`) with no traceback; anything else
is a bug and keeps its traceback. Usage errors (bad flags, contradictory options) exit 2,
everything else 1. A run stopped by a signal after saving its work (`Stopped`) is no error: one
`stopped: ...` line and exit status 75 (preemption.STOPPED_EXIT).
"""

from __future__ import annotations

import functools
import sys


class UserError(ValueError):
    """Something the user gave us is wrong; the message says what and how to fix it."""

    exit_code = 1
    # True when every process of a multi-process run raises it alike (at the same point, on shared facts):
    # they can all end normally, with jax's shutdown, rather than as lost peers of each other.
    every_process = False


class UsageError(UserError):
    """A command-line option is wrong or contradicts another one."""

    exit_code = 2


class Stopped(Exception):
    """A stop signal ended the run after a checkpoint; the message says where to resume."""

    exit_code = 75  # preemption.STOPPED_EXIT
    every_process = True  # they agreed on the step (preemption.StopAgreement)


def label(e: BaseException) -> str:
    """The word that starts the line `cli_main` prints for `e`."""
    return "stopped" if isinstance(e, Stopped) else "error"


def user_facing(e: BaseException) -> tuple[str, int] | None:
    """(the `error:` line's message, the exit status) for an exception a user can act on; None for a bug."""
    if isinstance(e, (UserError, Stopped)):
        return str(e), e.exit_code
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(e, OSError):  # a full disk, a read-only folder, a vanished file: the OS names it
        return f"{e.strerror or e} ({e.filename or ''}); check the path, its permissions and free space", 1
    return None


def cli_main(main):
    """Run a command-line `main()`, turning user errors into one line on stderr and an exit status."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UserError, Stopped, KeyboardInterrupt, OSError) as e:
            message, status = user_facing(e)
            print(f"{label(e)}: {message}", file=sys.stderr)
            sys.exit(status)

    return wrapper
