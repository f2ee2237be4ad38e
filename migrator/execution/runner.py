"""Planning a run, putting its batches back (requeue) and finding where it carries on, whatever
executes it; and executing it here, without Celery (`migrator run --local`).

The Celery executor sends the same batches to workers; here they run through the same
`migrate_batch`, `verify_range` and `judge_priority`, a few at once in lane processes forked from
this one (`--jobs`).
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import redis
import structlog

from migrator.core import ledger
from migrator.core import metrics
from migrator.core import registry
from migrator.core import runstate
from migrator.core import verify
from migrator.core.batch import collect_less, migrate_batch
from migrator.core.config import ConfigError
from migrator.core.errors import backoff, reconnect, transient
from migrator.execution.finalize import begin_verification, judge_priority
from migrator.core.mapping import Mapping, Priority
from migrator.core.options import RunOptions
from migrator.core.partition import plan_ranges
from migrator.core.redact import redact_text, redact_url
from migrator.core.runstate import Fenced
from migrator.core.source import keyspace_size, redisjson_refusal
from migrator.core.validate import Check
from migrator.core.writer import describe

log = structlog.get_logger("migrator.execution.runner")

# For a batch that lost its connection: backoff 0.5, 1, 2 ... 16 s, about half a minute in all,
# so a server restart or a short outage is ridden out.
RETRIES = 6


def plan_run(client: redis.Redis, conn: Any, mapping: Mapping, opts: RunOptions, redis_url: str,
             spec: str | None = None) -> str:
    """Create the run and record every (priority, range) batch before anything is executed.
    `spec`: how the mapping was named (registry.load), for workers and later commands to load
    it the same way; default its own name (an installed mapping's)."""
    opts.check_scope(mapping)
    refusal = redisjson_refusal(client, [p for prio in opts.priority_order() for p in opts.scope(mapping, prio)])
    if refusal:
        raise ConfigError(refusal)
    run_id = str(uuid.uuid4())
    ranges = plan_ranges(client, opts.ranges)
    if opts.max_keys_per_sec and ranges[0].node:
        raise ConfigError("--max-keys-per-sec is not supported on a Redis Cluster source yet (its bucket needs a "
                          "second database); run without it, or with fewer workers to lower the load")
    server = client.info("server")
    with conn, conn.cursor() as cur:
        ledger.create_run(cur, run_id, mapping.name, opts, redact_url(redis_url), server.get("run_id"),
                          spec or mapping.name, registry.digest(mapping))
        ledger.plan_batches(cur, run_id, [p.label for p in opts.priority_order()], ranges)
        ledger.record_keys_planned(cur, run_id, keyspace_size(client))
    log.info("run_planned", run=run_id, ranges=len(ranges), priorities=[p.label for p in opts.priority_order()])
    return run_id


def resume_point(conn: Any, run_id: str) -> tuple[RunOptions, Priority | None]:
    """A run's options and the priority to carry it on from (None: nothing left), marked running
    again (under a new fence: work of its earlier life never commits)."""
    with conn, conn.cursor() as cur:
        run = ledger.require_run(cur, run_id)
        if run["status"] in ("rolled_back", "rolling_back", "rollback_failed"):
            raise runstate.NotNow(f"run {run_id} is {run['status']}; start a new run instead")
        if run["status"] == "cancelling":
            raise runstate.NotNow(f"run {run_id} is being cancelled; once `migrator cancel {run_id}` is done, resume it")
        opts = RunOptions.from_json(run["options"])
        label = ledger.first_unvalidated(cur, run_id, [p.label for p in opts.priority_order()])
        if label is None:
            return opts, None
        if run["status"] != "running":
            runstate.transition(cur, run_id, "running")
    log.info("run_resumed", run=run_id, priority=label)
    return opts, Priority.parse(label)


# What a priority whose batches were put back must do before the run can complete.
REQUEUED = Check("requeued", False, "batches requeued by hand")


def requeue(conn: Any, run_id: str, batch_ids: list[int] | None = None) -> list[tuple[int, str]]:
    """Put batches back to pending (the given ones, or every failed or stale one), each of their
    priorities to validate again, in one transaction; (batch id, priority) of each. `resume_point`
    then says where the run carries on."""
    with conn, conn.cursor() as cur:
        reopened = ledger.reopen_batches(cur, run_id, batch_ids)
        for priority in sorted({p for _, p in reopened}):
            ledger.record_validation(cur, run_id, priority, False, [REQUEUED.to_json()])
    return reopened


def execute_local(client: redis.Redis, connect: Callable[[], Any], mapping: Mapping, run_id: str,
                  opts: RunOptions, start: Priority | None = None, jobs: int = 1) -> str:
    """Run every planned batch not yet done, priority by priority from `start` (default: the
    first), up to `jobs` batches of a priority at once, each priority then verified and judged;
    returns the run's final status.

    With `jobs` 1 the batches run in this process; with more, each in one of `jobs` lane
    processes forked from it (each with its own PostgreSQL session), so that their Python work
    runs on as many cores: in threads it would share one interpreter lock.
    A batch that fails on a lost connection is retried on a new one, with backoff, a bounded
    number of times; any other failure is recorded and left to the priority's validation.
    """
    collect_less()  # before the lanes fork: they inherit it
    conn = connect()
    lanes: Lanes | None = None
    finished = False
    try:
        lanes = Lanes(client, connect, mapping, jobs) if jobs > 1 else None
        priority = start or opts.priority_order()[0]
        try:
            while priority is not None:
                with conn, conn.cursor() as cur:
                    ids = [batch for batch, *_ in ledger.unfinished_batches(cur, run_id, priority.label)]
                conn = _run_all(lanes, client, conn, connect, mapping, "batch", ids, opts.continue_on_error)
                verification = begin_verification(client, conn, mapping, run_id, priority, opts)
                if verification is None:
                    continue  # the source restarted: the priority is scanned again
                while verification is not None:
                    conn = _verify_all(lanes, client, conn, connect, mapping, verification)
                    step = judge_priority(client, conn, mapping, run_id, priority, opts, verification)
                    verification = step.verify_again
                priority = step.next
        except Fenced as exc:  # cancelled or stopped meanwhile: the ledger says how it stands
            log.warning("run_stopped", run=run_id, reason=str(exc))
        finished = True
        return run_status(conn, run_id)
    finally:
        conn.close()
        if lanes is not None:
            lanes.close(wait=finished)  # on an error or Ctrl-C, batches still running are not waited for


def verify_local(client: redis.Redis, connect: Callable[[], Any], mapping: Mapping, run_id: str,
                 priorities: list[Priority], jobs: int = 1, max_keys_per_sec: int | None = None) -> dict[str, Any]:
    """Verify a run's `priorities` here, `jobs` ranges at once; the verification's result
    (`max_keys_per_sec`: its own cap on Redis, 0 none; default the run's)."""
    conn = connect()
    lanes: Lanes | None = None
    try:
        verification_id = verify.plan_verification(client, conn, run_id, priorities, max_keys_per_sec=max_keys_per_sec)
        lanes = Lanes(client, connect, mapping, jobs) if jobs > 1 else None
        conn = _verify_all(lanes, client, conn, connect, mapping, verification_id)
        return verify.finish(client, conn, mapping, verification_id)
    finally:
        conn.close()
        if lanes is not None:
            lanes.close()


def _verify_all(lanes: "Lanes | None", client: redis.Redis, conn: Any, connect: Callable[[], Any], mapping: Mapping,
                verification_id: int) -> Any:
    with conn, conn.cursor() as cur:
        ids = [unit for unit, *_ in ledger.unfinished_ranges(cur, verification_id)]
    return _run_all(lanes, client, conn, connect, mapping, "verify", ids, keep_going=True)


def _run_all(lanes: "Lanes | None", client: redis.Redis, conn: Any, connect: Callable[[], Any], mapping: Mapping,
             kind: str, ids: list[int], keep_going: bool) -> Any:
    """Run units of work (batches or verification ranges) by id; the session to go on with."""
    if lanes is not None:
        lanes.run(kind, ids, keep_going)
        return conn
    for unit in ids:
        ok, conn = _run_with_retries(client, conn, connect, mapping, kind, unit)
        if not ok and not keep_going:
            break
    return conn


class LaneDied(RuntimeError):
    """A lane process ended in the middle of a batch (killed, or out of memory)."""


class Lanes:
    """`jobs` forked processes that each run one batch at a time on a session of their own.

    Batches are handed out one by one as lanes come free, so after a failure no new batch
    starts unless `keep_going` (the ones already running finish).
    """

    def __init__(self, client: redis.Redis, connect: Callable[[], Any], mapping: Mapping, jobs: int) -> None:
        # fork: the lanes inherit the mapping and the connection factory as they are (neither
        # needs to pickle), and a Redis client's pool starts afresh in a new process by itself
        self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork"),
                                        initializer=_lane_start, initargs=(client, connect, mapping))
        self.jobs = jobs
        try:
            with _foreign_after_fork_hooks_held():
                self.pool.submit(int).result()  # forks every lane now (a session it cannot open fails here)
        except BrokenProcessPool as exc:
            self.pool.shutdown(wait=False)
            raise LaneDied(f"the {jobs} lane processes could not start (the error above says why); "
                           "--jobs 1 runs the batches in this process") from exc

    def run(self, kind: str, ids: list[int], keep_going: bool) -> None:
        pending, running, failed = iter(ids), set(), False
        try:
            while True:
                while len(running) < self.jobs and (keep_going or not failed):
                    unit = next(pending, None)
                    if unit is None:
                        break
                    running.add(self.pool.submit(_lane_work, kind, unit))
                if not running:
                    return
                done, running = wait(running, return_when=FIRST_COMPLETED)
                failed = failed or not all(future.result() for future in done)
        except BrokenProcessPool as exc:
            raise LaneDied("a batch process died mid-batch (killed, or out of memory); what its batch "
                           "wrote is rolled back: carry the run on with `migrator resume RUN_ID --local`") from exc

    def close(self, wait: bool = True) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=True)


@contextmanager
def _foreign_after_fork_hooks_held() -> Iterator[None]:
    """Fork without running the after-fork hooks other libraries registered in this process.

    multiprocessing runs them in every child it forks; kombu's close the broker connections
    they find, and a socket the child shares with its parent then closes for the parent too.
    The lanes never use what those hooks clean up. multiprocessing's own hooks still run.
    """
    registry = multiprocessing.util._afterfork_registry  # no public way to skip a hook
    held = {key: obj for key, obj in registry.items()  # key: (order, id of obj, hook)
            if not getattr(key[2], "__module__", "").startswith("multiprocessing")}
    for key in held:
        del registry[key]
    try:
        yield
    finally:
        registry.update(held)


_lane: dict[str, Any] = {}  # in a lane process: its client, connection factory, mapping and session


def _lane_start(client: redis.Redis, connect: Callable[[], Any], mapping: Mapping) -> None:
    # Ctrl-C is the parent's to handle; a lane whose parent is gone (killed) ends at once,
    # abandoning its batch (rolled back, and run again by `migrator resume`)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_end_with, args=(os.getppid(),), daemon=True, name="orphan-watch").start()
    _lane.update(client=client, connect=connect, mapping=mapping, conn=reconnect(connect, RETRIES))
    # closed as the process ends, so the server sees a goodbye rather than a dropped connection
    multiprocessing.util.Finalize(None, lambda: _lane["conn"].close(), exitpriority=10)


def _end_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


def _lane_work(kind: str, unit: int) -> bool:
    ok, _lane["conn"] = _run_with_retries(_lane["client"], _lane["conn"], _lane["connect"], _lane["mapping"],
                                          kind, unit)
    return ok


def _work(kind: str, client: redis.Redis, conn: Any, connect: Callable[[], Any], mapping: Mapping, unit: int) -> None:
    """The unit of work a lane or this process runs, by kind: a batch, or a verification range."""
    if kind == "batch":
        migrate_batch(client, conn, mapping, unit, connect=connect)
    else:
        verify.verify_range(client, conn, mapping, unit, connect=connect)


def _run_with_retries(client: redis.Redis, conn: Any, connect: Callable[[], Any], mapping: Mapping,
                      kind: str, unit: int) -> tuple[bool, Any]:
    for attempt in range(RETRIES + 1):
        try:
            _work(kind, client, conn, connect, mapping, unit)
            return True, conn
        except Fenced:  # the run was stopped: no further batch of it starts
            return False, conn
        except Exception as exc:
            if not transient(exc) or attempt == RETRIES:
                return False, conn  # recorded in the ledger by migrate_batch; validation decides
            pause = backoff(attempt)
            metrics.RETRIES.labels(kind).inc()
            log.warning(f"{kind}_retry", **{kind: unit}, attempt=attempt + 1, pause_s=pause, error=redact_text(describe(exc)))
            time.sleep(pause)
            conn.close()
            conn = reconnect(connect, RETRIES)
    return False, conn


def run_status(conn: Any, run_id: str) -> str:
    with conn, conn.cursor() as cur:
        return ledger.require_run(cur, run_id)["status"]
