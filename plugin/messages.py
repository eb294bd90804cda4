"""How the application talks to the user: one line per message, on stderr, and exit code 2 for bad input."""

from __future__ import annotations

import re
import sys
from typing import NoReturn

EXIT_USAGE = 2


def one_line(err: BaseException | str) -> str:
    """A message (or an exception's text) folded onto one line."""
    return re.sub(r"\s*\n\s*", " ", str(err)).strip()


def say(message: str) -> None:
    print(f"lightning-qlora: {message}", file=sys.stderr, flush=True)


def fail(message: str) -> NoReturn:
    print(f"lightning-qlora: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)
