"""Planning a run and executing it in this process (`migrator run --local`).

The Celery coordinator plans the same way and sends the same batches to workers; here they
run one after another through the same `migrate_batch` and `after_priority`.
"""
from __future__ import annotations

import uuid
from typing import Any

import redis
import structlog

from . import ledger
from .batch import migrate_batch
from .finalize import after_priority
from .mapping import Mapping
from .options import RunOptions
from .partition import plan_ranges
from .redact import redact_url

log = structlog.get_logger("migrator.runner")

def plan_run(client: redis.Redis, conn: Any, mapping: Mapping, opts: RunOptions, redis_url: str) -> str:
    """Create the run and record every (priority, range) batch before anything is executed."""
    run_id = str(uuid.uuid4())
    ranges = plan_ranges(client, opts.ranges)
    server = client.info("server")
    with conn, conn.cursor() as cur:
        ledger.create_run(cur, run_id, mapping.name, opts, redact_url(redis_url), server.get("run_id"))
        ledger.plan_batches(cur, run_id, [p.label for p in opts.priority_order()], ranges)
    log.info("run_planned", run=run_id, ranges=len(ranges), priorities=[p.label for p in opts.priority_order()])
    return run_id


def execute_local(client: redis.Redis, conn: Any, mapping: Mapping, run_id: str, opts: RunOptions) -> str:
    """Run every planned batch, priority by priority; returns the run's final status."""
    priority = opts.priority_order()[0]
    while priority is not None:
        with conn, conn.cursor() as cur:
            ids = ledger.batch_ids(cur, run_id, priority.label)
        for batch_id in ids:
            try:
                migrate_batch(client, conn, mapping, batch_id)
            except Exception:  # recorded in the ledger by migrate_batch; validation decides
                if not opts.continue_on_error:
                    break
        priority = after_priority(client, conn, mapping, run_id, priority, opts)
    return run_status(conn, run_id)


def run_status(conn: Any, run_id: str) -> str:
    with conn, conn.cursor() as cur:
        return ledger.require_run(cur, run_id)["status"]
