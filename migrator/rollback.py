"""Compensating rollback: put every table back as it was before a run.

Rows the run inserted are deleted; rows it changed get the prior image the journal trigger
kept (sql/001_ledger.sql); rows it did not touch stay as they are.
"""
from __future__ import annotations

from typing import Any

from psycopg2 import sql

from . import ledger
from .mapping import Mapping

DELETE_INSERTED = sql.SQL(
    "DELETE FROM {t} WHERE migration_run = %(run)s AND NOT EXISTS"
    " (SELECT 1 FROM migration_journal j WHERE j.run_id = %(run)s AND j.table_name = %(name)s AND j.row_id = {t}.id)"
)
DELETE_CHANGED = sql.SQL(
    "DELETE FROM {t} USING migration_journal j"
    " WHERE j.run_id = %(run)s AND j.table_name = %(name)s AND j.row_id = {t}.id"
)
RESTORE_CHANGED = sql.SQL(
    "INSERT INTO {t} SELECT (jsonb_populate_record(NULL::{t}, j.old_row)).*"
    " FROM migration_journal j WHERE j.run_id = %(run)s AND j.table_name = %(name)s"
)


def rollback_run(conn: Any, mapping: Mapping, run_id: str) -> dict[str, dict[str, int]]:
    """Undo one run in one transaction; returns per table the rows deleted and restored."""
    summary: dict[str, dict[str, int]] = {}
    with conn, conn.cursor() as cur:
        ledger.set_run_status(cur, run_id, "rolling_back")
        cur.execute("SELECT set_config('migrator.run_id', '', true)")  # the undo itself is not journaled
        for table in mapping.table_names():
            params = {"run": run_id, "name": table}
            t = sql.Identifier(table)
            cur.execute(DELETE_INSERTED.format(t=t), params)
            deleted = cur.rowcount
            cur.execute(DELETE_CHANGED.format(t=t), params)
            cur.execute(RESTORE_CHANGED.format(t=t), params)
            summary[table] = {"deleted": deleted, "restored": cur.rowcount}
        cur.execute("DELETE FROM migration_journal WHERE run_id = %s", (run_id,))
        ledger.set_run_status(cur, run_id, "rolled_back")
    return summary
