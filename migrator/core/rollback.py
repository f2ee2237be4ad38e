"""Compensating rollback: put every table back as it was before a run.

Rows the run inserted are deleted; rows it changed get the prior image the journal trigger
kept (migrator_journal() in migrator/core/sql/001_ledger.sql, on every table a mapping writes); rows it
did not touch stay as they are.
"""
from __future__ import annotations

from typing import Any

import structlog

from migrator.core import ledger
from migrator.core import runstate
from migrator.core.errors import transient
from migrator.core.mapping import Mapping
from migrator.core.redact import redact_text
from migrator.core.schema import journal_refusal, missing_journals, written_tables
from migrator.core.writer import describe

log = structlog.get_logger("migrator.core.rollback")

def rollback_run(conn: Any, mapping: Mapping, run_id: str) -> dict[str, dict[str, int]]:
    """Undo one run in one transaction; returns per table the rows deleted and restored.

    Refused (NotNow) while the run is running: cancel it first. A rollback that fails leaves
    the run `rollback_failed` with the error, and may be run again once its cause is fixed.
    """
    summary: dict[str, dict[str, int]] = {}
    try:
        with conn, conn.cursor() as cur:
            later = ledger.later_writers(cur, run_id)
            if later:  # its prior images are older than theirs: put back, they would undo what those wrote
                raise runstate.NotNow(
                    f"run {run_id} cannot be rolled back before " + ", ".join(f"{other} ({status})" for other, status in later)
                    + ": it changed rows this run wrote. Rollbacks go newest first: "
                    + "; ".join(f"migrator rollback {other}" for other, _ in later) + f"; then migrator rollback {run_id}")
            # (waits for batches committing now: their rows are undone too; later ones are fenced)
            runstate.transition(cur, run_id, "rolling_back")
            missing = missing_journals(cur, written_tables(mapping))
            if missing:
                raise Unjournaled(journal_refusal(mapping, missing))
            cur.execute("SELECT set_config('migrator.run_id', '', true)")  # the undo itself is not journaled
            for table in mapping.table_names():
                deleted, restored = ledger.undo_table(cur, run_id, table)
                summary[table] = {"deleted": deleted, "restored": restored}
            ledger.forget_journal(cur, run_id)
            runstate.transition(cur, run_id, "rolled_back")
    except (runstate.NotNow, LookupError):
        raise
    except Exception as exc:
        if transient(exc):
            raise  # (nothing of it applied: run it again)
        why = f"the rollback failed: {redact_text(describe(exc))}; fix that, then run `migrator rollback {run_id}` again"
        with conn, conn.cursor() as cur:
            if ledger.run_status(cur, run_id) != "rolling_back":
                runstate.transition(cur, run_id, "rolling_back")
            runstate.transition(cur, run_id, "rollback_failed", why)
        log.error("rollback_failed", run=run_id, error=why)
        raise RollbackFailed(why) from None
    log.info("run_rolled_back", run=run_id, tables={t: n for t, n in summary.items() if n["deleted"] or n["restored"]})
    return summary


class RollbackFailed(RuntimeError):
    """The rollback's transaction failed (nothing of it applied); the run says so."""


class Unjournaled(RuntimeError):
    """A table the run wrote has no journal trigger: the rows it changed there would look inserted by
    it, and be deleted."""
