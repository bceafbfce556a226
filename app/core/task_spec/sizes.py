"""Quantities as the original templates write them: memory sizes (``16Gi``) and CPU counts.

Pure parsing, used by the spec (``resources.hardware``) and by hardware routing.
"""

from __future__ import annotations

import re

# Binary (Ki, Mi, ... with or without B) and decimal (K/KB, M/MB, ...) units, as Kubernetes
# and the original templates write them; a bare number is bytes.
_UNITS = {
    "": 1, "b": 1,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*\Z")
_CPU_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(m?)\s*\Z")


def parse_size(value: object) -> int:
    """Bytes of ``16Gi``, ``32GiB``, ``512Mi``, ``1.5G`` or a plain number of bytes.

    Raises ``ValueError`` with a message saying what a size looks like.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size like 16Gi")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{value!r} is not a size like 16Gi (negative)")
        return int(value)
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and match.group(2).lower() in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise ValueError(f"{value!r} is not a size like 16Gi")


def parse_cpu(value: object) -> float:
    """CPU cores of ``16``, ``"16"``, ``2.5`` or Kubernetes millicores ``"500m"``."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number of CPU cores like 16 or 500m")
    if isinstance(value, int | float):
        if value <= 0:
            raise ValueError(f"{value!r} is not a positive number of CPU cores")
        return float(value)
    if isinstance(value, str):
        match = _CPU_RE.match(value)
        if match:
            cores = float(match.group(1)) / (1000 if match.group(2) else 1)
            if cores > 0:
                return cores
    raise ValueError(f"{value!r} is not a number of CPU cores like 16 or 500m")


def format_size(size_bytes: int) -> str:
    """``17179869184`` → ``16Gi`` (the largest binary unit that divides it, else bytes)."""
    for unit, factor in (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if size_bytes >= factor and size_bytes % factor == 0:
            return f"{size_bytes // factor}{unit}"
    if size_bytes >= 1024**3:
        return f"{size_bytes / 1024**3:.1f}Gi"
    return f"{size_bytes}B"


def format_size_exact(size_bytes: int, *, approx: bool = False) -> str:
    """``17179869184`` → ``16Gi``; a size no binary unit divides stays in bytes, so two
    different sizes never print alike (queue names). ``approx``: for people (``meshq
    workers``, messages), the largest unit the size reaches, with one decimal unless it
    is whole (``23.5Gi``, never ``24683784Ki``)."""
    units = (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024))
    if approx:
        for unit, factor in units:
            if size_bytes >= factor:
                whole = size_bytes % factor == 0
                return f"{size_bytes // factor}{unit}" if whole else f"{size_bytes / factor:.1f}{unit}"
        return f"{size_bytes}B"
    for unit, factor in units:
        if size_bytes >= factor and size_bytes % factor == 0:
            return f"{size_bytes // factor}{unit}"
    return str(size_bytes)
