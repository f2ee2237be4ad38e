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

from migrator.core import ledger
from migrator.core.ledger import HEARTBEAT_SECONDS, BatchSpec
from migrator.core.redact import redact_text
from migrator.core.runstate import Fenced, hold

log = structlog.get_logger("migrator.core.lease")

# Namespace of the per-batch advisory locks (any constant; the batch id is the second key).
BATCH_LOCK = 0x6D67

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
            claimed = ledger.claim_batch(cur, batch_id, worker_name(), locked)
            if claimed is None:
                found = ledger.batch_state(cur, batch_id)
        conn.commit()
        if claimed is not None:
            spec, attempt, fence = claimed
            if not locked:
                _end_lost_session(conn, batch_id)
            return spec, Lease(batch_id, spec.run_id, attempt, fence, locked)
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


def release(conn: Any, unit: int, lock: int = BATCH_LOCK) -> None:
    """Let go of a unit's session lock (a batch's, or with `lock` a verification range's)."""
    try:
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s, %s)", (lock, unit))
        conn.commit()
    except psycopg2.Error:
        pass  # a lost connection took its session locks with it


def give_back(cur: Any, lease: Lease, reason: str) -> None:
    """A batch stopped before its end (its run was cancelled): pending again, if it is still ours."""
    ledger.give_back(cur, lease.batch_id, lease.attempt, reason)


def still_ours(cur: Any, lease: Lease) -> None:
    """At commit, in the batch's transaction: hold the run's row and check that neither the run
    nor the batch moved on since the claim; raises Fenced otherwise."""
    hold(cur, lease.run_id, lease.fence)
    if ledger.lock_attempt(cur, lease.batch_id) != lease.attempt:
        raise Fenced(f"batch {lease.batch_id} was taken over by another worker (its heartbeat had stopped)")


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
                    row = ledger.heartbeat(cur, self.lease.batch_id, self.lease.attempt, self.walked())
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
