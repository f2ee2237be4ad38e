"""structlog set-up: JSON lines in production (or when not on a terminal), PII masked in every field."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import structlog

from migrator.core.redact import redact_text

# Fields that are ids and counts, never PII: left as they are.
SAFE_FIELDS = frozenset({"event", "level", "timestamp", "run", "priority", "batch", "task_id", "logger"})


def _mask(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for k, v in event.items():
        if k not in SAFE_FIELDS and isinstance(v, str):
            event[k] = redact_text(v)
    return event


def configure(json: bool | None = None, level: str | None = None, stream: TextIO | None = None) -> None:
    """`json` defaults to MIGRATOR_LOG_JSON, else to JSON whenever stderr is not a terminal."""
    stream = stream or sys.stderr
    if json is None:
        env = os.environ.get("MIGRATOR_LOG_JSON")
        json = env.lower() in ("1", "true", "yes") if env else not stream.isatty()
    level_no = logging.getLevelName((level or os.environ.get("MIGRATOR_LOG_LEVEL", "INFO")).upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _mask,
            structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def route_stdlib_logging(level: str | None = None, stream: TextIO | None = None) -> None:
    """Send the standard library's logging (Celery's own lines) through the same JSON renderer."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=structlog.processors.JSONRenderer(),
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
                           structlog.processors.TimeStamper(fmt="iso", utc=True), _mask],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("MIGRATOR_LOG_LEVEL", "INFO")).upper())


class _FileSink:
    """Writes every event, as a JSON line, to a run's log file, then passes it on unchanged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "a", encoding="utf-8")

    def __call__(self, _: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        self.file.write(json.dumps(event, default=str) + "\n")
        self.file.flush()
        return event


def attach_log_file(path: Path, only: bool = False) -> Path:
    """Also write every log line (masked, JSON) to `path`, e.g. migration_<run>.log; with `only`, to
    `path` alone: a terminal showing the run's progress is not written over by log lines."""
    processors = [p for p in structlog.get_config()["processors"] if not isinstance(p, _FileSink)]
    if only:
        structlog.configure(processors=[*processors[:-1], structlog.processors.JSONRenderer()],
                            logger_factory=structlog.PrintLoggerFactory(file=open(path, "a", encoding="utf-8")))
    else:
        structlog.configure(processors=[*processors[:-1], _FileSink(path), processors[-1]])
    return path
