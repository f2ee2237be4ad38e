"""PostgreSQL's CPU per row of the batch writes, by way of writing them: the real Writer beside variants of it.

    .venv/bin/python scripts/write_variants.py --keys 60000          # every variant, 3 rounds: ~5 minutes
    .venv/bin/python scripts/write_variants.py --keys 20000 --only "JSON documents (not staged),planned each call (004)"
    .venv/bin/python scripts/write_variants.py --only "baseline" --perf /tmp/w.perf   # perf report -i /tmp/w.perf

Seeds the demo keyspace into a redis-server of its own and runs `migrator run --local --jobs 1` into a
throwaway database, keeping every sub-batch the writer was given. Then, for each variant, the mapping's
tables are emptied and the same sub-batches written again, in the same order, through a Writer of a new
connection (a transaction per batch, as the run's), and its backend's CPU (/proc/PID/schedstat) is counted. Each
variant runs --rounds times, interleaved, the least counting (others' load only ever adds); the table
gives µs per row and per key and the ratio to the first variant named. "baseline" stages its
sub-batches by COPY (writer.STAGED_MIN_RECORDS); "JSON documents (not staged)" is the writer's other
path, and the variants that edit a statement or the call edit that one. "same-work floor" is
scripts/costs.py's: the rows the writer wrote, COPYed into unlogged staging and upserted per table.
A variant named "... sub-batch N" takes the same records in sub-batches of N.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import orjson
import psycopg2
from psycopg2 import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from costs import prepare, quietly, restore, snapshot, write_plainly  # noqa: E402
from demo_keyspace import demo_keyspace  # noqa: E402
from pg_profile import backend_cpu  # noqa: E402
from migrator.apps.threadr import THREADR  # noqa: E402
from migrator.core import ledger, merge as merge_module, writer as writer_module  # noqa: E402
from migrator.core.writer import Prepared, Writer  # noqa: E402

Variant = Callable[[Any], Writer]  # a cursor -> the writer to write with

RUN_ID: list[str] = []  # the captured run's: the rows' provenance
PERF: list[str] = []  # the file the next replay's perf recording goes to (--perf)


def _baseline(cur: Any) -> Writer:
    return Writer(cur, THREADR, RUN_ID[0], fenced=True)


class _Edited(Writer):
    """The real Writer, each statement's text edited, its calls made to `function`."""

    edit: Callable[[str], str] = staticmethod(lambda s: s)  # type: ignore[assignment]
    function = "migrator_write"

    def _statement(self, table: str, columns: tuple[str, ...]) -> str:
        return type(self).edit(super()._statement(table, columns))

    def upsert(self, records: list[Prepared]) -> int:
        call = writer_module.call_with_documents
        writer_module.call_with_documents = lambda cur, _, s, d: call(cur, self.function, s, d)
        try:
            return super().upsert(records)
        finally:
            writer_module.call_with_documents = call


def edited(edit: Callable[[str], str] = lambda s: s, function: str = "migrator_write", setup: str = "",
           fenced: bool = True) -> Variant:
    """The writer's JSON path (_as_json), each statement edited."""
    def make(cur: Any) -> Writer:
        _as_json(cur)
        if setup:
            cur.execute(setup)
        kind = type("Variant", (_Edited,), {"edit": staticmethod(edit), "function": function})
        return kind(cur, THREADR, RUN_ID[0], fenced=fenced)
    return make


# migrator_write as 004_write_path.sql has it, before 019 planned each statement once per session
REPLANNED = re.search(r"CREATE OR REPLACE FUNCTION migrator_write\(.*?\n\$\$;",
                      (ROOT / "migrator/core/sql/004_write_path.sql").read_text(), re.S).group(0).replace(
    "CREATE OR REPLACE FUNCTION migrator_write(", "CREATE FUNCTION pg_temp.write_replanned(")
# the same with no subtransaction: what the EXCEPTION block costs
UNGUARDED = re.sub(r"\nEXCEPTION WHEN .*?(?=\nEND\n)", "", REPLANNED.replace("write_replanned", "write_bare"), flags=re.S)


def _casts_only(statement: str) -> str:
    """The statement's SELECT of the rows, cast, and nothing written."""
    select = re.search(r" SELECT (.*) FROM jsonb_array_elements\(\$1::jsonb\) AS r", statement)
    return f"SELECT FROM (SELECT {select.group(1)} FROM jsonb_array_elements($1::jsonb) AS r OFFSET 0) AS s"


def _json(statement: str) -> str:
    """json in place of jsonb: the document only split into rows, each row parsed again per column."""
    statement = statement.replace("jsonb_array_elements($1::jsonb)", "json_array_elements($1::json)")
    return re.sub(r"NULLIF\(r -> (\d+), 'null'\)::(jsonb|json)", r"NULLIF((r -> \1)::jsonb, 'null')::\2", statement)


class _Objects(_Edited):
    """Rows as JSON objects through json_to_recordset: one pass of the document, each value given to
    its column type's input function as it is met."""

    def _statement(self, table: str, columns: tuple[str, ...]) -> str:
        types = writer_module.column_types(self.cursor, self.mapping, table, columns)
        element = merge_module._element
        merge_module._element = lambda i, column, t, table: sql.SQL("r.") + sql.Identifier(column)
        try:
            statement = super()._statement(table, columns)
        finally:
            merge_module._element = element
        defs = ", ".join(f'"{c}" {types[c][0]}' for c in columns)
        return statement.replace(" FROM jsonb_array_elements($1::jsonb) AS r", f" FROM json_to_recordset($1::json) AS r({defs})")

    def documents(self, records: list[Prepared]) -> list[tuple[str, tuple[str, ...], bytes]]:
        # the writer's rows, each an object of its columns (the Python side is not what is counted)
        return [(table, columns, orjson.dumps([dict(zip(columns, row)) for row in orjson.loads(document)]))
                for table, columns, document in super().documents(records)]


def objects(cur: Any) -> Writer:
    return _Objects(cur, THREADR, RUN_ID[0], fenced=True)


def _as_json(cur: Any) -> Writer:
    """Every sub-batch as JSON documents, as only those under writer.STAGED_MIN_RECORDS records go."""
    writer_module.STAGED_MIN_RECORDS = 1 << 62  # (put back by replay)
    return _baseline(cur)


def _documents_by_copy(cur: Any) -> Writer:
    """Every document through the temporary table by COPY, as only large ones go (writer.LARGE_DOCUMENT_BYTES)."""
    writer_module.LARGE_DOCUMENT_BYTES = 0  # (put back by replay)
    return _as_json(cur)


def _sized(n: int, variant: Variant) -> Variant:
    """`variant` with the records taken in sub-batches of `n` (replay reads it)."""
    def make(cur: Any) -> Writer:
        return variant(cur)
    make.size = n  # type: ignore[attr-defined]
    return make


FLOOR = "same-work floor"
REPLANNING_CALL = {"function": "pg_temp.write_replanned", "setup": REPLANNED}
REPLANNING = edited(**REPLANNING_CALL)
VARIANTS: dict[str, Variant] = {
    "baseline": _baseline,  # the Writer and migrator_write as they are
    FLOOR: _baseline,  # (not a writer: see floor)
    # the parts of the statement and the call
    "planned each call (004)": REPLANNING,
    "no subtransaction (planned each call)": edited(function="pg_temp.write_bare", setup=UNGUARDED),
    "unfenced": edited(fenced=False),
    "no guard (WHERE true)": edited(lambda s: re.sub(r" WHERE \(t\.synced_at.*$", "", s)),
    "no journal trigger": edited(setup=";".join(f'ALTER TABLE "{t}" DISABLE TRIGGER USER' for t in THREADR.table_names())),
    # the transport without the writes (SELECTs: through 004's EXECUTE), then its alternatives
    "jsonb parse and casts only": edited(_casts_only, **REPLANNING_CALL),
    "jsonb parse only": edited(lambda s: "SELECT jsonb_array_length($1::jsonb)", **REPLANNING_CALL),
    "nothing (SELECT 1)": edited(lambda s: "SELECT 1", **REPLANNING_CALL),
    "json not jsonb": edited(_json),
    "objects by json_to_recordset": objects,
    "rows parsed one by one": edited(lambda s: s.replace(
        "FROM jsonb_array_elements($1::jsonb) AS r",
        "FROM json_array_elements($1::json) AS e CROSS JOIN LATERAL (SELECT e::jsonb AS r OFFSET 0) AS x")),
    "documents by COPY": _documents_by_copy,
    "JSON documents (not staged)": _as_json,
    "work_mem 64MB": edited(setup="SET work_mem = '64MB'"),  # (a document's rows no longer spill to disk)
    # records per sub-batch (RunOptions.batch_size by default)
    **{f"sub-batch {n}": _sized(n, _baseline) for n in (20, 100, 500, 1000, 2000, 8000)},
    **{f"planned each call + sub-batch {n}": _sized(n, REPLANNING) for n in (20, 100, 500, 1000)},
}


def capture(url: str, redis_url: str) -> list[list[list[Prepared]]]:
    """Every sub-batch a run of the keyspace gave its writers, in order, by batch (a batch's writer
    writes them in one transaction)."""
    taken: list[list[list[Prepared]]] = []
    write = Writer.write
    writers: list[Writer] = []

    def keep(self: Writer, records: list[Prepared]) -> Any:
        if self.fenced:
            if not writers or writers[-1] is not self:
                writers.append(self)
                taken.append([])
            taken[-1].append(list(records))
        return write(self, records)

    os.environ.update(REDIS_URL=redis_url, DATABASE_URL=url)
    Writer.write = keep  # type: ignore[method-assign]
    try:
        quietly("run", "--local", "--jobs", "1", "--json", "--output-dir", tempfile.gettempdir())
    finally:
        Writer.write = write  # type: ignore[method-assign]
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        RUN_ID.append(ledger.latest_run(cur))
    conn.close()
    return taken


def _perf(pid: int) -> subprocess.Popen | None:
    """perf recording the backend, when asked (--perf): where its time goes, by function (perf report -i FILE)."""
    if not PERF:
        return None
    perf = subprocess.Popen(["perf", "record", "-q", "-g", "-F", "999", "-p", str(pid), "-o", PERF.pop()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return perf


def _stop(perf: subprocess.Popen | None) -> None:
    if perf is not None:
        perf.send_signal(signal.SIGINT)
        perf.wait()


def floor(url: str, rows: dict[str, bytes]) -> tuple[float, int]:
    """scripts/costs.py's same-work floor of the rows the writer wrote: COPY into unlogged staging, then one
    INSERT ... ON CONFLICT per table, into the emptied tables with no trigger (enabled again after it, for
    the variants that follow)."""
    conn = psycopg2.connect(url)
    tables = THREADR.table_names()
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql.SQL("TRUNCATE {}, migration_journal").format(sql.SQL(", ").join(map(sql.Identifier, tables))))
            dropped = prepare(cur, tables, {})
        pid = conn.get_backend_pid()
        perf = _perf(pid)
        before = backend_cpu(pid)
        write_plainly(conn, tables, rows)
        cpu = backend_cpu(pid) - before
        _stop(perf)
        with conn, conn.cursor() as cur:
            restore(cur, tables, {}, dropped)
        return cpu, sum(body.count(b"\n") for body in rows.values())
    finally:
        conn.close()


def replay(url: str, batches: list[list[list[Prepared]]], variant: Variant, size: int | None) -> tuple[float, int]:
    """CPU seconds of the backend writing every sub-batch into the emptied tables, a transaction per
    batch, and the rows written (`size`: each batch's records taken again in sub-batches of this many)."""
    if size:
        batches = [[every[i:i + size] for i in range(0, len(every), size)]
                   for every in ([rec for records in batch for rec in records] for batch in batches)]
    kept = writer_module.LARGE_DOCUMENT_BYTES, writer_module.STAGED_MIN_RECORDS
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            tables = sql.SQL(", ").join(map(sql.Identifier, THREADR.table_names()))
            cur.execute(sql.SQL("TRUNCATE {}, migration_journal").format(tables))
            for table in THREADR.table_names():  # (a variant may have disabled them)
                cur.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER USER").format(sql.Identifier(table)))
        pid = conn.get_backend_pid()
        written = 0
        perf = _perf(pid)
        before = backend_cpu(pid)
        with conn.cursor() as cur:
            w = variant(cur)
            for batch in batches:
                for records in batch:
                    rows, dead = w.write(records)
                    written += rows
                conn.commit()
        cpu = backend_cpu(pid) - before
        _stop(perf)
        return cpu, written
    finally:
        writer_module.LARGE_DOCUMENT_BYTES, writer_module.STAGED_MIN_RECORDS = kept
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=60_000, help="about this many keys (default 60,000)")
    parser.add_argument("--rounds", type=int, default=3, help="times each variant runs (default 3)")
    parser.add_argument("--only", help="variants, comma-separated, the first the one ratios are to (default: all)")
    parser.add_argument("--perf", help="record the backend of the last variant's last round with perf into this file")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(VARIANTS)
    with demo_keyspace("write_variants", args.keys) as (url, source_url, client):
        keys = client.dbsize()
        batches = capture(url, source_url)
        rows = sum(len(rec.rows) for batch in batches for records in batch for rec in records)
        print(f"{keys:,} keys, {len(batches)} batches of {sum(map(len, batches))} sub-batches in all, {rows:,} rows;"
              f" load average {os.getloadavg()[0]:.1f}")
        replay(url, batches, VARIANTS[names[0]], None)  # warm-up, not counted: the tables' files extended, caches filled
        conn = psycopg2.connect(url)
        written = snapshot(conn, THREADR.table_names())
        conn.close()
        best: dict[str, tuple[float, int]] = {}
        for _ in range(args.rounds):
            for variant in names:
                if args.perf and variant == names[-1] and _ == args.rounds - 1:
                    PERF.append(args.perf)
                chosen = VARIANTS[variant]
                cpu, n = floor(url, written) if variant == FLOOR else \
                    replay(url, batches, chosen, getattr(chosen, "size", None))
                if variant not in best or cpu < best[variant][0]:
                    best[variant] = (cpu, n)
        base = best[names[0]][0]
        print(f"{'variant':40} {'µs/row':>8} {'µs/key':>8} {'ratio':>6} {'written':>9}")
        for variant in names:
            cpu, written = best[variant]
            print(f"{variant:40} {cpu * 1e6 / rows:8.2f} {cpu * 1e6 / keys:8.2f} {cpu / base:6.2f} {written:9,}")
        print(f"load average {os.getloadavg()[0]:.1f}")

if __name__ == "__main__":
    main()
