"""The row seal: a run's validation without reading Redis again.

Every row a bulk batch writes carries `row_seal`, a 64-bit digest of what the batch sent for it
(`row_seal` below), and the batch records, per table and pattern's provenance, how many rows it
wrote and the sum of their seals modulo 2^64 (`Figures`, migration_batches.seals). PostgreSQL keeps
a row's seal only while the row is as that write left it: the upsert keeps the sent seal only for a
row that ends as it was sent (merge.TableRule.sealed), and a trigger takes it away from a row that any
other write changes (migrator/core/sql/018_row_seal.sql). So when a table's rows of a priority's
patterns are as many as its batches wrote, none without a seal, and their seals add up to what the
batches' do, the rows are what the batches wrote (`check`), and the priority's validation need not
read every key again: a mismatch is no verdict, only the reason to (migrator/execution/finalize.py).

A sum, not an exclusive or: a row two keys give (a premium grant under its ip and its email key)
counts twice in the batches' figures and once in the table, and mismatches rather than cancelling.
"""
from __future__ import annotations

from hashlib import sha1
from typing import Any, Iterable

from psycopg2 import sql

from migrator.core import ledger
from migrator.core.mapping import Mapping, Pattern
from migrator.core.merge import LEGACY_KEY

MODULUS = 2**64


def seal_start(header: bytes) -> Any:
    """The digest of a row_seal's `header`, to be copied for each row (writer.Form keeps one)."""
    return sha1(header)


def row_seal(started: Any, sealed: bytes) -> int:
    """The seal of a row as a bulk batch sends it, a signed 64-bit int: a digest of its header (its table
    and the columns of `sealed`: writer.Form; `started`, from seal_start, has digested it: copying it
    costs less per row than digesting it again, and a large row is not copied to be put after it)
    and `sealed`, the bytes of the part of the row's line it
    is of (writer.Writer.documents): its values but the linked ones (the link step fills those later),
    its key, its pattern's provenance and its value's digest. Not its run (a re-run writing the same
    value must seal it the same), nor its expiry (a PTTL read a moment later moves it, and a write
    leaves the row alone for it). SHA-1's first 8 bytes: against accidents, not adversaries (the
    trigger, not the digest, is what catches a row changed after its write), and with the CPU's SHA
    instructions cheaper than blake2b over the demo's rows (2.05 against 2.4 µs a row, measured);
    zlib.crc32 twice from different starts would not do: the two differ by what the length alone
    decides, 32 bits in all."""
    digest = started.copy()
    digest.update(sealed)
    return int.from_bytes(digest.digest()[:8], "big", signed=True)


class Figures:
    """Per table and provenance: rows written, and the sum of their seals modulo 2^64."""

    def __init__(self, kept: dict[str, dict[str, list[int]]] | None = None) -> None:
        self.tables: dict[str, dict[str, list[int]]] = kept if kept is not None else {}

    def add_rows(self, provenance: str, seals: list[tuple[str, int]]) -> None:
        """The rows of one record: (table, seal) of each (writer.Prepared.seals)."""
        for table, seal in seals:
            figure = self.tables.setdefault(table, {}).setdefault(provenance, [0, 0])
            figure[0] += 1
            figure[1] = (figure[1] + seal) % MODULUS

    def merge(self, other: "Figures") -> None:
        for table, figures in other.tables.items():
            for provenance, (rows, total) in figures.items():
                figure = self.tables.setdefault(table, {}).setdefault(provenance, [0, 0])
                figure[0] += rows
                figure[1] = (figure[1] + total) % MODULUS

    def to_json(self) -> dict[str, dict[str, list[int]]]:
        return self.tables


# (grouped by the provenance's place in the list, an integer: one comparison per row where the table's
# own writers come first, and no sort of jsonb; rows of a provenance not listed fall in the NULL group)
FOUND = sql.SQL("SELECT array_position(%(mine)s::jsonb[], t.metadata), count(*), sum(t.row_seal),"
                " count(*) FILTER (WHERE t.row_seal IS NULL) FROM {} t{} GROUP BY 1")
# A table's triggers other than the engine's own (enabled): any of them may change a row as it is
# written, INSERT included, unseen by the seal it keeps.
FOREIGN_TRIGGERS = ("SELECT string_agg(tgname, ', ' ORDER BY tgname) FROM pg_trigger WHERE tgrelid = to_regclass(quote_ident(%s))"
                    " AND NOT tgisinternal AND tgenabled <> 'D'"
                    " AND tgfoid <> ALL (ARRAY[to_regprocedure('migrator_journal()'), to_regprocedure('migrator_unseal()')])")
UNLINKED = sql.SQL("SELECT count(*) FROM {t} t WHERE t.{into} IS NULL AND t.{c} IS NOT NULL"
                   " AND t.metadata = ANY(%s::jsonb[]) AND EXISTS (SELECT FROM legacy_id_map m WHERE m.legacy_id = {legacy})")


def check(cur: Any, mapping: Mapping, run_id: str, priority: str, patterns: Iterable[Pattern]) -> dict[str, Any]:
    """Whether the rows of `patterns` (a priority's, as its run scoped them) are as its done batches
    wrote them: per table they write, one count and sum of the seals of the rows carrying their
    provenance (a row a follow session marked deleted is not the key's to give), against the
    batches' figures; and no row left unlinked whose entity the legacy id map holds (the link step
    fills those, outside the seal). A table with a trigger of its own is not vouched for by its seals.
    `held`: all agree; `broken`: per table, what did not, and why."""
    migrated = [p for p in patterns if p.migrated]
    mine = sorted({p.provenance for p in migrated})
    writes: dict[str, set[str]] = {}  # the tables each provenance's patterns write
    for p in migrated:
        writes.setdefault(p.provenance, set()).update(p.tables)
    expected = Figures()
    for kept in ledger.batch_seals(cur, run_id, priority):
        expected.merge(Figures(kept))
    tables = list(dict.fromkeys([*(t for p in migrated for t in p.tables), *expected.tables]))
    broken: dict[str, dict[str, Any]] = {}
    rows = 0
    for table in tables:
        cur.execute(FOREIGN_TRIGGERS, (table,))
        (triggers,) = cur.fetchone()
        if triggers:
            broken[table] = {"triggers": f"trigger(s) {triggers} of its own may change a row as it is written"}
            continue
        rule = mapping.rule(table)
        live = (sql.SQL(" WHERE t.{} IS NULL").format(sql.Identifier(rule.deleted_at)) if rule.on_delete == "mark"
                else sql.SQL(""))
        wrote = expected.tables.get(table, {})
        listed = sorted(mine, key=lambda p: p not in wrote and table not in writes[p])
        cur.execute(FOUND.format(sql.Identifier(table), live), {"mine": listed})
        found = {listed[i - 1]: (n, int(total or 0) % MODULUS, unsealed)
                 for i, n, total, unsealed in cur.fetchall() if i is not None}
        # (rows that keys of more than one pattern give together are merged: such a row keeps no seal)
        shared = mapping.sharing(table)
        merged = f", or given by more than one key of {', '.join(p.name for p in shared)} (merged)" if shared else ""
        for provenance in sorted(set(found) | set(wrote)):
            n, total, unsealed = found.get(provenance, (0, 0, 0))
            rows += n
            want_n, want_total = wrote.get(provenance, (0, 0))
            why = (f"{unsealed:,} row(s) without a seal: changed since their batch wrote them{merged}" if unsealed
                   else f"{n:,} row(s) where the batches wrote {want_n:,}" if n != want_n
                   else "the rows' seals do not add up to the batches' (a row differs from what was sent)"
                   if total != want_total else None)
            if why:
                broken.setdefault(table, {})[provenance] = why
    for link in mapping.links:
        if link.table not in tables:
            continue
        t, c = sql.Identifier(link.table), sql.Identifier(link.column)
        cur.execute(UNLINKED.format(t=t, into=sql.Identifier(link.into), c=c,
                                    legacy=sql.SQL(LEGACY_KEY).format(ref=sql.SQL("t.{}").format(c))), (mine,))
        unlinked = cur.fetchone()[0]
        if unlinked:
            broken.setdefault(link.table, {})[f"{link.into} from {link.column}"] = \
                f"{unlinked:,} row(s) not linked to the entity the legacy id map names"
    return {"held": not broken, "rows": rows, "tables": len(tables), "broken": broken}
