"""Celery tasks: thin wrappers that hand ids to the engine in `migrator/` (never data).

A priority is two chords: its batches, then `finalize_priority` (link users, plan the
verification), which sends the verification's ranges, then `judge_priority` (the checks, and the
next priority or the end). A batch or range that fails for good raises, so Flower shows it as
FAILURE; Celery then skips the chord's callback, so each callback is also the errback of its
chord and still runs and decides: the ledger, not the task results, says what happened.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import psycopg2
import redis
import structlog
from celery import chord, uuid
from celery.canvas import Signature
from celery.signals import task_postrun, task_prerun

from migrator.core import ledger
from migrator.core import metrics
from migrator.core import registry
from migrator.core import verify
from migrator.core.batch import migrate_batch
from migrator.core.config import Settings
from migrator.core.errors import backoff, transient
from migrator.execution.finalize import Step, begin_verification, halt, judge_priority
from migrator.execution.follow import apply_keys
from migrator.core.source import key_client
from migrator.core.lease import worker_name
from migrator.core.mapping import Mapping, Priority
from migrator.core.registry import MappingError
from migrator.core.options import RunOptions
from migrator.core.redact import redact_text
from migrator.core.runstate import Fenced
from migrator.core.writer import describe

from celeryconfig import PRIORITY_QUEUES

from .celery import app

log = structlog.get_logger("workers.tasks")

PROGRESS_EVERY_S = 1.0


class UnitFailed(Exception):
    """A batch or verification range that failed after its retries: its error is in the ledger too."""


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


def _unit(task: Any, work: Callable[..., Any], unit_id: int, shown: dict[str, Any]) -> dict[str, Any]:
    """Run one batch or verification range with progress for Flower; retried on a lost
    connection, raised as UnitFailed once that is spent or on any other failure."""
    last = [0.0]

    def progress(counts: dict[str, int]) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S:
            last[0] = now
            # Flower shows a task-progress event as the state PROGRESS, and its `result` field on
            # the task's page and in the task list
            summary = ", ".join(f"{n:,} {name}" for name, n in counts.items())
            task.update_state(state="PROGRESS", meta={**shown, **counts})
            task.send_event("task-progress", result=f"{shown.get('priority', '')} {shown['range']}: {summary}",
                            **counts)

    try:
        client, conn = _connections()
        mapping, _ = _run(conn, shown["run_id"])
        result = work(client, conn, mapping, unit_id, progress)
    except MappingError as exc:  # deployed with another mapping than the run's: not this worker's to run
        log.error("mapping_refused", error=str(exc))
        if "batch_id" in shown:
            with conn, conn.cursor() as cur:
                ledger.refuse_batch(cur, unit_id, f"worker {worker_name()}: {exc}")
        raise UnitFailed(str(exc)) from None
    except Fenced as exc:  # its run was cancelled or rolled back, or another worker took it over
        log.warning("unit_fenced", reason=str(exc))
        return {"priority": shown["priority"], "range": shown["range"], "status": f"fenced: {exc}"}
    except Exception as exc:  # recorded in the ledger by the engine
        _drop_connections()
        if transient(exc) and task.request.retries < task.max_retries:
            metrics.RETRIES.labels("batch" if "batch_id" in shown else "verify").inc()
            log.warning("unit_retry", error=redact_text(describe(exc)), attempt=task.request.retries + 1)
            raise task.retry(exc=exc, countdown=backoff(task.request.retries, base=1, cap=30))
        raise UnitFailed(redact_text(describe(exc))) from None
    return {"priority": shown["priority"], "range": shown["range"],
            "status": "already_done" if result is None else "done", **(result or {})}


# Backoff 1, 2, 4 ... 30 s: a minute or so in all, so a short outage of a server is ridden out.
RETRIES = 6


@app.task(bind=True, name="migrator.migrate_batch", max_retries=RETRIES)
def migrate_batch_task(self: Any, batch_id: int, run_id: str, priority: str, range: str) -> dict[str, Any]:
    """Migrate one planned batch: `priority` over cursor range `range` (e.g. 3/8) of run `run_id`."""
    structlog.contextvars.bind_contextvars(run=run_id, priority=priority, batch=batch_id)
    shown = {"priority": priority, "range": range, "batch_id": batch_id, "run_id": run_id}

    def work(client: Any, conn: Any, mapping: Any, unit: int, progress: Any) -> dict[str, int] | None:
        done = migrate_batch(client, conn, mapping, unit, progress, connect=Settings.from_env().postgres)
        if done is None:
            return None
        return {**{f: done.counts.total(f) for f in ("scanned", "migrated", "dead")}, "rows_written": done.rows_written}

    return _unit(self, work, batch_id, shown)


@app.task(bind=True, name="migrator.verify_range", max_retries=RETRIES)
def verify_range_task(self: Any, range_id: int, verification_id: int, run_id: str, priority: str,
                      range: str) -> dict[str, Any]:
    """Verify one cursor range `range` of verification `verification_id` (of run `run_id`)."""
    structlog.contextvars.bind_contextvars(run=run_id, priority=priority, verification=verification_id)
    shown = {"priority": priority, "range": range, "range_id": range_id, "verification_id": verification_id,
             "run_id": run_id}

    def work(client: Any, conn: Any, mapping: Any, unit: int, progress: Any) -> dict[str, int] | None:
        done = verify.verify_range(client, conn, mapping, unit, progress, connect=Settings.from_env().postgres)
        if done is None:
            return None
        return {f: sum(c[f] for c in done["patterns"].values()) for f in ("keys", "compared", "missing", "different")}

    return _unit(self, work, range_id, shown)


def _callback(task: Any, step: Callable[[redis.Redis, Any], Any]) -> Any:
    """A chord callback's work, retried as a whole on a lost connection (or the run would stall);
    None when the run is no longer running (an operator stopped it: nothing follows)."""
    try:
        client, conn = _connections()
        return step(client, conn)
    except Fenced as exc:
        log.warning("callback_fenced", reason=str(exc))
        return None
    except Exception as exc:
        _drop_connections()  # whatever state it left them in is not the next task's
        if not transient(exc):
            raise
        metrics.RETRIES.labels("callback").inc()
        log.warning("callback_retry", error=redact_text(describe(exc)), attempt=task.request.retries + 1)
        raise task.retry(exc=exc, countdown=backoff(task.request.retries, base=1, cap=60))


# Per run, the mapping it was made with, loaded (and its digest checked) once per worker process.
_mappings: dict[str, Mapping] = {}


def _run(conn: Any, run_id: str) -> tuple[Mapping, RunOptions]:
    """A run's mapping (MappingError when this worker's differs from it) and options."""
    with conn, conn.cursor() as cur:
        run = ledger.require_run(cur, run_id)
    if run_id not in _mappings:
        _mappings[run_id] = registry.for_run(run)
    return _mappings[run_id], RunOptions.from_json(run["options"])


def _run_or_halt(conn: Any, run_id: str, priority: Priority) -> tuple[Mapping, RunOptions]:
    """A chord callback's run; one this worker cannot take on (another mapping) halts the run."""
    try:
        return _run(conn, run_id)
    except MappingError as exc:
        halt(conn, run_id, priority, f"worker {worker_name()}: {exc}")  # (raises Fenced: nothing follows)
        raise


def _verified(conn: Any, verification_id: int) -> Mapping:
    with conn, conn.cursor() as cur:
        run_id = str(ledger.get_verification(cur, verification_id)["run_id"])
    return _run(conn, run_id)[0]


@app.task(bind=True, name="migrator.finalize_priority", max_retries=5)
def finalize_priority_task(self: Any, results: Any = None, *, priority: str, run_id: str,
                           dispatch: int | None = None) -> dict[str, Any]:
    """Chord callback (and errback) of a priority's batches: link users, then verify the priority
    (unless these batches were sent again since: `dispatch` is not the run's latest)."""
    structlog.contextvars.bind_contextvars(run=run_id, priority=priority)
    level = Priority.parse(priority)

    def step(client: redis.Redis, conn: Any) -> int | None:
        mapping, opts = _run_or_halt(conn, run_id, level)
        verification = begin_verification(client, conn, mapping, run_id, level, opts, dispatch)
        if verification is None:
            dispatch_priority(conn, run_id, level)  # the source restarted: scan the priority again
        else:
            dispatch_verification(conn, verification, run_id, priority, judge_priority_task.s(
                priority=priority, run_id=run_id, verification_id=verification, dispatch=dispatch))
        return verification

    return {"priority": priority, "run_id": run_id, "verification_id": _callback(self, step)}


@app.task(bind=True, name="migrator.judge_priority", max_retries=5)
def judge_priority_task(self: Any, results: Any = None, *, run_id: str, priority: str,
                        verification_id: int, dispatch: int | None = None) -> dict[str, Any]:
    """Chord callback (and errback) of a priority's verification: judge it, then start the next
    priority, or end the run (rolled back if it failed)."""
    structlog.contextvars.bind_contextvars(run=run_id, priority=priority, verification=verification_id)

    def step(client: redis.Redis, conn: Any) -> Step:
        mapping, opts = _run_or_halt(conn, run_id, Priority.parse(priority))
        done = judge_priority(client, conn, mapping, run_id, Priority.parse(priority), opts, verification_id, dispatch)
        if done.verify_again is not None:
            dispatch_verification(conn, done.verify_again, run_id, priority, judge_priority_task.s(
                priority=priority, run_id=run_id, verification_id=done.verify_again, dispatch=dispatch))
        elif done.next is not None:
            dispatch_priority(conn, run_id, done.next)
        return done

    done = _callback(self, step) or Step()
    return {"priority": priority, "run_id": run_id, "next": done.next.label if done.next else None,
            "verify_again": done.verify_again}


@app.task(bind=True, name="migrator.finish_verification", max_retries=5)
def finish_verification_task(self: Any, results: Any = None, *, verification_id: int) -> dict[str, Any]:
    """Chord callback (and errback) of a verification of its own (`migrator verify`)."""
    structlog.contextvars.bind_contextvars(verification=verification_id)
    result = _callback(self, lambda client, conn: verify.finish(client, conn, _verified(conn, verification_id),
                                                                verification_id))
    return {k: result.get(k) for k in ("verification_id", "verdict", "missing", "different", "extra")}


def _send(header: list[Signature], body: Signature) -> None:
    """One chord whose callback runs whether or not a header task failed (as its errback too)."""
    if not header:
        body.delay()
        return
    body.link_error(body.clone(immutable=True))
    chord(header)(body)
    # The ledger, not the result backend, is how anyone follows a run: stop listening for
    # these results now, or their AsyncResults unsubscribe noisily at interpreter exit.
    consumer = app.backend.result_consumer
    consumer.stop()
    consumer.subscribed_to.clear()


def _shown_range(node: str, index: int, count: int) -> str:
    return f"{node + ' ' if node else ''}{index + 1}/{count}"


def dispatch_priority(conn: Any, run_id: str, priority: Priority) -> int:
    """Send one chord: every unfinished batch of `priority`, then its finalize callback."""
    with conn, conn.cursor() as cur:
        batches = ledger.unfinished_batches(cur, run_id, priority.label)
    queue = queue_for(priority.label)
    # priority and range first: Flower's task list shows the start of the keyword arguments
    header = [migrate_batch_task.si(priority=priority.label, range=_shown_range(node, index, count), batch_id=bid,
                                    run_id=run_id).set(queue=queue, task_id=uuid())
              for bid, node, index, count in batches]
    with conn, conn.cursor() as cur:
        dispatch = ledger.next_dispatch(cur, run_id)
        if header:
            ledger.set_task_ids(cur, [(sig["kwargs"]["batch_id"], sig.id) for sig in header])
    _send(header, finalize_priority_task.s(priority=priority.label, run_id=run_id, dispatch=dispatch).set(queue=queue))
    log.info("priority_dispatched", run=run_id, priority=priority.label, batches=len(header))
    return len(header)


def dispatch_verification(conn: Any, verification_id: int, run_id: str, priority: str, then: Signature) -> int:
    """Send one chord: every unfinished range of a verification, then `then` (on `priority`'s queue)."""
    with conn, conn.cursor() as cur:
        ranges = ledger.unfinished_ranges(cur, verification_id)
    queue = queue_for(priority)
    header = [verify_range_task.si(priority=priority, range=_shown_range(node, index, count), range_id=rid,
                                   verification_id=verification_id, run_id=run_id).set(queue=queue)
              for rid, node, index, count in ranges]
    _send(header, then.set(queue=queue))
    log.info("verification_dispatched", run=run_id, verification=verification_id, ranges=len(header))
    return len(header)


@app.task(name="migrator.apply_keys")
def apply_keys_task(run_id: str, keys: list[str], resets: list[str]) -> dict[str, int]:
    """Apply changed keys of follow session `run_id`, `resets` among them replaced whole (each key's
    bytes as latin-1 text: JSON carries no bytes). Not retried here: a batch that fails goes back to the session's waiting keys, and
    `migrator follow` sends it again."""
    structlog.contextvars.bind_contextvars(run=run_id)
    client, conn = _connections()
    reader = key_client(client)  # on a cluster, the changed keys live on every master
    try:
        return apply_keys(reader, conn, _run(conn, run_id)[0], run_id, [k.encode("latin-1") for k in keys],
                          [k.encode("latin-1") for k in resets])
    except Exception:
        _drop_connections()  # whatever state it left them in is not the next task's
        raise
    finally:
        if reader is not client:
            reader.close()
