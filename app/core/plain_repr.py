"""Celery's ``saferepr`` text of plain data, without its token stream.

Celery formats a message's arguments (``argsrepr``/``kwargsrepr``, at every send) and every
task's return value (for its ``task-succeeded`` event, in the pool process) with
``celery.utils.saferepr.saferepr``, a generator of tokens that costs about 6 µs per value:
~150 µs for one meshq result, a tenth of bare Celery's whole pool process per task.
meshq's specs and results are plain JSON data (dicts with string keys, lists, strings,
numbers, booleans, None), for which ``plain_repr`` builds the very same text directly.

It answers only where the text is certainly ``saferepr``'s: plain data (containers deeper
than ``maxlevels`` elided as ``saferepr`` does) and the whole text shorter than ``maxlen``
(``saferepr`` truncates at it). Otherwise it returns ``None`` — having looked at no more
than about ``maxlen`` characters' worth — and the caller uses ``saferepr`` itself.
"""

from __future__ import annotations

from typing import Any


class _TooLong(Exception):
    """The text reached its limit: not ours to give."""


class _NotPlain(Exception):
    """A value ``saferepr`` shows in a way of its own (sets, bytes, other objects)."""


def plain_repr(value: Any, maxlen: int, maxlevels: int = 3) -> str | None:
    """``saferepr(value, maxlen, maxlevels)``, or ``None`` when it cannot be built here."""
    parts: list[str] = []
    try:
        _add(value, 0, maxlevels, parts, [maxlen])
    except (_TooLong, _NotPlain, RecursionError):
        return None
    return "".join(parts)


def _take_text(parts: list[str], room: list[int], text: str) -> None:
    """``text`` quoted as ``saferepr`` quotes a string or key; one too long for the room left
    is refused before it is copied (a megabyte string costs nothing here)."""
    if len(text) + 2 >= room[0]:
        raise _TooLong
    _take(parts, room, "'" + text.replace("'", "\\'") + "'")


def _take(parts: list[str], room: list[int], text: str) -> None:
    room[0] -= len(text)
    if room[0] <= 0:  # saferepr cuts a token that reaches its limit: only shorter texts are equal
        raise _TooLong
    parts.append(text)


def _add(value: Any, level: int, maxlevels: int, parts: list[str], room: list[int]) -> None:
    kind = type(value)
    if kind is str:
        _take_text(parts, room, value)
    elif kind is int or kind is float or kind is bool:
        _take(parts, room, str(value))
    elif value is None:
        _take(parts, room, "None")
    elif kind is dict or kind is list or kind is tuple:
        if maxlevels and level >= maxlevels:  # too deep: shown as {...}, [...], (...) or (...,)
            _take(parts, room, "{...}" if kind is dict else "[...]" if kind is list
                  else "(...,)" if len(value) == 1 else "(...)")
            return
        if kind is dict:
            _take(parts, room, "{")
            for i, (key, item) in enumerate(value.items()):
                if type(key) is not str:
                    raise _NotPlain
                if i:
                    _take(parts, room, ", ")
                _take_text(parts, room, key)
                _take(parts, room, ": ")
                _add(item, level + 1, maxlevels, parts, room)
            _take(parts, room, "}")
            return
        _take(parts, room, "[" if kind is list else "(")
        for i, item in enumerate(value):
            if i:
                _take(parts, room, ", ")
            _add(item, level + 1, maxlevels, parts, room)
        _take(parts, room, "]" if kind is list else (",)" if len(value) == 1 else ")"))
    else:
        raise _NotPlain
