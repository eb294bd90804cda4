"""How the application talks to the user: one line per message, on stderr, and exit code 2 for bad input."""

from __future__ import annotations

import re
import sys
from typing import NoReturn

EXIT_USAGE = 2  # bad input: a setting, a file, a path; found before training where it can be
EXIT_TRAINING = (
    3  # training stopped on its own: a non-finite loss or gradient (the last good adapter is kept)
)


def one_line(err: BaseException | str) -> str:
    """A message (or an exception's text) folded onto one line."""
    return re.sub(r"\s*\n\s*", " ", str(err)).strip()


def say(message: str) -> None:
    print(f"lightning-qlora: {message}", file=sys.stderr, flush=True)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Prints ``lightning-qlora: error: <message>`` (one line) and exits with ``code``."""
    print(f"lightning-qlora: error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


class PreflightError(Exception):
    """A problem with the run's inputs, found before anything is written."""
