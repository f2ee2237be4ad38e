"""Stopping a run that is still running (`migrator cancel`).

The run becomes `cancelling` (its fence moves: no batch of it starts, and none that is running
commits); batches that are running notice at their next sub-batch and stop; once none is left,
or after `wait_s`, the run is `cancelled`. What it committed before stays until `rollback`.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import structlog

from migrator.core import ledger
from migrator.core import runstate
log = structlog.get_logger("migrator.execution.cancel")


def refusal(run_id: str, status: str) -> str:
    """Why a run in `status` cannot be cancelled, and what to run instead."""
    if status == "rolled_back":
        return f"run {run_id} was rolled back already: nothing runs and nothing of it is left"
    if status in ("rolling_back", "rollback_failed"):
        return f"run {run_id} is {status}: nothing runs; see `migrator status {run_id}`"
    return (f"run {run_id} is {status}: nothing of it runs. To undo what it wrote: migrator rollback {run_id}")


def cancel_run(conn: Any, run_id: str, *, wait_s: float = 120.0,
               progress: Callable[[int], None] = lambda live: None) -> int:
    """Cancel a run (see the module); the number of its batches still running when it was
    marked cancelled (0 unless `wait_s` ran out: their work cannot commit anyway)."""
    with conn, conn.cursor() as cur:
        status = ledger.run_status(cur, run_id)
        if status is None:
            raise LookupError(f"no run {run_id} in the ledger; is DATABASE_URL the run's database?")
        if status not in ("planned", "running", "cancelling"):
            raise runstate.NotNow(refusal(run_id, status))
        runstate.transition(cur, run_id, "cancelling", "cancelled by the operator")
    log.warning("run_cancelling", run=run_id)
    deadline = time.monotonic() + wait_s
    while True:
        with conn, conn.cursor() as cur:
            live = ledger.live_batches(cur, run_id)
        progress(live)
        if not live or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    with conn, conn.cursor() as cur:
        runstate.transition(cur, run_id, "cancelled")
    log.warning("run_cancelled", run=run_id, still_running=live)
    return live
