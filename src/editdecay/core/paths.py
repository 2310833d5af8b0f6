"""Telling a local path from a hub id, in one place (model loading and grid planning both ask)."""

from __future__ import annotations


def looks_like_path(name: str) -> bool:
    """True for a name no hub id can be: it starts with /, ., ~ or a backslash, has more than one '/', or holds
    a backslash or a colon. Hub ids are NAME or ORG/NAME."""
    return name.startswith(("/", ".", "~", "\\")) or name.count("/") > 1 or "\\" in name or ":" in name


__all__ = ["looks_like_path"]
