"""Errors a user can fix, kept apart from bugs.

Command lines print a `UserError` as one line (`error: ...`) with no traceback; anything else
is a bug and keeps its traceback. Usage errors (bad flags, contradictory options) exit 2,
everything else 1.
"""

from __future__ import annotations

import functools
import sys


class UserError(ValueError):
    """Something the user gave us is wrong; the message says what and how to fix it."""

    exit_code = 1


class UsageError(UserError):
    """A command-line option is wrong or contradicts another one."""

    exit_code = 2


def user_facing(e: BaseException) -> tuple[str, int] | None:
    """(the `error:` line's message, the exit status) for an exception a user can act on; None for a bug."""
    if isinstance(e, UserError):
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
        except (UserError, KeyboardInterrupt, OSError) as e:
            message, status = user_facing(e)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(status)

    return wrapper
