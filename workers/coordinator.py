"""The coordinator's side of Celery: the broker it sends through, the workers that answer there,
and what it sends them besides a priority's chord (workers/tasks.py): a verification's ranges,
and revocations. workers/executor.py offers all of it to the commands as the Celery executor.

Every step after a priority is sent is driven by the chord callbacks; `resume` and `requeue`
start again from what the ledger says, so losing the coordinator or the broker loses no state.
"""
from __future__ import annotations

import shlex
from typing import Any, Callable, Iterable

from migrator.core.config import ConfigError, Settings, same_redis_db

from celeryconfig import PRIORITY_QUEUES, QUEUE_PREFIX

from .celery import app
from .tasks import apply_keys_task, dispatch_verification, finish_verification_task, queue_for


def use_broker(settings: Settings) -> None:
    """Send to the broker the command line named (--broker-url), not only the environment's,
    once it answers, with the chords' results kept apart from the source: a ConfigError with the
    fix (one line) when the broker is down or refuses the login, or when the result backend is
    the Redis database being migrated."""
    settings.broker().release()
    if same_redis_db(str(app.conf.result_backend), settings.redis_url):
        raise ConfigError("CELERY_RESULT_BACKEND is the Redis database being migrated; its keys would be scanned too. "
                          "Point it at another database number, e.g. redis://host:6379/14")
    app.conf.broker_url = settings.broker_url


def consumers(broker_url: str, timeout: float) -> dict[str, list[str]]:
    """Each worker that answers on the broker within `timeout`, and the queues it consumes."""
    with app.connection_for_write(broker_url) as conn:
        replies = app.control.inspect(timeout=timeout, connection=conn).active_queues() or {}
    return {name: [q.get("name") for q in consumed] for name, consumed in replies.items()}


def worker_command(queues: Iterable[str] = PRIORITY_QUEUES.values()) -> str:
    """How to start a worker for these of this installation's queues. With a queue prefix the
    worker needs it too: its chord callbacks send the next priority to the prefixed queues."""
    prefix = f"MIGRATOR_QUEUE_PREFIX={shlex.quote(QUEUE_PREFIX)} " if QUEUE_PREFIX else ""
    return f"{prefix}celery -A workers worker -Q {','.join(queues)}"


def revoke(task_ids: list[str]) -> int:
    """Revoke queued tasks: the workers drop them when they come (and the run's fence refuses
    any that starts anyway); their count."""
    app.control.revoke(task_ids)
    return len(task_ids)


def verify_on_workers(conn: Any, verification_id: int, run_id: str, priority: str) -> None:
    """Send a planned verification's ranges to the workers (on `priority`'s queue), then finish it there."""
    dispatch_verification(conn, verification_id, run_id, priority,
                          finish_verification_task.s(verification_id=verification_id))


# Seconds `migrator follow` waits for a worker to apply a batch of changed keys before it sends them again.
APPLY_TIMEOUT_S = 120.0


def apply_on_workers(run_id: str) -> Callable[[list[bytes], list[bytes]], dict[str, int]]:
    """How `migrator follow` applies a batch of changed keys on the workers: one `migrator.apply_keys`
    task on the critical queue (changes are what cutover waits for), its outcome awaited."""
    def apply(keys: list[bytes], resets: list[bytes]) -> dict[str, int]:
        sent = apply_keys_task.apply_async((run_id, [k.decode("latin-1") for k in keys],
                                            [k.decode("latin-1") for k in resets]), queue=queue_for("critical"))
        try:
            return sent.get(timeout=APPLY_TIMEOUT_S, disable_sync_subtasks=False)
        finally:
            sent.forget()

    return apply
