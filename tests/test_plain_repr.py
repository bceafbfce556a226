"""What Celery shows of meshq's arguments and results (Flower, events, ``inspect``) is exactly
``saferepr``'s text, built faster by ``app.core.plain_repr`` where it can be."""

from __future__ import annotations

from typing import Any

from celery.utils.saferepr import saferepr
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core.plain_repr import plain_repr
from tests.conftest import wait_for
from tests.test_flower import CeleryEvents

# Strings with what saferepr treats specially: quotes, backslashes, newlines, spaces (its
# truncation cuts at a space), non-ASCII.
TEXT = st.text(alphabet=st.sampled_from(list("ab '\"\\\n\té€😀")), max_size=12)
SCALARS = TEXT | st.integers(min_value=-10**20, max_value=10**20) | st.floats() | st.booleans() | st.none()
PLAIN = st.recursive(SCALARS, lambda children: st.lists(children, max_size=4)
                     | st.tuples(children) | st.tuples(children, children)
                     | st.dictionaries(TEXT, children, max_size=4), max_leaves=25)


@settings(max_examples=3000, deadline=None)
@given(value=PLAIN, maxlen=st.sampled_from([1, 5, 20, 64, 256, 1024]), maxlevels=st.sampled_from([0, 1, 2, 3, 5]))
def test_plain_repr_is_saferepr_or_declines(value: Any, maxlen: int, maxlevels: int) -> None:
    text = plain_repr(value, maxlen, maxlevels)
    assert text is None or text == saferepr(value, maxlen, maxlevels)


def test_plain_repr_answers_for_a_meshq_result_and_declines_what_saferepr_shows_its_own_way() -> None:
    result = {"task_id": "8d4f3c2a-1b2c-4d5e-8f9a-0123456789ab", "taskType": "echo", "runtime_sec": 0.0001,
              "echo": {"message": "it's", "data": {"i": 5, "ok": True, "none": None}}, "notes": ["a", "b"]}
    assert plain_repr(result, 1024) == saferepr(result, 1024)
    assert plain_repr(({"taskType": "echo"},), 1024) == saferepr(({"taskType": "echo"},), 1024)
    big = {"responses": [{"text": "x" * 50, "i": i} for i in range(10_000)]}
    assert plain_repr(big, 1024) is None  # saferepr truncates it
    deep = {"deep": {"er": {"est": {"x": 1}, "list": [1], "tuple": (1,)}}}
    assert plain_repr(deep, 1024, 3) == saferepr(deep, 1024, 3) == \
        "{'deep': {'er': {'est': {...}, 'list': [...], 'tuple': (...,)}}}"
    assert plain_repr({1: "int key"}, 1024) is None
    assert plain_repr({"a set": {1, 2}}, 1024) is None
    assert plain_repr({"bytes": b"x"}, 1024) is None


def test_a_workers_task_succeeded_event_shows_the_result_as_saferepr_does(worker_factory) -> None:
    """Flower's Result of a meshq task is Celery's own text of the result, and the sent task's
    arguments are shown as Celery shows them (``argsrepr``), redacted."""
    from app.celery import app
    from tasks import echo

    celery_events = CeleryEvents(app)
    try:
        worker_factory(worker_id="repr-w")
        spec = {"taskType": "echo", "data": {"quote": "it's", "n": 2.5, "none": None, "ok": True, "api_token": "s3cret"}}
        handle = echo.apply_async(args=[spec])
        result = handle.get(timeout=60)
        (succeeded,) = wait_for(lambda: celery_events.of(handle.id, "task-succeeded"), 30,
                                message="the task-succeeded event")
        (received,) = celery_events.of(handle.id, "task-received")
    finally:
        celery_events.close()
    assert succeeded["result"] == saferepr(result, echo.resultrepr_maxsize)
    assert plain_repr(result, echo.resultrepr_maxsize) is not None  # built the fast way
    shown = {**spec, "data": {**spec["data"], "api_token": "[redacted]"}}
    assert received["args"] == saferepr([shown], 1024)
    assert "s3cret" not in received["args"] and "'it\\'s'" in received["args"]
