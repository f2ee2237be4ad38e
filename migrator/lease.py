"""A batch's lease in the ledger: who runs it, proven by heartbeats.

A batch is claimed in a short transaction of its own (its attempt number moves on), then runs
in another. While it runs, a thread beats for it on a connection of its own, and notices when
the run stops (cancelled, rolled back) or another worker took the batch over; the batch then
stops at its next sub-batch. Its commit holds the run's row and checks the attempt, in the same
transaction as its rows, so the work of a lease that was lost never commits.

A batch whose worker still holds the batch's advisory lock (its session is alive) is left to it:
a second delivery waits, then finds it done. One whose heartbeat stopped for STALE_SECONDS is
stale (the worker died, or is cut off and its session lingers on the server): anyone may take
it over.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import psycopg2
import structlog

from .ledger import HEARTBEAT_SECONDS, STALE_SECONDS, STALE_SQL, BatchSpec, KeyRange
from .options import RunOptions
from .redact import redact_text
from .runstate import Fenced, hold

log = structlog.get_logger("migrator.lease")

# Namespace of the per-batch advisory locks (any constant; the batch id is the second key).
BATCH_LOCK = 0x6D67

CLAIM = f"""
UPDATE migration_batches b SET status = 'running', attempts = b.attempts + 1, started_at = clock_timestamp(),
       heartbeat_at = clock_timestamp(), worker = %(worker)s, error = NULL, keys_walked = 0
FROM migration_runs r
WHERE b.id = %(id)s AND r.id = b.run_id AND r.status = 'running' AND b.status <> 'done'
  AND (%(locked)s OR {STALE_SQL})
RETURNING b.run_id, b.priority, b.range_index, b.range_count, b.range_start, b.range_end, b.node, r.options, r.mapping,
          b.attempts, r.fence
"""


@dataclass(frozen=True)
class Lease:
    batch_id: int
    run_id: str
    attempt: int  # the batch's attempt number when claimed: another claim moves it on
    fence: int  # the run's fence when claimed
    locked: bool  # whether this session holds the batch's advisory lock


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(conn: Any, batch_id: int) -> tuple[BatchSpec, Lease] | None:
    """Take a batch to run it: its spec and lease; None when it is done already. Waits while
    another live worker runs it; raises Fenced when its run is not running."""
    while True:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s, %s)", (BATCH_LOCK, batch_id))
            locked = cur.fetchone()[0]
            cur.execute(CLAIM, {"worker": worker_name(), "locked": locked, "stale": STALE_SECONDS, "id": batch_id})
            row = cur.fetchone()
            if row is None:
                cur.execute("SELECT b.status, r.status FROM migration_batches b JOIN migration_runs r ON r.id = b.run_id"
                            " WHERE b.id = %s", (batch_id,))
                found = cur.fetchone()
        conn.commit()
        if row is not None:
            run_id, priority, index, count, start, end, node, options, mapping, attempt, fence = row
            spec = BatchSpec(batch_id, str(run_id), priority, KeyRange(index, count, int(start), int(end), node),
                             RunOptions.from_json(options), mapping)
            if not locked:
                _end_lost_session(conn, batch_id)
            return spec, Lease(batch_id, str(run_id), attempt, fence, locked)
        if locked:
            release(conn, batch_id)
        if found is None:
            raise LookupError(f"batch {batch_id} is not in the ledger; is DATABASE_URL the run's database?")
        batch_status, run_status = found
        if batch_status == "done":
            return None
        if run_status != "running":
            raise Fenced(f"batch {batch_id} not started: its run is {run_status}")
        time.sleep(min(1.0, HEARTBEAT_SECONDS))  # its worker is alive and at it: wait for it to end


def _end_lost_session(conn: Any, batch_id: int) -> None:
    """A stale batch taken over while its lost worker's session still holds the batch's lock (a
    frozen process, a host cut off: the server has not noticed): end that session, so that its
    open transaction rolls back and lets go of the rows it locked. Without the privilege to,
    the takeover waits for them; the fence refuses that transaction's commit either way."""
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pid, pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                        " AND classid = %s AND objid = %s AND objsubid = 2 AND database = (SELECT oid FROM pg_database"
                        " WHERE datname = current_database())", (BATCH_LOCK, batch_id))
            ended = cur.fetchall()
        conn.commit()
    except psycopg2.Error as exc:
        conn.rollback()
        log.warning("lost_session_not_ended", batch=batch_id, error=redact_text(str(exc).strip()))
        return
    if ended:
        log.warning("lost_session_ended", batch=batch_id, backends=[pid for pid, _ in ended])


def release(conn: Any, batch_id: int) -> None:
    try:
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s, %s)", (BATCH_LOCK, batch_id))
        conn.commit()
    except psycopg2.Error:
        pass  # a lost connection took its session locks with it


def give_back(cur: Any, lease: Lease, reason: str) -> None:
    """A batch stopped before its end (its run was cancelled): pending again, if it is still ours."""
    cur.execute("UPDATE migration_batches SET status = 'pending', heartbeat_at = NULL, error = %s"
                " WHERE id = %s AND attempts = %s AND status = 'running'", (reason, lease.batch_id, lease.attempt))


def still_ours(cur: Any, lease: Lease) -> None:
    """At commit, in the batch's transaction: hold the run's row and check that neither the run
    nor the batch moved on since the claim; raises Fenced otherwise."""
    hold(cur, lease.run_id, lease.fence)
    cur.execute("SELECT attempts FROM migration_batches WHERE id = %s FOR UPDATE", (lease.batch_id,))
    row = cur.fetchone()
    if row is None or row[0] != lease.attempt:
        raise Fenced(f"batch {lease.batch_id} was taken over by another worker (its heartbeat had stopped)")


HEARTBEAT = """
UPDATE migration_batches b SET heartbeat_at = clock_timestamp(), keys_walked = %s FROM migration_runs r
WHERE b.id = %s AND b.attempts = %s AND b.status = 'running' AND r.id = b.run_id
RETURNING r.status, r.fence
"""


class Heartbeat:
    """Beats for one lease on a connection of its own until stopped; `fenced` says why the
    batch should stop (None while all is well)."""

    def __init__(self, connect: Callable[[], Any], lease: Lease) -> None:
        self.connect, self.lease = connect, lease
        self.fenced: str | None = None
        self.walked: Callable[[], int] = lambda: 0  # the batch's keys walked so far, for progress
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{lease.batch_id}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(HEARTBEAT_SECONDS + 5)

    def check(self) -> None:
        """Raise Fenced if the batch should stop (called between sub-batches)."""
        if self.fenced is not None:
            raise Fenced(self.fenced)

    def _beat(self) -> None:
        conn = None
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                if conn is None:
                    conn = self.connect()
                    conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(HEARTBEAT, (self.walked(), self.lease.batch_id, self.lease.attempt))
                    row = cur.fetchone()
            except psycopg2.Error as exc:  # the ledger is unreachable: this batch's commit will tell
                log.warning("heartbeat_failed", batch=self.lease.batch_id, error=redact_text(str(exc).strip()))
                conn = _closed(conn)
                continue
            except Exception as exc:  # (a ConfigError from connect: same)
                log.warning("heartbeat_failed", batch=self.lease.batch_id, error=redact_text(str(exc)))
                conn = _closed(conn)
                continue
            if row is None:
                self.fenced = f"batch {self.lease.batch_id} was taken over by another worker"
            elif row[0] != "running":
                self.fenced = f"its run is {row[0]}"
            elif row[1] != self.lease.fence:
                self.fenced = "its run was stopped and resumed since the batch began"
        _closed(conn)


def _closed(conn: Any) -> None:
    """Close a connection that may be broken; None, for the caller to forget it."""
    if conn is not None:
        try:
            conn.close()
        except psycopg2.Error:
            pass
    return None
