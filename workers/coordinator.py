"""The coordinator: plan a run in the ledger, then hand its first priority to the workers.

Every later step is driven by the chord callbacks; `resume` and `requeue` start again from
what the ledger says, so losing the coordinator or the broker loses no state.
"""
from __future__ import annotations

import shlex
from typing import Any, Iterable
from urllib.parse import urlsplit

import structlog

from migrator.config import ConfigError, Settings
from migrator.mapping import Mapping
from migrator.options import RunOptions
from migrator.runner import plan_run, requeue as reopen, resume_point

from celeryconfig import PRIORITY_QUEUES, QUEUE_PREFIX

from .celery import app
from .tasks import dispatch_priority, dispatch_verification, finish_verification_task

log = structlog.get_logger("workers.coordinator")


def same_redis_db(a: str, b: str) -> bool:
    """Whether two URLs name the same database of the same Redis server."""
    pa, pb = urlsplit(a), urlsplit(b)
    db = lambda p: (p.path or "/0").strip("/") or "0"
    return pa.scheme.startswith("redis") and pb.scheme.startswith("redis") and \
        (pa.hostname, pa.port or 6379, db(pa)) == (pb.hostname, pb.port or 6379, db(pb))


def use_broker(settings: Settings) -> None:
    """Send to the broker the command line named (--broker-url), not only the environment's,
    once it answers: a ConfigError with the fix (one line) when it is down or refuses the login."""
    settings.broker().release()
    app.conf.broker_url = settings.broker_url


def workers_answering(timeout: float = 2.0) -> list[str]:
    """Names of the workers that answer on the broker and consume at least one of this
    installation's queues (MIGRATOR_QUEUE_PREFIX): workers of another prefix would never take
    our batches."""
    ours = set(PRIORITY_QUEUES.values())
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    return sorted(name for name, consumed in replies.items() if any(q.get("name") in ours for q in consumed))


def worker_command(queues: Iterable[str] = PRIORITY_QUEUES.values()) -> str:
    """How to start a worker for these of this installation's queues. With a queue prefix the
    worker needs it too: its chord callbacks send the next priority to the prefixed queues."""
    prefix = f"MIGRATOR_QUEUE_PREFIX={shlex.quote(QUEUE_PREFIX)} " if QUEUE_PREFIX else ""
    return f"{prefix}celery -A workers worker -Q {','.join(queues)}"


def start_run(settings: Settings, client: Any, conn: Any, mapping: Mapping, opts: RunOptions,
              spec: str | None = None) -> str:
    """Plan the run in the ledger (with how its mapping is named: `spec`, see migrator/registry.py),
    then send its first priority to the workers."""
    if same_redis_db(str(app.conf.result_backend), settings.redis_url):
        raise ConfigError("CELERY_RESULT_BACKEND is the Redis database being migrated; its keys would be scanned too. "
                          "Point it at another database number, e.g. redis://host:6379/14")
    run_id = plan_run(client, conn, mapping, opts, settings.redis_url, spec)
    dispatch_priority(conn, run_id, opts.priority_order()[0])
    return run_id


def resume(conn: Any, run_id: str) -> str | None:
    """Carry a run on from the ledger: re-send the first priority that has not validated."""
    _, priority = resume_point(conn, run_id)
    if priority is None:
        return None
    dispatch_priority(conn, run_id, priority)
    return priority.label


def requeue(conn: Any, run_id: str, batch_ids: list[int] | None = None) -> list[tuple[int, str]]:
    """Put batches (the given ones, or every failed one) back to pending and carry the run on."""
    reopened = reopen(conn, run_id, batch_ids)
    if reopened:
        resume(conn, run_id)
    return reopened



def revoke(task_ids: list[str]) -> int:
    """Revoke queued tasks: the workers drop them when they come (and the run's fence refuses
    any that starts anyway); their count."""
    app.control.revoke(task_ids)
    return len(task_ids)


def verify_on_workers(conn: Any, verification_id: int, run_id: str, priority: str) -> None:
    """Send a planned verification's ranges to the workers (on `priority`'s queue), then finish it there."""
    dispatch_verification(conn, verification_id, run_id, priority,
                          finish_verification_task.s(verification_id=verification_id))
