"""``meshq demo``: the main job end to end on a private, throw-away deployment.

Builds the tiny model, starts the embedded Redis, ``meshq serve`` and two
workers with different tags and different ``RESULTS_DIR``s, and submits
``pipelines/examples/lora_then_infer.yaml``: stage ``train`` LoRA-trains the
model on the ``train`` worker and uploads the adapter to the server; stage
``infer`` runs on the ``infer`` worker, which has no access to the trainer's
files and must download the adapter over HTTP. It then prints each prompt with
the trained answer, the base model's output and the adapter's output, and stops
everything it started.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_WORKDIR = ".demo"
PIPELINE_TIMEOUT_S = 240.0


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def tiny_model(workdir: Path) -> Path:
    from cli.tiny_model import build_tiny_model

    model_dir = workdir / "tiny-model"
    if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file():
        say(f"tiny model: {model_dir} (built earlier)")
        return model_dir
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.monotonic()
    build_tiny_model(model_dir, size="test")
    say(f"tiny model: built {model_dir} in {time.monotonic() - started:.1f}s")
    return model_dir


def base_model_outputs(infer_spec: dict[str, Any]) -> dict[str, str]:
    """The same prompts through the base model (no adapter), as a one-stage pipeline."""
    from pipelines import Pipeline

    spec = {key: value for key, value in infer_spec.items() if key != "checkpoint"}
    result = Pipeline.from_dict(spec).submit().wait(timeout=120)
    items = next(iter(result.values()))["items"]
    return {item["prompt"]: item["output"] for item in items}


def run_demo(workdir: str | None = None) -> int:
    started = time.monotonic()
    base = Path(workdir or DEFAULT_WORKDIR).resolve()
    base.mkdir(parents=True, exist_ok=True)
    from cli.local_cluster import LocalCluster

    model_dir = tiny_model(base)
    os.environ["MESHQ_MODEL"] = str(model_dir)
    with LocalCluster(base / "run", redis_url=os.environ.get("REDIS_URL") or None) as cluster:
        url = cluster.start_redis()
        os.environ["REDIS_URL"] = url
        from app.core.settings import reset_settings

        reset_settings()
        say(f"Redis: {url}" + (" (embedded)" if cluster.redis_server else ""))
        server_url = cluster.start_server(results_dir=cluster.workdir / "results-server")
        say(f"orchestrator: meshq serve at {server_url} (results in {cluster.workdir / 'results-server'})")
        workers = {"trainer": "train", "inferer": "infer"}
        processes = {}
        for worker_id, tags in workers.items():
            processes[worker_id] = cluster.start_worker(
                worker_id, tags=tags, results_dir=cluster.workdir / f"results-{worker_id}", wait=False,
                extra_env={"ORCHESTRATOR_BASE_URL": server_url, "HEARTBEAT_INTERVAL_SEC": "5"})
        for worker_id, process in processes.items():
            cluster.wait_worker(worker_id, process)
            say(f"worker {worker_id}: tags [{workers[worker_id]}], RESULTS_DIR "
                f"{cluster.workdir / f'results-{worker_id}'}")

        from pipelines import EXAMPLES_DIR, Pipeline

        example = EXAMPLES_DIR / "lora_then_infer.yaml"
        pipeline = Pipeline.from_yaml(example)
        run = pipeline.submit()
        say(f"submitted {example.name} as pipeline {run.id}")
        for stage in run.stages:
            say(f"  stage {stage['name']}: {stage['taskType']} → queue {stage['queue']} (task {stage['task_id']})")
        report = run.follow(timeout=PIPELINE_TIMEOUT_S, progress=True, stream=sys.stdout)
        if report["state"] != "SUCCESS":
            say(f"pipeline ended {report['state']}: stage {report.get('failed_stage')!r}: {report.get('error')}")
            say(f"logs: {cluster.workdir}")
            return 1
        train = report["stages"]["train"]["result"]
        infer = report["stages"]["infer"]["result"]
        say(f"adapter uploaded by {train['worker_id']}: {train.get('final_lora_archive_url')}")
        inferer_dir = cluster.workdir / "results-inferer"
        fetched = sorted(p.parent for p in inferer_dir.rglob("adapter_config.json"))
        say(f"adapter used by {infer['worker_id']}, which fetched it over HTTP into "
            f"{fetched[0] if fetched else '(nowhere?)'}")
        say(f"the inferer never saw the trainer's files: "
            f"{'yes' if not (inferer_dir / train['task_id']).exists() else 'no'}")

        infer_stage = next(s for s in pipeline.stages if s.name == "infer")
        base_outputs = base_model_outputs(infer_stage.spec)
        answers = _answers(pipeline)
        matched = 0
        print()
        for item in infer["items"]:
            prompt = item["prompt"]
            expected = answers.get(prompt, "")
            ok = item["output"].strip() == expected.strip()
            matched += ok
            print(f"  prompt   {prompt!r}")
            print(f"    trained answer {expected!r}")
            print(f"    base model     {base_outputs.get(prompt, '')!r}")
            print(f"    with adapter   {item['output']!r}  {'✓' if ok else '✗'}")
        print()
        say(f"{matched}/{len(infer['items'])} generations equal the trained answers")
    say(f"done in {time.monotonic() - started:.0f}s; everything started was stopped "
        f"(logs and results under {base / 'run'})")
    return 0 if matched == len(infer["items"]) else 1


def _answers(pipeline: Any) -> dict[str, str]:
    train = next(s for s in pipeline.stages if s.name == "train")
    pairs = train.spec["data"].get("prompts") or []
    return {p["prompt"]: p.get("response", "") for p in pairs if isinstance(p, dict)}
