"""Where basel-edge keeps what it builds once and reuses (the materialised default model, builds)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: $BASEL_EDGE_CACHE, else $XDG_CACHE_HOME/basel-edge, else ~/.cache/basel-edge."""
    explicit = os.environ.get("BASEL_EDGE_CACHE")
    if explicit:
        root = Path(explicit)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "basel-edge"
    root.mkdir(parents=True, exist_ok=True)
    return root
