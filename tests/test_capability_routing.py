"""Routing by hardware (``resources.hardware``) and the Celery router (docs/ROUTING.md).

Pure parts first (matching, queue names, the bound on queues), then real workers: a
worker only ever consumes capability queues it can serve, whatever sent the task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from app.core.capabilities import Capabilities, Gpu, Requirement, gpu_type_matches, requirement_of
from app.core.errors import ConfigError, SpecError
from app.core.routing import queue_for_requirement, worker_queues
from app.core.settings import MAX_CAPABILITY_QUEUES, load_settings, parse_fake_hardware
from app.core.task_spec import parse_task_spec
from app.worker.capability_queues import chosen_queues, record_entry
from tests.conftest import ROOT

GiB = 1024**3
A100 = {"gpus": [{"name": "NVIDIA A100-SXM4-80GB", "memory_total_bytes": 80 * GiB}], "cpu_count": 16}
T4 = {"gpus": [{"name": "Tesla T4", "memory_total_bytes": 15 * GiB}]}


def echo(**spec: Any) -> dict[str, Any]:
    return {"taskType": "echo", "data": {"n": 1}, **spec}


def hardware(**needs: Any) -> dict[str, Any]:
    return {"resources": {"hardware": needs}}


# -- pure ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("wanted", "name", "match"), [
    ("nvidia-a100-80gb", "NVIDIA A100-SXM4-80GB", True),
    ("NVIDIA-A100-80GB", "NVIDIA A100 80GB PCIe", True),
    ("a100", "NVIDIA A100-SXM4-40GB", True),
    ("nvidia-a100-80gb", "NVIDIA A100-SXM4-40GB", False),
    ("a10", "NVIDIA A100-SXM4-80GB", False),
    ("t4", "Tesla T4", True),
    ("nvidia-tesla-t4", "Tesla T4", True),
    ("nvidia-t4", "NVIDIA A100 80GB PCIe", False),
    ("rtx4090", "NVIDIA GeForce RTX 4090", True),
    ("any", "Tesla T4", True),
    ("ANY", "anything at all", True),
    (None, "Tesla T4", True),
])
def test_gpu_type_is_matched_case_insensitively_against_the_product_name(wanted: str | None, name: str,
                                                                         match: bool) -> None:
    assert gpu_type_matches(wanted, name) is match


def test_queue_names_from_requirements() -> None:
    def queue(**spec: Any) -> str:
        return queue_for_requirement("tasks", requirement_of(parse_task_spec(echo(**spec))))

    assert queue() == "tasks"
    assert queue(tags=["gpu", "a100"]) == "tasks.a100+gpu"  # tags alone: the tag queue, as before
    assert queue(**hardware(memory="1Gi", cpu=1)) == "tasks.need.cpu=1.mem=1Gi"
    assert queue(**hardware(cpu="500m", memory="1.5G")) == "tasks.need.cpu=500m.mem=1500000000"
    assert queue(tags=["x"], **hardware(gpu={"type": "NVIDIA A100 80GB", "memory": "46Gi"})) == \
        "tasks.need.tags=x.gpu=1.gpu_type=nvidia-a100-80gb.gpu_mem=46Gi"
    assert queue(**hardware(gpu={"count": 2, "type": "any"})) == "tasks.need.gpu=2"
    assert queue(**hardware(gpu={"count": 0, "type": "t4"})) == "tasks"  # count 0: no GPU needed


def test_vllm_tensor_parallel_size_is_a_need_for_that_many_gpus() -> None:
    """model.vllm.tensor_parallel_size: N uses N GPUs of one worker: routed like gpu.count N, the
    same from the parsed spec and from a plain Celery call's raw spec."""
    from app.core.capabilities import requirement_of_raw

    def inference(**extra: Any) -> dict[str, Any]:
        return {"taskType": "inference", "model": {"source": {"identifier": "m"}, **extra.pop("model", {})},
                "data": {"type": "list", "items": ["a"]}, **extra}

    for raw, expected in [
        (inference(model={"vllm": {"tensor_parallel_size": 2}}), "tasks.need.gpu=2"),
        (inference(model={"vllm": {"tensor_parallel_size": 4}}, **hardware(gpu={"count": 1, "type": "a100"})),
         "tasks.need.gpu=4.gpu_type=a100"),
        (inference(model={"vllm": {"tensor_parallel_size": 2}}, **hardware(gpu={"count": 8})), "tasks.need.gpu=8"),
        (inference(model={"vllm": {"tensor_parallel_size": 1}}), "tasks"),
        (inference(model={"vllm": {"tensor_parallel_size": 2}}, inference={"backend": "transformers"}), "tasks"),
    ]:
        assert queue_for_requirement("tasks", requirement_of(parse_task_spec(raw))) == expected
        assert queue_for_requirement("tasks", requirement_of_raw(raw)) == expected
    two_gpus = Capabilities.from_hardware({"gpus": [T4["gpus"][0]] * 2}, [])
    needs_four = requirement_of(parse_task_spec(inference(model={"vllm": {"tensor_parallel_size": 4}})))
    assert two_gpus.unmet(needs_four) and not two_gpus.unmet(requirement_of(parse_task_spec(
        inference(model={"vllm": {"tensor_parallel_size": 2}}))))


def test_zero3_needs_a_worker_with_deepspeed_and_stages_1_2_route_anywhere() -> None:
    from app.core.capabilities import requirement_of_raw

    def sft(**training: Any) -> dict[str, Any]:
        return {"taskType": "sft", "model": {"source": {"identifier": "m"}}, "data": {"prompts": ["x"]},
                "training": {"allow_multi_gpu": True, **training}}

    for training, expected in [({"auto_deepspeed_stage": 3}, "tasks.need.features=deepspeed"),
                               ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "tasks.need.features=deepspeed"),
                               ({"auto_deepspeed_stage": 2}, "tasks"), ({}, "tasks")]:
        assert queue_for_requirement("tasks", requirement_of(parse_task_spec(sft(**training)))) == expected
        assert queue_for_requirement("tasks", requirement_of_raw(sft(**training))) == expected


def test_a_raw_spec_waiting_for_references_routes_by_its_sections() -> None:
    """A plain Celery send whose data (or model) a resolver fills in on the worker is typed as its
    task type without them: the engine, tensor parallelism and ZeRO-3 still decide the queue."""
    from app.core.capabilities import requirement_of_raw

    waiting = {"taskType": "inference", "data": "${earlier.result}", "inference": {"backend": "vllm"},
               "model": {"source": {"identifier": "${earlier.model}"}, "vllm": {"tensor_parallel_size": 2}}}
    assert queue_for_requirement("tasks", requirement_of_raw(waiting)) == "tasks.need.gpu=2.features=vllm"
    no_model = {k: v for k, v in waiting.items() if k != "model"}
    assert queue_for_requirement("tasks", requirement_of_raw(no_model)) == "tasks.need.features=vllm"
    training = {"taskType": "ppo", "data": "${earlier.result}", "training": {"auto_deepspeed_stage": 3}}
    assert queue_for_requirement("tasks", requirement_of_raw(training)) == "tasks.need.features=deepspeed"


def test_what_a_worker_lacks_is_said() -> None:
    worker = Capabilities.from_hardware({"cpu_count": 2, "memory_total_bytes": 24 * GiB, **T4}, ["cpu"])
    need = requirement_of(parse_task_spec(echo(tags=["gpu"], **hardware(
        cpu=4, memory="64Gi", gpu={"type": "nvidia-a100-80gb"}))))
    assert worker.unmet(need) == ["tags gpu", "cpu 2 < 4", "memory 24Gi < 64Gi",
                                  "gpus 0 < 1 nvidia-a100-80gb (has: Tesla T4 15Gi)"]
    big = Capabilities(tags=("gpu",), cpu=16, memory_bytes=128 * GiB, gpus=(Gpu("NVIDIA A100 80GB PCIe", 80 * GiB),))
    assert big.fits(need)
    # per-GPU memory and count: two GPUs of at least 40Gi each
    two = requirement_of(parse_task_spec(echo(**hardware(gpu={"count": 2, "memory": "40Gi"}))))
    assert not big.fits(two)
    assert Capabilities(gpus=(Gpu("A100", 80 * GiB), Gpu("A100", 80 * GiB))).fits(two)
    assert not Capabilities(gpus=(Gpu("A100", 80 * GiB), Gpu("T4", 15 * GiB))).fits(two)
    assert not Capabilities().fits(Requirement(features=("vllm",)))  # room for non-hardware capabilities
    assert Capabilities(features=("vllm",)).fits(Requirement(features=("vllm",)))


def test_a_worker_chooses_only_queues_it_can_serve_oldest_first_and_bounded() -> None:
    worker = Capabilities.from_hardware({"cpu_count": 2, "memory_total_bytes": 24 * GiB})
    entries = {}
    for index, gib in enumerate([1, 2, 64, 4]):
        need = Requirement(memory_bytes=gib * GiB)
        entries[queue_for_requirement("tasks", need)] = record_entry(need, f"2026-01-01T00:00:0{index}")
    entries["other.need.mem=1Gi"] = record_entry(Requirement(memory_bytes=GiB), "0")  # another topic
    assert chosen_queues(entries, worker, "tasks", 10) == [
        "tasks.need.mem=1Gi", "tasks.need.mem=2Gi", "tasks.need.mem=4Gi"]
    assert chosen_queues(entries, worker, "tasks", 2) == ["tasks.need.mem=1Gi", "tasks.need.mem=2Gi"]
    # The bound: a worker with the most tags consumes at most about twice today's 65 queues.
    assert len(worker_queues("tasks", list("abcdef"), "w")) + MAX_CAPABILITY_QUEUES <= 2 * 65


def test_routing_fields_cannot_wait_for_a_stage_result() -> None:
    from pipelines.template import parse_pipeline

    document = {"spec": {"stages": [
        {"name": "a", "spec": echo()},
        {"name": "b", "spec": echo(**hardware(memory="${a.result.memory}"))}]}}
    with pytest.raises(SpecError, match="references are not allowed in resources") as caught:
        parse_pipeline(document, env={})
    assert caught.value.field == "spec.stages[1].spec.resources.hardware.memory"


def test_hardware_summary() -> None:
    worker = Capabilities(cpu=16, memory_bytes=int(23.4 * GiB), features=("vllm",),
                          gpus=(Gpu("NVIDIA A100-SXM4-80GB", 80 * GiB), Gpu("NVIDIA A100-SXM4-80GB", 80 * GiB)))
    assert worker.summary() == "16 cpu, 23.4Gi, 2x NVIDIA A100-SXM4-80GB 80Gi, +vllm"


def test_hardware_override_is_checked_at_start_up() -> None:
    assert parse_fake_hardware(json.dumps(A100)) == A100
    assert load_settings({"MESHQ_FAKE_HARDWARE": json.dumps(T4)}).fake_hardware == T4
    for bad, message in [("{", "not JSON"), ("[]", "JSON object"), ('{"gpu": []}', "unknown key 'gpu'"),
                         ('{"cpu_count": 0}', "cpu_count: 0 must be a positive integer"),
                         ('{"gpus": [{"name": "T4"}]}', r"gpus\[0\]: must be")]:
        with pytest.raises(ConfigError, match=message) as caught:
            load_settings({"MESHQ_FAKE_HARDWARE": bad})
        assert caught.value.variable == "MESHQ_FAKE_HARDWARE"
    with pytest.raises(ConfigError) as caught:
        load_settings({"MESHQ_CELERY_CONFIG": "not a module"})
    assert caught.value.variable == "MESHQ_CELERY_CONFIG"


def test_bad_hardware_fields_name_their_path() -> None:
    for spec, field in [(hardware(memory="16 gigs"), "spec.resources.hardware.memory"),
                        (hardware(cpu="lots"), "spec.resources.hardware.cpu"),
                        (hardware(gpu={"type": "--"}), "spec.resources.hardware.gpu.type"),
                        (hardware(gpu={"memory": "big"}), "spec.resources.hardware.gpu.memory")]:
        with pytest.raises(SpecError) as caught:
            parse_task_spec(echo(**spec))
        assert caught.value.field == field


def test_user_celery_settings_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.celery import user_settings

    monkeypatch.syspath_prepend(str(tmp_path))
    base = {"task_routes": ("tasks.router.route_task",), "include": ["tasks", "pipelines.resolver"]}
    (tmp_path / "good_settings.py").write_text(
        "from celery.schedules import crontab\n"
        "task_routes = {'mine.*': {'queue': 'mine'}}\ninclude = ['mytasks']\n"
        "beat_schedule = {'tick': {'task': 'meshq.echo', 'schedule': crontab(minute=0)}}\n_private = 1\n")
    found = user_settings("good_settings", base)
    assert set(found) == {"task_routes", "include", "beat_schedule"}
    assert found["task_routes"] == ({"mine.*": {"queue": "mine"}}, "tasks.router.route_task")
    assert found["include"] == ["tasks", "pipelines.resolver", "mytasks"]
    (tmp_path / "typo_settings.py").write_text("task_rotues = {}\n")
    with pytest.raises(ConfigError, match="typo_settings.task_rotues is not a Celery setting"):
        user_settings("typo_settings", base)
    (tmp_path / "pickle_settings.py").write_text("accept_content = ['json', 'pickle']\n")
    with pytest.raises(ConfigError, match="JSON only"):
        user_settings("pickle_settings", base)
    with pytest.raises(ConfigError, match="cannot import 'no_such_settings'"):
        user_settings("no_such_settings", base)


# -- real workers ---------------------------------------------------------------------------
def active_queues(node_prefix: str) -> list[str]:
    """The queues a worker's Celery consumer really consumes (``celery inspect active_queues``)."""
    from app.celery import app

    replies = app.control.inspect(timeout=5).active_queues() or {}
    return sorted(q["name"] for node, queues in replies.items() if node.startswith(node_prefix)
                  for q in queues)


def test_memory_requirements_route_to_a_worker_that_has_the_memory(worker_factory, redis_client) -> None:
    from app.celery import app
    from tasks.submit import submit_task

    worker_factory(worker_id="local1")
    capabilities = json.loads(redis_client.hget("worker:local1", "capabilities_json"))
    assert capabilities["memory_bytes"] == psutil.virtual_memory().total
    assert capabilities["cpu"] == os.cpu_count() and capabilities["gpus"] == []

    too_big = submit_task(echo(**hardware(memory=f"{psutil.virtual_memory().total // GiB + 1}Gi")))
    assert too_big.queue.startswith("tasks.need.mem=")
    assert len(too_big.warnings) == 1 and "no live worker has what the task needs" in too_big.warnings[0]
    assert "local1: memory" in too_big.warnings[0]

    fits = submit_task(echo(**hardware(memory="1Gi", cpu=1)))
    assert fits.queue == "tasks.need.cpu=1.mem=1Gi" and fits.warnings == []
    assert app.AsyncResult(fits.task_id).get(timeout=60)["worker_id"] == "local1"
    # The worker consumes the queue it can serve, never the other; the big task still waits
    # in its queue, untouched (never taken and handed back).
    consumed = active_queues("meshq-local1@")
    assert "tasks.need.cpu=1.mem=1Gi" in consumed and too_big.queue not in consumed
    assert json.loads(redis_client.hget("worker:local1", "queues_json"))[-1] == "tasks.need.cpu=1.mem=1Gi"
    assert app.AsyncResult(too_big.task_id).state == "PENDING"
    assert redis_client.llen(too_big.queue) == 1


def test_a_gpu_task_waits_on_a_cpu_fleet(worker_factory, redis_client) -> None:
    from app.celery import app
    from tasks.submit import submit_task

    worker_factory(worker_id="cpu1")
    waiting = submit_task(echo(**hardware(gpu={"count": 1})))
    assert waiting.queue == "tasks.need.gpu=1"
    assert "cpu1: gpus 0 < 1 (has: none)" in waiting.warnings[0]
    plain = submit_task(echo())  # the worker is busy with nothing else: it runs this one
    assert app.AsyncResult(plain.task_id).get(timeout=30)["worker_id"] == "cpu1"
    assert app.AsyncResult(waiting.task_id).state == "PENDING" and redis_client.llen(waiting.queue) == 1
    assert waiting.queue not in active_queues("meshq-cpu1@")


def test_fake_a100_takes_the_a100_task_and_the_t4_worker_does_not(worker_factory, redis_client) -> None:
    """A task submitted before any A100 is up waits, then the A100 worker takes it at start-up."""
    from app.celery import app
    from tasks.submit import submit_task

    worker_factory(worker_id="t4", env={"MESHQ_FAKE_HARDWARE": json.dumps(T4)})
    a100_task = submit_task(echo(**hardware(gpu={"count": 1, "type": "nvidia-a100-80gb"})))
    assert "t4: gpus 0 < 1 nvidia-a100-80gb (has: Tesla T4 15Gi)" in a100_task.warnings[0]
    t4_task = submit_task(echo(**hardware(gpu={"count": 1, "type": "nvidia-tesla-t4"})))
    assert t4_task.warnings == []
    assert app.AsyncResult(t4_task.task_id).get(timeout=60)["worker_id"] == "t4"
    assert app.AsyncResult(a100_task.task_id).state == "PENDING"

    worker_factory(worker_id="a100", env={"MESHQ_FAKE_HARDWARE": json.dumps(A100)})
    assert app.AsyncResult(a100_task.task_id).get(timeout=60)["worker_id"] == "a100"
    hardware_json = json.loads(redis_client.hget("worker:a100", "hardware_json"))
    assert hardware_json["fake"] is True and hardware_json["gpus"][0]["name"] == "NVIDIA A100-SXM4-80GB"
    # Any GPU with at least 40Gi: only the A100 has it; a second A100 task goes there too.
    big_memory = submit_task(echo(**hardware(gpu={"type": "any", "memory": "40Gi"})))
    assert app.AsyncResult(big_memory.task_id).get(timeout=60)["worker_id"] == "a100"
    assert a100_task.queue not in active_queues("meshq-t4@")
    listed = subprocess.run([sys.executable, "-m", "cli.main", "workers"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={**os.environ})
    assert listed.returncode == 0, listed.stderr
    line = next(row for row in listed.stdout.splitlines() if row.startswith("a100 "))
    assert line.endswith("1x NVIDIA A100-SXM4-80GB 80Gi") and "16 cpu, " in line


def test_plain_apply_async_and_celery_call_are_routed_by_the_spec(worker_factory, redis_client, redis_url) -> None:
    """Issue 15 item 4: no queue given, the router reads the spec's tags and resources."""
    from app.celery import app
    from tasks import echo as echo_task

    worker_factory(worker_id="plain")
    worker_factory("special", worker_id="tagged")
    worker_factory(worker_id="t4r", env={"MESHQ_FAKE_HARDWARE": json.dumps(T4)})
    for _ in range(3):  # never the untagged worker, however many times
        result = echo_task.apply_async(args=[echo(tags=["special"])])
        assert result.get(timeout=30)["worker_id"] == "tagged"
    assert app.AsyncResult(result.id).queue == "tasks.special"
    result = echo_task.apply_async(args=[echo(**hardware(gpu={"type": "t4"}))])
    assert result.get(timeout=60)["worker_id"] == "t4r"
    with pytest.raises(SpecError) as caught:  # an invalid routing field fails at send time
        echo_task.apply_async(args=[echo(**hardware(memory="16 gigs"))])
    assert caught.value.field == "spec.resources.hardware.memory"

    called = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "app", "call", "meshq.echo",
         "--args", json.dumps([echo(tags=["special"])])],
        cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url}, capture_output=True, text=True, timeout=60)
    assert called.returncode == 0, called.stderr
    task_id = called.stdout.strip().splitlines()[-1]
    assert app.AsyncResult(task_id).get(timeout=30)["worker_id"] == "tagged"


def test_inspect_conf_shows_settings_only_and_a_user_settings_module_applies(
        worker_factory, redis_client, redis_url, tmp_path) -> None:
    from app.celery import app

    (tmp_path / "site_settings.py").write_text(
        "task_annotations = {'meshq.echo': {'rate_limit': '6000/m'}}\n"
        "task_routes = {'meshq.echo': {'queue': 'custom'}}\n")
    env = {"MESHQ_CELERY_CONFIG": "site_settings", "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    worker_factory(worker_id="conf1", extra_args=["-Q", "custom"], env=env)
    conf = app.control.inspect(timeout=5, destination=[
        redis_client.hget("worker:conf1", "node")]).conf() or {}
    (settings,) = conf.values()
    assert settings["task_annotations"] == {"meshq.echo": {"rate_limit": "6000/m"}}
    assert settings["task_routes"] == [{"meshq.echo": {"queue": "custom"}}, "tasks.router.route_task"]
    assert "annotations" not in settings and "get_settings" not in settings
    from celery.app.defaults import DEFAULTS

    # Every name shown is a Celery setting (deprecated_settings is Celery's own attribute).
    assert set(settings) - {"deprecated_settings"} <= set(DEFAULTS)

    # A client with the same settings module sends meshq.echo with no queue: the user's
    # route sends it to "custom", which the worker was told to consume with -Q.
    script = ("from tasks import echo; r = echo.apply_async([{'taskType': 'echo'}]); "
              "print(r.get(timeout=60)['worker_id'], r.queue)")
    sent = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=90,
                          env={**os.environ, "REDIS_URL": redis_url, **env})
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.split() == ["conf1", "custom"]


def test_celery_call_warns_like_meshq_submit_and_refuses_in_one_line(redis_client, redis_url) -> None:
    """``celery call`` of a task with tags no live worker has warns as ``meshq submit`` does; a bad
    routing field is one line naming it, not a traceback, and nothing is sent."""
    def call(spec: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "celery", "-A", "app", "call", "meshq.echo",
                               "--args", json.dumps([spec])], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env={**os.environ, "REDIS_URL": redis_url})

    queue = "tasks.nobody-has-this-tag"
    try:
        called = call(echo(tags=["nobody-has-this-tag"]))
        assert called.returncode == 0, called.stderr
        assert f"no live worker consumes queue {queue!r}; the task waits until one starts" in called.stderr
        assert redis_client.llen(queue) == 1
    finally:
        redis_client.delete(queue)
    bad = call(echo(**hardware(memory="16 gigs")))
    assert bad.returncode != 0
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert lines[0].startswith("Error: spec.resources.hardware.memory: ") and "was not sent" in lines[0]
