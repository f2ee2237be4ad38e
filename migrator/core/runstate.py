"""A run's one state machine in the ledger, and the fence that keeps a run's work from
committing once the run is no longer running.

    planned -> running -> completed | dry_run | failed
    running -> cancelling -> cancelled           (`migrator cancel`)
    running -> rolling_back -> rolled_back        (a priority that did not validate)
    completed | failed | cancelled -> rolling_back (`migrator rollback`)
    rolling_back -> rollback_failed -> rolling_back (a rollback that failed, run again)
    failed | cancelled | completed -> running      (`migrator resume` / `requeue`)

Every change of state that leaves or re-enters `running` moves the run's fence. A batch takes
the fence when it starts and holds the run's row (FOR SHARE) when it commits, in the same
transaction as its rows: a cancel or a rollback either waits for that commit (and then undoes
it) or has happened, and the batch's work is rolled back instead.
"""
from __future__ import annotations

from typing import Any

from migrator.core import ledger
from migrator.core.config import ConfigError

# States a run stays in until someone acts (resume, requeue, rollback).
TERMINAL = ("completed", "dry_run", "failed", "cancelled", "rolled_back", "rollback_failed")

# States after which nothing of the run reads its spool again (migrator/core/spool.py): it is dropped.
# A failed or cancelled run keeps it for `resume` and `requeue`; a completed one resumed SCANs again.
SPOOL_DROPPED = ("completed", "dry_run", "rolled_back")

TRANSITIONS: dict[str, tuple[str, ...]] = {
    "planned": ("running", "cancelling", "failed"),
    "running": ("completed", "dry_run", "failed", "cancelling", "rolling_back"),
    "cancelling": ("cancelled", "cancelling"),  # (again: a cancel whose process died mid-way)
    "cancelled": ("running", "rolling_back"),
    "failed": ("running", "rolling_back"),
    "completed": ("running", "rolling_back"),
    "dry_run": ("rolling_back",),
    # (again: a rollback whose process died mid-way left its transaction undone)
    "rolling_back": ("rolled_back", "rollback_failed", "rolling_back"),
    "rollback_failed": ("rolling_back",),
    "rolled_back": (),
}


class Fenced(RuntimeError):
    """Work for a run that is no longer running (cancelled, rolled back, failed), or for a batch
    another worker has taken over: refused, and rolled back."""


class NotNow(ConfigError):
    """An operator's command the run's state does not allow; the message says what to run instead."""


def transition(cur: Any, run_id: str, to: str, error: str | None = None) -> str:
    """Move the run to `to` (locking its row until the transaction ends); its previous state.

    Raises NotNow when the state machine does not allow it. `error` is kept (None keeps the
    one there; entering `running` clears it).
    """
    now = ledger.lock_run(cur, run_id)
    if now is None:
        raise LookupError(f"no run {run_id} in the ledger; is DATABASE_URL the run's database?")
    if to not in TRANSITIONS[now]:
        raise NotNow(f"run {run_id} is {now}: it cannot become {to}")
    ledger.set_run_status(cur, run_id, to, fence_moves=(now == "running") != (to == "running"), error=error,
                          ends=to in TERMINAL)
    if to in SPOOL_DROPPED:
        ledger.drop_spool(cur, run_id)
    return now


def hold(cur: Any, run_id: str, fence: int | None = None) -> int:
    """Hold the run's row until the transaction ends, so its state cannot change before this
    transaction's writes commit; raises Fenced unless it is running (under `fence`, if given).
    Returns the fence."""
    row = ledger.hold_run(cur, run_id)
    if row is None:
        raise Fenced(f"run {run_id} is no longer in the ledger")
    status, now = row
    if status != "running":
        raise Fenced(f"run {run_id} is {status}")
    if fence is not None and now != fence:
        raise Fenced(f"run {run_id} was stopped and resumed since this work began")
    return now
