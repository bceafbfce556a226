"""Validation of names that become paths (task ids, file names, stage names).

A name is refused, never rewritten: rewriting could make two different ids map
to the same directory.
"""

from __future__ import annotations

import re

SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}\Z")


def check_name(value: object, field: str = "name") -> str:
    """Return ``value`` if it is a safe single path component, else raise ``ValueError``.

    Safe: 1-200 characters of ``[A-Za-z0-9._-]``, not ``.``/``..`` and no ``..`` inside.
    """
    if not isinstance(value, str) or not SAFE_NAME_RE.match(value):
        raise ValueError(f"{field}: {value!r} must be 1-200 characters of [A-Za-z0-9._-]")
    if value in (".", "..") or ".." in value:
        raise ValueError(f"{field}: {value!r} must not contain '..'")
    return value
