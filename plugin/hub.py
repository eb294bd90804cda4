"""Where a name points: a local path or a Hugging Face hub id. The one owner of that rule."""

from __future__ import annotations

import os
import re

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(name: str) -> bool:
    """``"owner/name"`` or ``"name"``: the shape of a hub id (it may still not exist)."""
    return bool(HUB_ID.match(name))


def looks_local(path: str) -> bool:
    """A path rather than a hub id: exists, or is absolute/relative-marked, or has more than one '/'."""
    return os.path.exists(os.path.expanduser(path)) or path.startswith(("/", ".", "~")) or path.count("/") > 1
