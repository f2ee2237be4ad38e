"""Writing transformed records: upserts per table, a SAVEPOINT per sub-batch, bisection on failure.

A failing sub-batch is split in halves until every good record has committed and each bad
one is isolated as a dead letter with the database's reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg2
import psycopg2.errors
from psycopg2.extras import execute_values

from .mapping import Mapping, Pattern, Row
from .source import KeyRead


# Errors a record can cause. Anything else (a missing table, a lost connection) fails the batch.
RECORD_ERRORS = (psycopg2.DataError, psycopg2.IntegrityError, psycopg2.errors.ProgramLimitExceeded, ValueError)


@dataclass(slots=True)
class Prepared:
    """A source key ready to write: all of its rows commit together or not at all."""

    key: bytes
    key_text: str
    pattern: Pattern
    rows: list[Row]
    expires_at: datetime | None
    read: KeyRead  # kept for the dead letter should the write fail


def describe(exc: BaseException) -> str:
    """The first line of an error, fit for logs: PostgreSQL's detail (row values) is left out."""
    text = (getattr(exc, "pgerror", None) or str(exc)).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def detail(exc: BaseException) -> str | None:
    """PostgreSQL's detail, which may quote row values: kept with the dead letter, never logged."""
    return getattr(getattr(exc, "diag", None), "message_detail", None)


class Writer:
    def __init__(self, cursor: Any, mapping: Mapping, run_id: str | None) -> None:  # None: the app's own writes
        self.cursor = cursor
        self.mapping = mapping
        self.run_id = run_id
        self._statements: dict[tuple[str, tuple[str, ...]], str] = {}
        self._table_order = {name: i for i, name in enumerate(mapping.table_names())}

    def write(self, records: list[Prepared]) -> tuple[int, list[tuple[Prepared, BaseException]]]:
        """Write one sub-batch; returns (rows inserted or changed, [(record, error)] dead)."""
        cur = self.cursor
        cur.execute("SAVEPOINT sub_batch")
        try:
            written = self.upsert(records)
        except RECORD_ERRORS as exc:
            cur.execute("ROLLBACK TO SAVEPOINT sub_batch")
            cur.execute("RELEASE SAVEPOINT sub_batch")
            if len(records) == 1:
                return 0, [(records[0], exc)]
            mid = len(records) // 2
            left_rows, left_dead = self.write(records[:mid])
            right_rows, right_dead = self.write(records[mid:])
            return left_rows + right_rows, left_dead + right_dead
        cur.execute("RELEASE SAVEPOINT sub_batch")
        return written, []

    def upsert(self, records: list[Prepared]) -> int:
        """Upsert every row of these records; returns the rows inserted or changed."""
        # One statement per (table, columns); a row id seen twice goes to a later round,
        # since one upsert statement may not touch the same row twice.
        rounds: list[dict[tuple[str, tuple[str, ...]], dict[str, tuple]]] = []
        for rec in records:
            provenance = {
                "migration_run": self.run_id,
                "source_key": rec.key_text,
                "metadata": rec.pattern.provenance,
                "expires_at": rec.expires_at,
            }
            for row in rec.rows:
                values = {**row.values, **provenance}
                group = (row.table, tuple(values))
                for batch in rounds:
                    bucket = batch.setdefault(group, {})
                    if values["id"] not in bucket:
                        bucket[values["id"]] = tuple(values.values())
                        break
                else:
                    rounds.append({group: {values["id"]: tuple(values.values())}})
        written = 0
        for batch in rounds:
            # A fixed table order and id order keeps concurrent workers from deadlocking.
            for (table, columns), rows in sorted(batch.items(), key=lambda g: (self._table_order[g[0][0]], g[0][1])):
                statement = self._statement(table, columns)
                execute_values(self.cursor, statement, [rows[k] for k in sorted(rows)], page_size=len(rows))
                written += self.cursor.rowcount
        return written

    def _statement(self, table: str, columns: tuple[str, ...]) -> str:
        key = (table, columns)
        if key not in self._statements:
            self._statements[key] = self.mapping.rule(table).upsert(columns).as_string(self.cursor)
        return self._statements[key]
