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


def cli_main(main):
    """Run a command-line `main()`, turning user errors into one line on stderr and an exit status."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        except OSError as e:  # a full disk, a read-only folder, a vanished file: the OS names it
            print(f"error: {e.strerror or e} ({e.filename or ''}); check the path, its permissions and free space",
                  file=sys.stderr)
            sys.exit(1)

    return wrapper
