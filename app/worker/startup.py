"""What ``celery -A app worker`` does at start-up for meshq, beyond Celery's own options.

* ``LOG_LEVEL`` is the worker's log level unless ``--loglevel`` was given on the command
  line (Celery's own default, WARNING, would hide even "ready");
* the log also goes to ``MESHQ_LOG_FILE`` (default ``worker-<WORKER_ID>.log``, so workers
  started in one directory do not share a file), task loggers included;
* ``RESULTS_DIR`` must be a writable directory: refused at start-up, naming the variable,
  rather than failing each task later.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import Any

import click
from celery import signals
from celery.utils.log import mlevel

from app.core.errors import ConfigError
from app.core.settings import get_settings


def refuse(exc: ConfigError) -> None:
    """Stop the worker before it consumes anything, with the message of a bad variable."""
    print(f"meshq: configuration error: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(2)  # the exit status of every meshq configuration error


def check_results_dir(path: str) -> None:
    """``RESULTS_DIR`` exists (created if missing) and a file can be written in it."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".meshq-write-check-"):
            pass
    except OSError as exc:
        raise ConfigError("RESULTS_DIR", f"{path!r} is not a writable directory: "
                                         f"{exc.strerror or exc}") from None


def loglevel_given_on_command_line() -> bool:
    context = click.get_current_context(silent=True)
    if context is None or "loglevel" not in context.params:
        return True  # not started by ``celery worker``: whoever started it chose the level
    return context.get_parameter_source("loglevel") not in (click.core.ParameterSource.DEFAULT, None)


@signals.worker_init.connect
def apply_worker_settings(sender: Any, **_: Any) -> None:
    settings = get_settings()
    try:
        check_results_dir(settings.results_dir)
    except ConfigError as exc:
        refuse(exc)
    if not loglevel_given_on_command_line():
        sender.loglevel = mlevel(settings.log_level)


def _file_handler(format: str) -> logging.Handler:
    handler = logging.FileHandler(get_settings().log_file)
    handler.setFormatter(logging.Formatter(format))
    return handler


@signals.after_setup_task_logger.connect
def task_log_to_file(logger: logging.Logger, format: str, **_: Any) -> None:
    """Task loggers (``get_task_logger``) do not propagate to the root logger's file."""
    logger.addHandler(_file_handler(format))
