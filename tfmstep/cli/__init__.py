"""Command-line programs (thin absl mains; the work is in the library)."""

import contextlib
import sys

from absl import logging

from tfmstep.errors import UserError


@contextlib.contextmanager
def exit_on_user_error():
    """Bad input ends a tool with one ``error: ...`` line on stderr and exit code 2, no stack trace."""
    try:
        yield
    except UserError as e:
        logging.flush()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
