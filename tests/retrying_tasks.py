"""Tasks with Celery retries, loaded by test workers through ``MESHQ_CELERY_CONFIG``
(``tests.retrying_celery_config``): a retry is the same run going on, not a death."""

from __future__ import annotations

from typing import Any

from app.celery import app
from tasks.base import MeshqTask


class RetryingEcho(MeshqTask):
    """``self.retry`` on its first ``data.fail_times`` attempts, then an echo."""

    name = "meshq_test.retrying_echo"
    task_type = "echo"

    def run(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        fail_times = int(args[-1].get("data", {}).get("fail_times", 0))
        if self.request.retries < fail_times:
            raise self.retry(exc=ConnectionError(f"flaky service, attempt {self.request.retries + 1}"),
                             countdown=0, max_retries=fail_times)
        return super().run(*args, **kwargs)


class AlwaysFailing(MeshqTask):
    """``autoretry_for`` an error it raises every time: Celery gives up after ``max_retries``."""

    name = "meshq_test.always_failing"
    task_type = "echo"
    autoretry_for = (ConnectionError,)
    retry_kwargs = {"max_retries": 4, "countdown": 0}

    def run(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise ConnectionError("the database is down")


retrying_echo = app.register_task(RetryingEcho())
always_failing = app.register_task(AlwaysFailing())
