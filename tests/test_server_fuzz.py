"""Property-based fuzzing of a real ``meshq serve`` from its own ``/openapi.json``: never a 5xx.

Schemathesis generates the requests (valid and invalid ones, for every operation) and
Hypothesis drives them. The server runs with a token (the schema is fetched with it,
as any client would) and a small upload limit; task submission and cancellation are
fuzzed too (junk specs get 422, valid ones are queued for nobody). The budget is
bounded and the run derandomised, so CI runs are repeatable.

(Schemathesis' lazy ``from_fixture`` loader does not work with pytest 9, so the test
walks the operations itself with each operation's Hypothesis strategy.)
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

TOKEN = "fuzz-token"
MAX_EXAMPLES = 30  # per operation and generation mode


def test_fuzz_every_operation_finds_no_server_error(server_factory, redis_client) -> None:
    server = server_factory(token=TOKEN, env={"MESHQ_MAX_UPLOAD_BYTES": "100000"})
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json", headers=server.headers(), timeout=10)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /api/v1/results/{task_id}/files", "GET /api/v1/results/{task_id}/files/{filename}",
            "HEAD /api/v1/results/{task_id}/files/{filename}", "POST /api/v1/tasks",
            "POST /api/v1/tasks/{task_id}/cancel", "GET /api/v1/workers"} <= labels

    failures: list[str] = []
    calls = 0
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case: Any) -> None:
                nonlocal calls
                calls += 1
                response = case.call(headers=server.headers(), timeout=30)
                case.validate_response(response, checks=[not_a_server_error])

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (e.g. /healthz has no parameters)
                continue
            except Exception as exc:  # noqa: BLE001 - collect every operation's failure, report together
                failures.append(f"{operation.label} ({mode}): {str(exc)[:2000]}")
    assert not failures, "\n\n".join(failures) + f"\n\nserver log:\n{server.log()[-4000:]}"
    assert calls >= len(operations) * MAX_EXAMPLES
    assert " 500 " not in server.log() and "Traceback" not in server.log()
