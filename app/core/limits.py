"""Every limit on what a client may send, in one place, each named in its error.

A task or pipeline document is bounded in bytes and in shape: nesting depth, number of
values (after YAML aliases are expanded), size of one string, total size after
expansion, number of pipeline stages. The server checks a document before submitting
it; the worker checks every message again before it reaches the pool (a message sent
with a plain ``apply_async`` never passed the server).

What a document becomes is bounded too, not only what was posted: the messages a
pipeline sends (a chain's first message carries every later stage, so the stages
together must fit ``MAX_MESSAGE_BYTES``, checked before anything is built), a spec
once its ``${...}`` references are resolved on the worker (``MAX_MESSAGE_BYTES``
again, counted while it is being built: ``ByteBudget``), and a task's stored result
(over ``MAX_RESULT_BYTES`` it stays in its ``responses.json`` and the result backend
holds a reference: ``tasks.oversize``). ``MESHQ_MAX_MESSAGE_BYTES`` and
``MESHQ_MAX_RESULT_BYTES`` lower or raise those two (``app.core.settings``).

The HTTP limits bound what a client may make the server hold: header bytes, and how
long it may take to send its headers or the next piece of its body.

Why these numbers: a real spec is a few KiB, nests fewer than 10 levels and names a
handful of stages; prompt lists of tens of thousands of items stay well inside. A
Python object nested a few hundred levels deep already breaks ``pickle`` (the worker
hands requests to its pool that way) and recursive JSON encoders.
"""

from __future__ import annotations

import json
from typing import Any

from app.core.errors import LimitExceeded

MAX_DOCUMENT_BYTES = 8 * 1024 * 1024  # a task/pipeline document as posted (JSON or YAML)
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a task message's body; a pipeline's stages together; a resolved spec
# A task's result as stored in the result backend (more: kept as a file). Half a message: a
# chain hands a stage's result on inside the next stage's message.
MAX_RESULT_BYTES = 8 * 1024 * 1024
RESULT_FILE = "result_file"  # the field of a stored result that says the whole result is kept as a file
MAX_ENVELOPE_BYTES = 64 * 1024 * 1024  # a result envelope posted by a worker
MAX_NESTING_DEPTH = 64  # levels of mappings/lists
MAX_VALUES = 200_000  # values (keys, items, scalars) after YAML aliases are expanded
MAX_STRING_BYTES = 4 * 1024 * 1024  # one string
MAX_EXPANDED_BYTES = 16 * 1024 * 1024  # all strings and scalars, after YAML aliases are expanded
MAX_STAGES = 64  # stages of one pipeline

MAX_HEADER_BYTES = 64 * 1024  # request line + headers of one HTTP request
HEADER_TIMEOUT_S = 10.0  # from connecting (or the previous response) to the end of the headers
BODY_IDLE_TIMEOUT_S = 30.0  # longest wait for the next piece of a request body

SCALAR_BYTES = 8  # what a number, boolean or null counts towards MAX_EXPANDED_BYTES


def json_bytes(value: Any) -> int:
    """Bytes of ``value`` as JSON (how messages and results are encoded)."""
    return len(json.dumps(value, separators=(",", ":")))


def _string_bytes(value: str) -> int:
    # ASCII is the common case and its length is known without encoding.
    return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))


def check_document(document: Any, field: str = "body") -> None:
    """Raise ``LimitExceeded`` (naming ``field`` and the limit) when ``document`` nests
    deeper than ``MAX_NESTING_DEPTH``, holds more than ``MAX_VALUES`` values, a string
    longer than ``MAX_STRING_BYTES`` or more than ``MAX_EXPANDED_BYTES`` in all.

    Iterative, and it stops at the first limit passed: a YAML alias bomb (a small body
    whose aliases expand to gigabytes) costs no more than the limits to check.
    """
    stack: list[tuple[Any, int]] = [(document, 1)]
    values = 0
    total = 0
    while stack:
        node, depth = stack.pop()
        values += 1
        if values > MAX_VALUES:
            raise LimitExceeded(field, f"more than {MAX_VALUES} values after YAML aliases are expanded "
                                       f"(MAX_VALUES={MAX_VALUES})")
        # Every document submitted is walked here: a plain str (the common leaf) is told apart by
        # its exact type first, sparing it the slower isinstance tests against unions.
        plain_str = type(node) is str
        if not plain_str and isinstance(node, dict | list | tuple):
            if depth > MAX_NESTING_DEPTH:
                raise LimitExceeded(field, f"nested deeper than {MAX_NESTING_DEPTH} levels "
                                           f"(MAX_NESTING_DEPTH={MAX_NESTING_DEPTH})")
            if isinstance(node, dict):
                for key, value in node.items():
                    stack.append((key, depth + 1))
                    stack.append((value, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in node)
            continue
        if plain_str or isinstance(node, str | bytes):
            size = _string_bytes(node) if isinstance(node, str) else len(node)
            if size > MAX_STRING_BYTES:
                raise LimitExceeded(field, f"a string of {size} bytes, more than {MAX_STRING_BYTES} "
                                           f"(MAX_STRING_BYTES={MAX_STRING_BYTES})")
            total += size
        else:
            total += SCALAR_BYTES
        if total > MAX_EXPANDED_BYTES:
            raise LimitExceeded(field, f"more than {MAX_EXPANDED_BYTES} bytes after YAML aliases are expanded "
                                       f"(MAX_EXPANDED_BYTES={MAX_EXPANDED_BYTES})")


def check_size(size: int, limit: int, name: str, field: str = "body") -> None:
    """``LimitExceeded`` when ``size`` bytes are more than ``limit`` (named ``name``)."""
    if size > limit:
        raise LimitExceeded(field, f"{size} bytes, more than {limit} ({name}={limit})")


def check_stages(count: int, field: str = "spec.stages") -> None:
    if count > MAX_STAGES:
        raise LimitExceeded(field, f"{count} stages, more than {MAX_STAGES} (MAX_STAGES={MAX_STAGES})")


class ByteBudget:
    """Bytes a value being built may grow to, spent piece by piece: the first piece past
    ``limit`` raises ``LimitExceeded`` before anything bigger is built (``${...}``
    references that copy a result 16 times, node after node)."""

    def __init__(self, limit: int, name: str, field: str, what: str) -> None:
        self.limit, self.name, self.field, self.what = limit, name, field, what
        self.spent = 0

    def spend(self, size: int, field: str | None = None) -> None:
        self.spent += size
        if self.spent > self.limit:
            raise LimitExceeded(field or self.field, f"more than {self.limit} bytes {self.what} "
                                                     f"({self.name}={self.limit})")
