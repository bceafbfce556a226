import pytest

from app.core.errors import SpecError
from app.core.routing import queue_for_tags, queue_for_worker, worker_queues


@pytest.mark.parametrize(("required", "queue"), [
    ([], "tasks"),
    (["gpu"], "tasks.gpu"),
    (["gpu", "a100"], "tasks.a100+gpu"),
    (["a100", "gpu", "gpu"], "tasks.a100+gpu"),
])
def test_queue_for_tags(required: list[str], queue: str) -> None:
    assert queue_for_tags("tasks", required) == queue


def test_bad_tag_names_field() -> None:
    with pytest.raises(SpecError) as info:
        queue_for_tags("tasks", ["a.b"])
    assert info.value.field == "spec.tags"


def test_worker_queues_cover_every_subset() -> None:
    queues = worker_queues("tasks", ["gpu", "a100"], "w1")
    assert queues == ["tasks", "tasks.a100", "tasks.gpu", "tasks.a100+gpu", "tasks.worker.w1"]
    assert len(worker_queues("t", list("abcdef"), "w")) == 1 + 63 + 1


def test_requirement_served_only_by_superset_workers() -> None:
    gpu = set(worker_queues("tasks", ["gpu"], "w1"))
    both = set(worker_queues("tasks", ["gpu", "a100"], "w2"))
    need_both = queue_for_tags("tasks", ["gpu", "a100"])
    assert need_both in both and need_both not in gpu
    assert queue_for_tags("tasks", ["gpu"]) in gpu & both
    assert queue_for_worker("tasks", "w1") in gpu - both
