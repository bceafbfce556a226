import pytest

from app.core.errors import ConfigError
from app.core.settings import DEFAULT_REDIS_URL, heartbeat_ttl_s, load_settings, parse_tags


def test_defaults() -> None:
    s = load_settings({})
    assert s.redis_url == DEFAULT_REDIS_URL and not s.redis_url_from_env
    assert s.results_dir == "./results_workers"
    assert s.task_topic == "tasks"
    assert s.heartbeat_interval_s == 30
    assert s.worker_tags == ()
    assert len(s.worker_id) == 12
    assert s.visibility_timeout_s == 100
    assert s.max_upload_bytes == 20 * 1024**3


@pytest.mark.parametrize(("interval", "ttl"), [(1, 120), (30, 120), (30.0, 120), (31, 124), (60, 240)])
def test_heartbeat_ttl(interval: float, ttl: int) -> None:
    assert heartbeat_ttl_s(interval) == ttl


def test_tags_sorted() -> None:
    assert parse_tags("gpu, a100") == ("a100", "gpu")
    assert parse_tags("") == ()


@pytest.mark.parametrize(("env", "variable"), [
    ({"HEARTBEAT_INTERVAL_SEC": "abc"}, "HEARTBEAT_INTERVAL_SEC"),
    ({"HEARTBEAT_INTERVAL_SEC": "0"}, "HEARTBEAT_INTERVAL_SEC"),
    ({"HEARTBEAT_INTERVAL_SEC": "-5"}, "HEARTBEAT_INTERVAL_SEC"),
    ({"HEARTBEAT_INTERVAL_SEC": "nan"}, "HEARTBEAT_INTERVAL_SEC"),
    ({"WORKER_TAGS": "a b"}, "WORKER_TAGS"),
    ({"WORKER_TAGS": "gpu,,cpu"}, "WORKER_TAGS"),
    ({"WORKER_TAGS": "a+b"}, "WORKER_TAGS"),
    ({"WORKER_TAGS": "gpu,gpu"}, "WORKER_TAGS"),
    ({"WORKER_TAGS": "a,b,c,d,e,f,g"}, "WORKER_TAGS"),
    ({"WORKER_ID": "../x"}, "WORKER_ID"),
    ({"TASK_TOPIC": "a.b"}, "TASK_TOPIC"),
    ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    ({"ORCHESTRATOR_BASE_URL": "ftp://x"}, "ORCHESTRATOR_BASE_URL"),
    ({"MESHQ_VISIBILITY_TIMEOUT_S": "1.5"}, "MESHQ_VISIBILITY_TIMEOUT_S"),
    ({"MESHQ_MAX_UPLOAD_BYTES": "0"}, "MESHQ_MAX_UPLOAD_BYTES"),
])
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert info.value.variable == variable
    assert str(info.value).startswith(f"{variable}: ")


def test_six_tags_allowed() -> None:
    assert len(load_settings({"WORKER_TAGS": "a,b,c,d,e,f"}).worker_tags) == 6


def test_token_not_in_repr() -> None:
    s = load_settings({"ORCHESTRATOR_TOKEN": "s3cret-token"})
    assert "s3cret-token" not in repr(s)


def test_a_killed_workers_task_starts_again_within_two_minutes_by_default() -> None:
    """The default visibility timeout and heartbeat bound the recovery of a SIGKILLed
    worker's task (tested with real processes, scaled down, in test_reliability.py)."""
    from app.core.settings import DEFAULT_HEARTBEAT_INTERVAL_S, DEFAULT_VISIBILITY_TIMEOUT_S
    from app.worker.lease import recovery_bound_s

    assert recovery_bound_s(DEFAULT_VISIBILITY_TIMEOUT_S, DEFAULT_HEARTBEAT_INTERVAL_S) <= 120
    # Three heartbeats fit in the timeout: one late beat never hands a running task out.
    assert DEFAULT_VISIBILITY_TIMEOUT_S > 3 * DEFAULT_HEARTBEAT_INTERVAL_S


def test_a_dead_sweepers_lock_delays_redelivery_seconds_not_minutes(redis_url: str) -> None:
    """Kombu sweeps abandoned messages back under a Redis lock that expires after 300 s by
    default: a worker SIGKILLed mid-sweep (seen in a test run) stopped every redelivery for
    five minutes. The broker channel meshq's workers use holds it for seconds only."""
    from app.celery import app
    from app.core.settings import UNACKED_MUTEX_EXPIRE_S

    with app.connection_for_read() as connection:
        channel = connection.default_channel
        assert channel.unacked_mutex_expire == UNACKED_MUTEX_EXPIRE_S <= 10
        assert channel.qos.unacked_mutex_expire == UNACKED_MUTEX_EXPIRE_S
