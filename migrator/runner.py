"""Planning a run and executing it in this process (`migrator run --local`).

The Celery coordinator plans the same way and sends the same batches to workers; here they
run one after another through the same `migrate_batch`.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import redis
import structlog

from . import ledger
from .batch import migrate_batch
from .finalize import finalize_priority
from .mapping import Mapping
from .options import RunOptions
from .partition import KeyRange, ranges_for
from .redact import redact_url
from .rollback import rollback_run

log = structlog.get_logger("migrator.runner")


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    status: str  # completed, dry_run, failed, rolled_back

    @property
    def ok(self) -> bool:
        return self.status in ("completed", "dry_run")


def plan_run(client: redis.Redis, conn: Any, mapping: Mapping, opts: RunOptions, redis_url: str) -> str:
    """Create the run and record every (priority, range) batch before anything is executed."""
    run_id = str(uuid.uuid4())
    ranges = KeyRange.split(ranges_for(client.dbsize(), opts.ranges))
    server = client.info("server")
    with conn, conn.cursor() as cur:
        ledger.create_run(cur, run_id, mapping.name, opts, redact_url(redis_url), server.get("run_id"))
        ledger.plan_batches(cur, run_id, [p.label for p in opts.priority_order()], ranges)
    log.info("run_planned", run=run_id, ranges=len(ranges), priorities=[p.label for p in opts.priority_order()])
    return run_id


def execute_local(client: redis.Redis, conn: Any, mapping: Mapping, run_id: str, opts: RunOptions) -> RunOutcome:
    """Run every planned batch, priority by priority; stop, and roll back unless told not to, on failure."""
    for priority in opts.priority_order():
        with conn, conn.cursor() as cur:
            ids = ledger.batch_ids(cur, run_id, priority.label)
        for batch_id in ids:
            try:
                migrate_batch(client, conn, mapping, batch_id)
            except Exception:  # recorded in the ledger by migrate_batch; the verdict decides
                if not opts.continue_on_error:
                    break
        verdict = finalize_priority(conn, mapping, run_id, priority.label, opts.dry_run)
        log.info("priority_finalized", run=run_id, priority=priority.label, ok=verdict.ok,
                 failed=verdict.failed, dead=verdict.dead, linked=verdict.linked)
        if not verdict.ok and not opts.continue_on_error:
            return _fail(conn, mapping, run_id, opts, f"{verdict.failed} batch(es) of priority {priority.label} failed")
    status = "dry_run" if opts.dry_run else "completed"
    with conn, conn.cursor() as cur:
        ledger.set_run_status(cur, run_id, status)
    return RunOutcome(run_id, status)


def _fail(conn: Any, mapping: Mapping, run_id: str, opts: RunOptions, reason: str) -> RunOutcome:
    with conn, conn.cursor() as cur:
        ledger.set_run_status(cur, run_id, "failed", reason)
    if opts.rollback_on_failure and not opts.dry_run:
        log.warning("run_rolling_back", run=run_id, reason=reason)
        rollback_run(conn, mapping, run_id)
        return RunOutcome(run_id, "rolled_back")
    return RunOutcome(run_id, "failed")
