"""One merge rule per target table, and the upsert it becomes.

The batch writer and the dual-write paths share these rules, so a backfill running while the
app writes never overwrites a newer value: counters only grow (GREATEST), documents keep the
newer `version` column, lookup columns are filled by whichever source knows them (COALESCE).
An upsert that would change nothing does not touch the row, so reruns leave tables identical.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from psycopg2 import sql

# Provenance and bookkeeping: refreshed when a row changes, never a reason to change it
# (a grant written under its ip and its email key would otherwise flip its source each run).
VOLATILE = frozenset({"id", "migration_run", "source_key", "metadata", "expires_at"})


@dataclass(frozen=True)
class TableRule:
    name: str
    greatest: tuple[str, ...] = ()  # counters within their period
    coalesce: tuple[str, ...] = ()  # lookups filled from more than one key
    version: str | None = None  # the document's own updated time

    def merged(self, column: str) -> sql.Composable:
        col, new = sql.SQL("t.") + sql.Identifier(column), sql.SQL("EXCLUDED.") + sql.Identifier(column)
        if column in self.greatest:
            return sql.SQL("GREATEST({}, {})").format(col, new)
        if column in self.coalesce:
            return sql.SQL("COALESCE({}, {})").format(new, col)
        return new

    def upsert(self, columns: Sequence[str], types: Mapping[str, tuple[str, str]]) -> sql.Composed:
        """INSERT ... ON CONFLICT (id) DO UPDATE of rows given as one JSON array ($1) of arrays,
        each holding the values of `columns` in that order; `types` gives each column's type name
        and category, from the catalog (see Writer).

        Positional arrays cost PostgreSQL a third of what objects through jsonb_populate_recordset
        did to parse (no key per value to sort and look up), and each value still goes through its
        type's input function from text, as populate_record's did.
        """
        content = [c for c in columns if c not in VOLATILE]
        updates = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(c), self.merged(c)) for c in columns if c != "id"
        )
        changed = sql.SQL("({}) IS DISTINCT FROM ({})").format(
            sql.SQL(", ").join(sql.SQL("t.") + sql.Identifier(c) for c in content),
            sql.SQL(", ").join(self.merged(c) for c in content),
        )
        guard = changed
        if self.version and self.version in columns:
            v = sql.Identifier(self.version)
            guard = sql.SQL("(t.{} IS NULL OR EXCLUDED.{} >= t.{}) AND ").format(v, v, v) + changed
        return sql.SQL(
            "INSERT INTO {table} AS t ({cols}) SELECT {values} FROM jsonb_array_elements($1::jsonb) AS r"
            " ON CONFLICT (id) DO UPDATE SET {updates} WHERE {guard}"
        ).format(
            table=sql.Identifier(self.name),
            cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
            values=sql.SQL(", ").join(_element(i, c, types[c], self.name) for i, c in enumerate(columns)),
            updates=updates,
            guard=guard,
        )


def _element(index: int, column: str, column_type: tuple[str, str], table: str) -> sql.Composable:
    """Element `index` of row `r` as a value of the column's type; a JSON null is SQL NULL, as
    jsonb_populate_record had it, json and jsonb columns included."""
    type_name, category = column_type  # format_type() and typcategory from the catalog
    if type_name in ("jsonb", "json"):
        return sql.SQL("NULLIF(r -> {}, 'null')::{}").format(sql.Literal(index), sql.SQL(type_name))
    if category in ("A", "C"):  # a JSON array or object: populate_record's own conversion
        return sql.SQL("(jsonb_populate_record(NULL::{t}, jsonb_build_object({c}, r -> {i}))).{col}").format(
            t=sql.Identifier(table), c=sql.Literal(column), i=sql.Literal(index), col=sql.Identifier(column))
    # type_name is catalog text, quoted where it needs to be
    return sql.SQL("(r ->> {})::{}").format(sql.Literal(index), sql.SQL(type_name))
