"""Configuration from the environment (DESIGN §2), validated in one place.

Defaults live here, with units in their names. Every bad value raises
``ConfigError`` naming the variable, so ``celery -A app worker`` fails at start-up
instead of misbehaving later.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app.core.errors import ConfigError
from app.core.limits import MAX_MESSAGE_BYTES, MAX_RESULT_BYTES
from app.core.redis_address import MASTER_VARIABLE, is_sentinel_url, parse_sentinel_url

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_RESULTS_DIR = "./results_workers"
DEFAULT_TASK_TOPIC = "tasks"
DEFAULT_HEARTBEAT_INTERVAL_S = 30.0
MIN_HEARTBEAT_TTL_S = 120
DEFAULT_LOG_LEVEL = "INFO"
DEFAULT_LOG_FILE = "worker-{worker_id}.log"  # one file per worker, also when several share a directory
# A running task keeps its message invisible (app.worker.invisibility), so the timeout
# only bounds how long a dead worker's task waits: with 30 s heartbeats, 100 s is more
# than three missed beats, and a killed worker's task starts again in under 2 minutes.
DEFAULT_VISIBILITY_TIMEOUT_S = 100
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024**3
# A running task with no step, batch or progress report for this long has its pool
# process killed and runs again (app.worker.watchdog); 0 turns the watchdog off.
DEFAULT_STUCK_TASK_S = 3600
# Task merging: a starting inference task takes waiting ones of the same model and settings
# (tasks.merging) for up to this long; 0 turns merging off.
DEFAULT_MERGE_WINDOW_MS = 20
DEFAULT_MERGE_MAX_PROMPTS = 256
# Artifact uploads/downloads: retries after the first attempt, first backoff (doubles each time).
DEFAULT_UPLOAD_RETRIES = 10  # with the 1 s backoff: about 5 minutes of retries (an ordinary server restart)
DEFAULT_UPLOAD_BACKOFF_S = 1.0
MAX_WORKER_TAGS = 6  # 2**6 - 1 = 63 tag-subset queues per worker
# Capability queues (docs/ROUTING.md) a worker consumes at most: with 6 tags, 65 + 64 queues.
MAX_CAPABILITY_QUEUES = 64

TAG_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}\Z")
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Settings:
    redis_url: str
    redis_url_from_env: bool
    results_dir: str
    task_topic: str
    heartbeat_interval_s: float
    worker_id: str
    worker_tags: tuple[str, ...]
    log_level: str
    log_file: str
    orchestrator_base_url: str
    orchestrator_token: str = field(repr=False)  # never printed
    visibility_timeout_s: int
    max_upload_bytes: int
    cost_per_hour: float
    upload_retries: int = DEFAULT_UPLOAD_RETRIES
    upload_backoff_s: float = DEFAULT_UPLOAD_BACKOFF_S
    # Test-only: replaces parts of the hardware probe (a "80 GB A100" on a CPU machine).
    fake_hardware: dict[str, Any] | None = None
    # A module of extra Celery settings applied after app.celeryconfig (MESHQ_CELERY_CONFIG).
    celery_config_module: str = ""
    stuck_task_s: int = DEFAULT_STUCK_TASK_S
    # Task merging (tasks.merging): how long a starting inference task looks for tasks to
    # run with it (0: off), and the most prompts one merged generation holds.
    merge_window_ms: int = DEFAULT_MERGE_WINDOW_MS
    merge_max_prompts: int = DEFAULT_MERGE_MAX_PROMPTS
    # Directories (besides RESULTS_DIR) a spec may read local datasets and checkpoints from
    # (MESHQ_DATA_DIRS, os.pathsep-separated: a shared-storage mount, a datasets folder).
    data_dirs: tuple[str, ...] = ()
    # May a spec's trust_remote_code run a model's own Python code on this worker? (off)
    allow_remote_code: bool = False
    # app.core.limits: a message, a pipeline's stages together, a resolved spec (MESHQ_MAX_MESSAGE_BYTES);
    # a result stored in the backend (MESHQ_MAX_RESULT_BYTES; a bigger one is kept as a file).
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_result_bytes: int = MAX_RESULT_BYTES
    # The master's name the sentinels know, when REDIS_URL is a sentinel:// address (MESHQ_REDIS_MASTER).
    redis_master: str = ""

    @property
    def uses_sentinel(self) -> bool:
        return is_sentinel_url(self.redis_url)
    # How many ranks a training task with allow_multi_gpu runs on a CPU worker (MESHQ_CPU_RANKS).
    cpu_ranks: int = 1

    @property
    def heartbeat_ttl_s(self) -> int:
        return heartbeat_ttl_s(self.heartbeat_interval_s)


# Kombu's Redis transport sweeps abandoned messages back under a Redis lock
# (``unacked_mutex``) whose expiry defaults to 300 s: a worker SIGKILLed while it holds
# the lock stops every redelivery in the fleet for five minutes. A sweep holds it for
# milliseconds, and a second sweeper cannot restore a message twice (kombu restores in
# a transaction that watches the unacked hash), so a short expiry is safe.
UNACKED_MUTEX_EXPIRE_S = 5


def unacked_restore_interval_s(visibility_timeout_s: int) -> int:
    """How often a worker's consumer hands back abandoned messages (kombu's
    ``unacked_restore_interval``): a quarter of the timeout, between 1 and 10 s."""
    return min(10, max(1, visibility_timeout_s // 4))


def heartbeat_ttl_s(interval_s: float) -> int:
    """TTL of ``worker:<id>:hb``: ``max(4 * interval, 120)`` seconds."""
    return max(int(round(4 * interval_s)), MIN_HEARTBEAT_TTL_S)


def parse_tags(raw: str, variable: str = "WORKER_TAGS") -> tuple[str, ...]:
    """Comma-separated tags → sorted tuple; bad, duplicate or too many tags raise."""
    tags = [t.strip() for t in raw.split(",")] if raw.strip() else []
    for tag in tags:
        if not TAG_RE.match(tag):
            raise ConfigError(variable, f"tag {tag!r} is not 1-32 characters of [A-Za-z0-9_-]")
    if len(set(tags)) != len(tags):
        raise ConfigError(variable, f"duplicate tag in {raw!r}")
    if len(tags) > MAX_WORKER_TAGS:
        raise ConfigError(variable, f"{len(tags)} tags given, at most {MAX_WORKER_TAGS} allowed")
    return tuple(sorted(tags))


def _positive_float(env: Mapping[str, str], variable: str, default: float) -> float:
    raw = env.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(variable, f"{raw!r} is not a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ConfigError(variable, f"{raw!r} must be a positive number")
    return value


def _int_at_least(env: Mapping[str, str], variable: str, default: int, minimum: int) -> int:
    raw = env.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(variable, f"{raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(variable, f"{raw!r} must be a positive integer" if minimum == 1
                          else f"{raw!r} must be an integer of at least {minimum}")
    return value


def _positive_int(env: Mapping[str, str], variable: str, default: int) -> int:
    return _int_at_least(env, variable, default, 1)


def _non_negative_int(env: Mapping[str, str], variable: str, default: int) -> int:
    return _int_at_least(env, variable, default, 0)


FAKE_HARDWARE_KEYS = ("cpu_count", "memory_total_bytes", "gpus")
MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


def parse_fake_hardware(raw: str, variable: str = "MESHQ_FAKE_HARDWARE") -> dict[str, Any] | None:
    """``{"cpu_count": 16, "memory_total_bytes": N, "gpus": [{"name": ..., "memory_total_bytes": N}]}``
    (any subset of the keys) replacing those parts of the probe; for tests only."""
    if not raw.strip():
        return None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(variable, f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(variable, "must be a JSON object")
    for key, value in data.items():
        if key not in FAKE_HARDWARE_KEYS:
            raise ConfigError(variable, f"unknown key {key!r} (expected {', '.join(FAKE_HARDWARE_KEYS)})")
        if key != "gpus" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(variable, f"{key}: {value!r} must be a positive integer")
    gpus = data.get("gpus", [])
    if not isinstance(gpus, list):
        raise ConfigError(variable, "gpus: must be a list")
    for index, gpu in enumerate(gpus):
        if (not isinstance(gpu, dict) or set(gpu) != {"name", "memory_total_bytes"}
                or not isinstance(gpu["name"], str) or not gpu["name"].strip()
                or not isinstance(gpu["memory_total_bytes"], int) or gpu["memory_total_bytes"] < 1):
            raise ConfigError(variable, f"gpus[{index}]: must be {{\"name\": <product name>, "
                                        "\"memory_total_bytes\": <positive integer>}")
    return data


def _flag(env: Mapping[str, str], variable: str) -> bool:
    raw = env.get(variable, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(variable, f"{raw!r} is not a yes/no value (1/0, true/false, yes/no, on/off)")


def parse_data_dirs(raw: str, variable: str = "MESHQ_DATA_DIRS") -> tuple[str, ...]:
    """``os.pathsep``-separated absolute directories → a tuple (relative ones are refused:
    what they name would depend on the worker's working directory)."""
    dirs = [part.strip() for part in raw.split(os.pathsep) if part.strip()]
    for directory in dirs:
        if not os.path.isabs(os.path.expanduser(directory)):
            raise ConfigError(variable, f"{directory!r} is not an absolute path")
    return tuple(dirs)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every meshq variable; raises ``ConfigError``."""
    env = os.environ if env is None else env
    redis_url = env.get("REDIS_URL", "").strip()
    if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")) \
            and not is_sentinel_url(redis_url):
        raise ConfigError("REDIS_URL", f"{redis_url!r} is not a redis://, rediss://, unix:// or sentinel:// URL")
    redis_master = env.get(MASTER_VARIABLE, "").strip()
    if is_sentinel_url(redis_url):
        parse_sentinel_url(redis_url)
        if not redis_master:
            raise ConfigError(MASTER_VARIABLE, "REDIS_URL is a sentinel:// address: set the name the sentinels "
                                               "know the master by (like mymaster)")
        if not NAME_RE.match(redis_master):
            raise ConfigError(MASTER_VARIABLE, f"{redis_master!r} is not 1-64 characters of [A-Za-z0-9_-]")

    topic = env.get("TASK_TOPIC", "").strip() or DEFAULT_TASK_TOPIC
    if not NAME_RE.match(topic):
        raise ConfigError("TASK_TOPIC", f"{topic!r} is not 1-64 characters of [A-Za-z0-9_-]")

    worker_id = env.get("WORKER_ID", "").strip() or secrets.token_hex(6)
    if not NAME_RE.match(worker_id):
        raise ConfigError("WORKER_ID", f"{worker_id!r} is not 1-64 characters of [A-Za-z0-9_-]")

    log_level = (env.get("LOG_LEVEL", "").strip() or DEFAULT_LOG_LEVEL).upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError("LOG_LEVEL", f"{log_level!r} is not one of {', '.join(LOG_LEVELS)}")

    base_url = env.get("ORCHESTRATOR_BASE_URL", "").strip().rstrip("/")
    if base_url and not base_url.startswith(("http://", "https://")):
        raise ConfigError("ORCHESTRATOR_BASE_URL", f"{base_url!r} is not an http(s) URL")

    cost_raw = env.get("WORKER_COST_PER_HOUR", "").strip()
    try:
        cost = float(cost_raw) if cost_raw else 0.0
    except ValueError:
        raise ConfigError("WORKER_COST_PER_HOUR", f"{cost_raw!r} is not a number") from None

    celery_config = env.get("MESHQ_CELERY_CONFIG", "").strip()
    if celery_config and not MODULE_RE.match(celery_config):
        raise ConfigError("MESHQ_CELERY_CONFIG", f"{celery_config!r} is not a Python module name "
                                                 "(like mysite.celery_settings)")

    return Settings(
        redis_url=redis_url or DEFAULT_REDIS_URL,
        redis_url_from_env=bool(redis_url),
        results_dir=env.get("RESULTS_DIR", "").strip() or DEFAULT_RESULTS_DIR,
        task_topic=topic,
        heartbeat_interval_s=_positive_float(env, "HEARTBEAT_INTERVAL_SEC", DEFAULT_HEARTBEAT_INTERVAL_S),
        worker_id=worker_id,
        worker_tags=parse_tags(env.get("WORKER_TAGS", "")),
        log_level=log_level,
        log_file=env.get("MESHQ_LOG_FILE", "").strip() or DEFAULT_LOG_FILE.format(worker_id=worker_id),
        orchestrator_base_url=base_url,
        orchestrator_token=env.get("ORCHESTRATOR_TOKEN", "").strip(),
        visibility_timeout_s=_positive_int(env, "MESHQ_VISIBILITY_TIMEOUT_S", DEFAULT_VISIBILITY_TIMEOUT_S),
        max_upload_bytes=_positive_int(env, "MESHQ_MAX_UPLOAD_BYTES", DEFAULT_MAX_UPLOAD_BYTES),
        cost_per_hour=cost,
        upload_retries=_non_negative_int(env, "MESHQ_UPLOAD_RETRIES", DEFAULT_UPLOAD_RETRIES),
        upload_backoff_s=_positive_float(env, "MESHQ_UPLOAD_BACKOFF_S", DEFAULT_UPLOAD_BACKOFF_S),
        fake_hardware=parse_fake_hardware(env.get("MESHQ_FAKE_HARDWARE", "")),
        celery_config_module=celery_config,
        stuck_task_s=_non_negative_int(env, "MESHQ_STUCK_TASK_S", DEFAULT_STUCK_TASK_S),
        merge_window_ms=_non_negative_int(env, "MESHQ_MERGE_WINDOW_MS", DEFAULT_MERGE_WINDOW_MS),
        merge_max_prompts=_positive_int(env, "MESHQ_MERGE_MAX_PROMPTS", DEFAULT_MERGE_MAX_PROMPTS),
        data_dirs=parse_data_dirs(env.get("MESHQ_DATA_DIRS", "")),
        allow_remote_code=_flag(env, "MESHQ_ALLOW_REMOTE_CODE"),
        max_message_bytes=_positive_int(env, "MESHQ_MAX_MESSAGE_BYTES", MAX_MESSAGE_BYTES),
        max_result_bytes=_positive_int(env, "MESHQ_MAX_RESULT_BYTES", MAX_RESULT_BYTES),
        redis_master=redis_master if is_sentinel_url(redis_url) else "",
        cpu_ranks=_positive_int(env, "MESHQ_CPU_RANKS", 1),
    )


_current: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, read once.

    A random ``WORKER_ID`` is written back to the environment so pool children
    and re-forked processes agree with the parent on the worker's identity.
    """
    global _current
    if _current is None:
        _current = load_settings()
        os.environ.setdefault("WORKER_ID", _current.worker_id)
    return _current


def reset_settings() -> None:
    """Forget the cached settings (tests and the CLI change the environment)."""
    global _current
    _current = None
