"""Celery tasks: thin wrappers that hand ids to the engine in `migrator/` (never data)."""
from __future__ import annotations

import threading
import time
from typing import Any

import psycopg2
import redis
import structlog
from celery import chord
from celery.signals import task_postrun, task_prerun

from migrator import ledger
from migrator.batch import migrate_batch
from migrator.config import Settings
from migrator.errors import TRANSIENT, backoff
from migrator.finalize import after_priority
from migrator.mapping import Priority
from migrator.options import RunOptions
from migrator.redact import redact_text
from migrator.threadr import THREADR
from migrator.writer import describe

from celeryconfig import PRIORITY_QUEUES

from .celery import app

log = structlog.get_logger("workers.tasks")

PROGRESS_EVERY_S = 1.0


def queue_for(priority: str) -> str:
    return PRIORITY_QUEUES[priority]


@task_prerun.connect
def _bind_log_context(task_id: str | None = None, **_: Any) -> None:
    structlog.contextvars.bind_contextvars(task_id=task_id)


@task_postrun.connect
def _clear_log_context(**_: Any) -> None:
    structlog.contextvars.clear_contextvars()


# The Redis client and PostgreSQL connection of this worker process (of this thread, under a
# threads or gevent pool), shared by every task it runs: a new server backend per batch cost
# tens of milliseconds of start-up and cold caches.
_held = threading.local()


def _connections() -> tuple[redis.Redis, Any]:
    """This worker's connections, opened on first use (in the pool child, after the fork)."""
    conn = getattr(_held, "postgres", None)
    if conn is None or not _alive(conn):
        _drop_connections()
        settings = Settings.from_env()
        client = settings.redis()
        try:
            _held.postgres = settings.postgres()
        except Exception:
            client.close()
            raise
        _held.redis = client
    return _held.redis, _held.postgres


def _alive(conn: Any) -> bool:
    """Whether a held connection still reaches its server (a restart or an idle timeout may
    have ended it since the last task): one round trip, spared a failed batch attempt."""
    if conn.closed:
        return False
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        conn.rollback()
        return True
    except psycopg2.Error:
        return False


def _drop_connections() -> None:
    """Close them after an error: the next task, or the retry, opens new ones."""
    for name in ("postgres", "redis"):
        held = getattr(_held, name, None)
        setattr(_held, name, None)
        if held is not None:
            try:
                held.close()
            except Exception:
                pass  # already gone with its server


@app.task(bind=True, name="migrator.migrate_batch", max_retries=3)
def migrate_batch_task(self: Any, batch_id: int, run_id: str, priority: str, key_range: str) -> dict[str, Any]:
    """Migrate one planned batch (`priority` over cursor range `key_range`, e.g. 3/8) of run `run_id`.

    Never raises once its retries are spent: the failure is in the ledger and the chord's
    callback still runs and decides.
    """
    structlog.contextvars.bind_contextvars(run=run_id, priority=priority, batch=batch_id)
    last = [0.0]

    def progress(counts: dict[str, int]) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S:
            last[0] = now
            meta = {"run_id": run_id, "priority": priority, "range": key_range, **counts}
            self.update_state(state="PROGRESS", meta=meta)
            self.send_event("task-progress", **meta)  # what Flower shows as progress

    try:
        client, conn = _connections()
        result = migrate_batch(client, conn, THREADR, batch_id, progress)
    except TRANSIENT as exc:
        _drop_connections()
        if self.request.retries < self.max_retries:
            log.warning("batch_retry", error=redact_text(describe(exc)), attempt=self.request.retries + 1)
            raise self.retry(exc=exc, countdown=backoff(self.request.retries, base=1, cap=30))
        return {"batch_id": batch_id, "status": "failed", "error": redact_text(describe(exc))}
    except Exception as exc:  # recorded in the ledger by migrate_batch
        _drop_connections()
        return {"batch_id": batch_id, "status": "failed", "error": redact_text(describe(exc))}
    if result is None:
        return {"batch_id": batch_id, "status": "already_done"}
    return {"batch_id": batch_id, "status": "done", "rows_written": result.rows_written, "checksum": result.checksum}


@app.task(bind=True, name="migrator.finalize_priority", max_retries=5)
def finalize_priority_task(self: Any, results: list[dict[str, Any]], run_id: str, priority: str) -> dict[str, Any]:
    """Chord callback: validate the priority, then start the next one or roll the run back."""
    structlog.contextvars.bind_contextvars(run=run_id, priority=priority)
    try:
        following = _after_priority(run_id, Priority.parse(priority))
    except TRANSIENT as exc:  # a connection lost anywhere in here: the whole callback again, or the run would stall
        _drop_connections()
        log.warning("finalize_retry", error=redact_text(describe(exc)), attempt=self.request.retries + 1)
        raise self.retry(exc=exc, countdown=backoff(self.request.retries, base=1, cap=60))
    except Exception:
        _drop_connections()  # whatever state it left them in is not the next task's
        raise
    return {"run_id": run_id, "priority": priority, "next": following.label if following else None}


def _after_priority(run_id: str, priority: Priority) -> Priority | None:
    client, conn = _connections()
    with conn, conn.cursor() as cur:
        run = ledger.require_run(cur, run_id)
    opts = RunOptions.from_json(run["options"])
    following = after_priority(client, conn, THREADR, run_id, priority, opts)
    if following is not None:
        dispatch_priority(conn, run_id, following)
    return following


def dispatch_priority(conn: Any, run_id: str, priority: Priority) -> int:
    """Send one chord: every unfinished batch of `priority`, then its finalize callback."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT id, node, range_index, range_count FROM migration_batches WHERE run_id = %s AND priority = %s"
                    " AND status <> 'done' ORDER BY node, range_index", (run_id, priority.label))
        batches = cur.fetchall()
    queue = queue_for(priority.label)
    body = finalize_priority_task.s(run_id, priority.label).set(queue=queue)
    header = [migrate_batch_task.si(bid, run_id, priority.label, f"{node + ' ' if node else ''}{index + 1}/{count}")
              .set(queue=queue) for bid, node, index, count in batches]
    chord(header)(body) if header else body.delay([])
    # The ledger, not the result backend, is how anyone follows a run: stop listening for
    # these results now, or their AsyncResults unsubscribe noisily at interpreter exit.
    consumer = app.backend.result_consumer
    consumer.stop()
    consumer.subscribed_to.clear()
    log.info("priority_dispatched", run=run_id, priority=priority.label, batches=len(header))
    return len(header)
