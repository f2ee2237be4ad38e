"""Planning a run and executing it in this process (`migrator run --local`).

The Celery coordinator plans the same way and sends the same batches to workers; here they
run through the same `migrate_batch` and `after_priority`, a few at once on threads (`--jobs`).
"""
from __future__ import annotations

import contextvars
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable

import redis
import structlog

from . import ledger
from .batch import migrate_batch
from .config import ConfigError
from .errors import TRANSIENT, backoff
from .finalize import after_priority
from .mapping import Mapping, Priority
from .options import RunOptions
from .partition import plan_ranges
from .redact import redact_text, redact_url
from .writer import describe

log = structlog.get_logger("migrator.runner")

RETRIES = 3  # for a batch that lost its connection

def plan_run(client: redis.Redis, conn: Any, mapping: Mapping, opts: RunOptions, redis_url: str) -> str:
    """Create the run and record every (priority, range) batch before anything is executed."""
    run_id = str(uuid.uuid4())
    ranges = plan_ranges(client, opts.ranges)
    if opts.max_keys_per_sec and ranges[0].node:
        raise ConfigError("--max-keys-per-sec is not supported on a Redis Cluster source yet (its bucket needs a "
                          "second database); run without it, or with fewer workers to lower the load")
    server = client.info("server")
    with conn, conn.cursor() as cur:
        ledger.create_run(cur, run_id, mapping.name, opts, redact_url(redis_url), server.get("run_id"))
        ledger.plan_batches(cur, run_id, [p.label for p in opts.priority_order()], ranges)
    log.info("run_planned", run=run_id, ranges=len(ranges), priorities=[p.label for p in opts.priority_order()])
    return run_id


def resume_point(conn: Any, run_id: str) -> tuple[RunOptions, Priority | None]:
    """A run's options and the priority to carry it on from (None: nothing left), marked running again."""
    with conn, conn.cursor() as cur:
        run = ledger.require_run(cur, run_id)
        if run["status"] in ("rolled_back", "rolling_back"):
            raise ConfigError(f"run {run_id} was rolled back; start a new run instead")
        opts = RunOptions.from_json(run["options"])
        label = ledger.first_unvalidated(cur, run_id, [p.label for p in opts.priority_order()])
        if label is None:
            return opts, None
        ledger.set_run_status(cur, run_id, "running")
    log.info("run_resumed", run=run_id, priority=label)
    return opts, Priority.parse(label)


def execute_local(client: redis.Redis, connect: Callable[[], Any], mapping: Mapping, run_id: str,
                  opts: RunOptions, start: Priority | None = None, jobs: int = 1) -> str:
    """Run every planned batch not yet done, priority by priority from `start` (default: the
    first), up to `jobs` batches of a priority at once; returns the run's final status.

    A batch that fails on a lost connection is retried on a new one, with backoff, a bounded
    number of times; any other failure is recorded and left to the priority's validation.
    """
    conn = connect()
    try:
        priority = start or opts.priority_order()[0]
        while priority is not None:
            with conn, conn.cursor() as cur:
                ids = ledger.batch_ids(cur, run_id, priority.label)
            conn = _run_batches(client, conn, connect, mapping, ids, jobs, opts.continue_on_error)
            priority = after_priority(client, conn, mapping, run_id, priority, opts)
        return run_status(conn, run_id)
    finally:
        conn.close()


def _run_batches(client: redis.Redis, conn: Any, connect: Callable[[], Any], mapping: Mapping,
                 ids: list[int], jobs: int, keep_going: bool) -> Any:
    """Run these batches on `jobs` lanes, each a thread with a session of its own (the first
    lane uses `conn`); returns the first lane's session. After a failure no new batch starts
    unless `keep_going`.

    Lanes overlap one batch's reading and transforming (Python, which holds the GIL) with
    another's writes and scans (PostgreSQL and Redis, which do not): one lane leaves a core idle.
    """
    pending = iter(ids)
    take = threading.Lock()
    stop = threading.Event()

    def lane(conn: Any) -> Any:
        while not stop.is_set():
            with take:
                batch_id = next(pending, None)
            if batch_id is None:
                break
            ok, conn = _run_with_retries(client, conn, connect, mapping, batch_id)
            if not ok and not keep_going:
                stop.set()
        return conn

    lanes = min(jobs, len(ids))
    if lanes <= 1:
        return lane(conn)
    others = [_reconnect(connect) for _ in range(lanes - 1)]
    with ThreadPoolExecutor(max_workers=lanes - 1, thread_name_prefix="lane") as pool:
        futures = [pool.submit(contextvars.copy_context().run, lane, c) for c in others]
        try:
            conn = lane(conn)
        finally:
            stop.set()  # should this lane have failed, the others take no new batch either
            wait(futures)
    for future in futures:
        if future.exception() is None:
            future.result().close()
    for future in futures:
        future.result()  # a lane's own failure (its session is gone with it)
    return conn


def _run_with_retries(client: redis.Redis, conn: Any, connect: Callable[[], Any], mapping: Mapping,
                      batch_id: int) -> tuple[bool, Any]:
    for attempt in range(RETRIES + 1):
        try:
            migrate_batch(client, conn, mapping, batch_id)
            return True, conn
        except TRANSIENT as exc:
            if attempt == RETRIES:
                return False, conn
            pause = backoff(attempt)
            log.warning("batch_retry", batch=batch_id, attempt=attempt + 1, pause_s=pause, error=redact_text(describe(exc)))
            time.sleep(pause)
            conn.close()
            conn = _reconnect(connect)
        except Exception:  # recorded in the ledger by migrate_batch; validation decides
            return False, conn
    return False, conn


def _reconnect(connect: Callable[[], Any]) -> Any:
    """A new connection, waiting for the server a bounded while (it may be restarting)."""
    for attempt in range(RETRIES + 1):
        try:
            return connect()
        except TRANSIENT:
            if attempt == RETRIES:
                raise
            time.sleep(backoff(attempt))
    raise AssertionError("unreachable")


def run_status(conn: Any, run_id: str) -> str:
    with conn, conn.cursor() as cur:
        return ledger.require_run(cur, run_id)["status"]
