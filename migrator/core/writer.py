"""Writing transformed records: one call per sub-batch, bisection on failure.

Each row goes as the JSON array of its values in column order (orjson serialises them in C, where
quoting each value in Python cost more than the insert itself), cast column by column server-side:
the rows of each upsert as one JSON document expanded by jsonb_array_elements, or, in a sub-batch of
STAGED_MIN_RECORDS or more, a row each of a temporary table, filled by COPY, that the upsert reads. Every upsert
of a sub-batch runs in one call of `migrator_write` (migrator/core/sql/004_write_path.sql), inside a
subtransaction that a record error rolls back without aborting the batch. A failing sub-batch
is split in halves until every good record has committed and each bad one is isolated as a
dead letter with the database's reason.
"""
from __future__ import annotations

import hashlib
import io
import struct
import weakref
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain, repeat
from typing import Any, Callable, Sequence

import orjson
import psycopg2
import psycopg2.errors

from migrator.core import jsoncodec, ledger
from migrator.core import metrics
from migrator.core import schema
from migrator.core.mapping import Mapping, Pattern, Row
from migrator.core.merge import ROW_SEAL, SYNCED_AT
from migrator.core.seal import row_seal, seal_start
from migrator.core.source import KeyRead


# Errors a record can cause. Anything else (a missing table, a lost connection) fails the batch.
RECORD_ERRORS = (psycopg2.DataError, psycopg2.IntegrityError, psycopg2.errors.ProgramLimitExceeded,
                 orjson.JSONEncodeError)


# Sub-batches of this many records or more go to PostgreSQL by COPY, a row's JSON array a row, into
# temporary tables the upserts read (migrator/core/sql/021_staged_writes.sql): the statement's parser no
# longer reads through a document of megabytes, nor does jsonb_array_elements copy each row out of it;
# 4-6 % of PostgreSQL's CPU for the write at 2,000 records (scripts/write_variants.py). At 500 it is
# even, at 100 the statements and round trips it adds cost twice what it saves (follow's writes, a
# bisection's halves go as one document).
STAGED_MIN_RECORDS = 1000
COPY_READ_BYTES = 1 << 20


@dataclass(slots=True)
class Prepared:
    """A source key ready to write: all of its rows commit together or not at all."""

    key: bytes
    key_text: str
    pattern: Pattern
    rows: list[Row]
    expires_at: datetime | None
    read: KeyRead  # kept for the dead letter should the write fail
    digest: int  # of the value as read (source.value_digest), kept on its rows for verification
    seals: list[tuple[str, int]] = field(default_factory=list)  # (table, seal) of each row, as a bulk batch last sent them


# What PostgreSQL says of a NUL in a row's JSON, and what it means to whoever reads the dead letter
NUL_REFUSED = "\\u0000 cannot be converted to text"
NUL_REASON = ("a value holds a NUL character (\\u0000), which PostgreSQL text and jsonb cannot store:"
              " take it out of the value in Redis, or map the field to a bytea column, and run again")


def describe(exc: BaseException) -> str:
    """The first line of an error, fit for logs: PostgreSQL's detail (row values) is left out."""
    text = (getattr(exc, "pgerror", None) or str(exc)).strip()
    if isinstance(exc, psycopg2.errors.UntranslatableCharacter) and NUL_REFUSED in f"{text} {detail(exc)}":
        return f"{type(exc).__name__}: {NUL_REASON}"
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def detail(exc: BaseException) -> str | None:
    """PostgreSQL's detail, which may quote row values: kept with the dead letter, never logged."""
    return getattr(exc, "detail", None) or getattr(getattr(exc, "diag", None), "message_detail", None)


def _error_class(sqlstate: str) -> type[psycopg2.Error]:
    """psycopg2's exception for a record error that migrator_write returned (classes 22, 23, 54)."""
    try:
        return psycopg2.errors.lookup(sqlstate)
    except KeyError:  # a code newer than this psycopg2: its class says enough
        return {"22": psycopg2.DataError, "23": psycopg2.IntegrityError}.get(sqlstate[:2],
                                                                              psycopg2.errors.ProgramLimitExceeded)


# Columns every row gets from the record it came from (init-db adds them to every table; synced_at is
# follow's alone, stamped after its writes): those its seal is of right after its own sealed columns,
# then its linked columns, the others, and the seal last, a bulk batch's alone (NULL from any other
# writer: follow and dual-write rows vouch for nothing a batch recorded).
SEALED_PROVENANCE = ("source_key", "metadata", "source_digest")
UNSEALED_PROVENANCE = ("migration_run", "expires_at", ROW_SEAL)
assert {*SEALED_PROVENANCE, *UNSEALED_PROVENANCE} == set(schema.PROVENANCE) - {SYNCED_AT}


class Form:
    """How the rows of one table with one set of columns travel: the columns of each row's line, in
    order, the part its seal is of first (its columns but the linked ones, its key, its provenance,
    its value's digest: one contiguous slice of the line's bytes); and what the seal's digest starts
    with, its table and the columns of that part, so that the same values in other columns differ."""

    __slots__ = ("unlinked", "linked", "columns", "started", "stage")

    def __init__(self, table: str, unlinked: tuple[str, ...], linked: tuple[str, ...]) -> None:
        self.unlinked = unlinked
        self.linked = linked  # the link step fills them after the write: no part of the seal
        self.columns = unlinked + SEALED_PROVENANCE + linked + UNSEALED_PROVENANCE
        self.started = seal_start(orjson.dumps([table, unlinked]))  # the seal's header, digested once
        # the temporary tables its rows are staged in, one per round (Writer.upsert)
        self.stage = "migrator_stage_" + hashlib.sha1(orjson.dumps([table, self.columns])).hexdigest()[:24]


COLUMN_TYPES = """
SELECT c.relname, a.attname, format_type(a.atttypid, NULL), t.typcategory, pg_get_expr(d.adbin, d.adrelid)
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid IN (SELECT to_regclass(t) FROM unnest(%s::text[]) AS t) AND a.attnum > 0 AND NOT a.attisdropped
"""

class Utf8Text:
    """A text parameter given as UTF-8 bytes: psycopg2 quotes it as they are. orjson writes bytes,
    and decoding a sub-batch's document to str for psycopg2 to encode it again cost more than
    serialising it. Only for a connection whose client encoding is UTF8."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __conform__(self, protocol: Any) -> "Utf8Text":
        return self

    def getquoted(self) -> bytes:
        # an escape string literal means the same whatever standard_conforming_strings says
        return b"E'" + self.data.replace(b"\\", b"\\\\").replace(b"'", b"''") + b"'"


# Column types per connection, read once from the catalog: a type per column is what the
# upsert casts each positional value to (with its category, and its default expression for
# the verification). A new connection reads them again.
ColumnType = tuple[str, str, str | None]
_column_types: "weakref.WeakKeyDictionary[Any, dict[str, dict[str, ColumnType]]]" = weakref.WeakKeyDictionary()


class Writer:
    def __init__(self, cursor: Any, mapping: Mapping, run_id: str | None,  # None: the app's own writes
                 fenced: bool = False,  # a bulk batch's: see merge.FENCE
                 latest: bool = False) -> None:  # follow's: see merge.TableRule.merged
        self.cursor = cursor
        self.mapping = mapping
        self.run_id = run_id
        self.fenced = fenced
        self.latest = latest
        self._statements: dict[tuple[str, tuple[str, ...], str | None], str] = {}
        self._forms: dict[tuple[str, tuple[str, ...]], Form] = {}  # by (table, the columns of a row's values)
        self._table_order = {name: i for i, name in enumerate(mapping.table_names())}
        # A key that gives a row says the row is live: in a table whose rows `follow` marks rather
        # than deletes, every write clears the mark (a run's as well as follow's own).
        self._marked = {r.name: r.deleted_at for r in mapping.rules if r.on_delete == "mark"}
        # per table, the columns the link step fills after the write: no part of a row's seal
        self._linked = {table: frozenset(into) for table, into in mapping.linked_columns().items()}

    def write(self, records: list[Prepared]) -> tuple[int, list[tuple[Prepared, BaseException]]]:
        """Write one sub-batch; returns (rows inserted or changed, [(record, error)] dead)."""
        try:
            return self.upsert(records), []
        except RECORD_ERRORS as exc:
            if len(records) == 1:
                return 0, [(records[0], exc)]
            mid = len(records) // 2
            left_rows, left_dead = self.write(records[:mid])
            right_rows, right_dead = self.write(records[mid:])
            return left_rows + right_rows, left_dead + right_dead

    def upsert(self, records: list[Prepared]) -> int:
        """Upsert every row of these records, all or none; returns the rows inserted or changed.

        A record error is raised as psycopg2's exception for its SQLSTATE, and leaves the
        transaction usable.
        """
        statements, documents = [], []
        if len(records) >= STAGED_MIN_RECORDS:
            staged = [(table, form, f"{form.stage}_{n}", lines) for table, form, n, lines in self._grouped(records)]
            # (each stage emptied first: a failed write's rows are still in it)
            self.cursor.execute("SELECT migrator_stage(%s)", ([stage for _, _, stage, _ in staged],))
            for table, form, stage, lines in staged:
                # each row's JSON as it is, in COPY's binary format: the server neither scans nor
                # unescapes its bytes, as the text format did
                self.cursor.copy_expert(f"COPY pg_temp.{stage} (doc) FROM STDIN WITH (FORMAT binary)",
                                        io.BytesIO(binary_rows(lines)), COPY_READ_BYTES)
                statements.append(self._statement(table, form.columns, stage))
                documents.append(b"")
        else:
            for table, columns, document in self.documents(records):
                statements.append(self._statement(table, columns))
                documents.append(document)
        if not statements:
            return 0
        # (a bulk batch's upserts may keep the seals they write: see migrator/core/sql/018_row_seal.sql)
        function = "migrator_write_sealed" if self.fenced else "migrator_write"
        with metrics.POSTGRES_WRITE.time():
            written, state, message, detail_ = call_with_documents(self.cursor, function, statements, documents)
        if state is not None:
            error = _error_class(state)(message)
            error.detail = detail_
            raise error
        return written

    def documents(self, records: list[Prepared]) -> list[tuple[str, tuple[str, ...], bytes]]:
        """(table, columns, document) of each upsert of these records, in the order they run; a bulk
        batch's records get the seals of their rows (Prepared.seals).

        One upsert per (table, columns); a row id seen twice goes to a later round, since one upsert
        statement may not touch the same row twice. A row travels as the JSON array of its values in
        the order of its Form's columns, serialised once: the part its seal is of, then the rest.
        """
        # (one copy of a one-row document's bytes: joining one line gives that line back)
        return [(table, form.columns, b"".join((b"[", b",".join(lines), b"]")))
                for table, form, _, lines in self._grouped(records)]

    def _grouped(self, records: list[Prepared]) -> list[tuple[str, Form, int, list[bytes]]]:
        """(table, form, round, its rows' JSON arrays in id order) of each upsert, in the order they run."""
        forms = self._forms
        try:
            rounds = self._rounds(records, orjson.dumps)
        except orjson.JSONEncodeError:  # an integer past 64 bits (jsoncodec): the sub-batch again, the slow way
            rounds = self._rounds(records, jsoncodec.dumps)
        made = []
        for n, batch in enumerate(rounds):
            # A fixed table order and id order keeps concurrent workers from deadlocking.
            for group, rows in sorted(batch.items(), key=lambda g: (self._table_order[g[0][0]], g[0][1])):
                made.append((group[0], forms[group], n, [rows[k] for k in sorted(rows)]))
        return made

    def _rounds(self, records: list[Prepared], dumps: Callable[[Any], bytes]) -> list[dict[tuple[str, tuple[str, ...]], dict[Any, bytes]]]:
        """Each row's JSON array, by round (an id at most once in each), (table, columns) and id."""
        rounds: list[dict[tuple[str, tuple[str, ...]], dict[Any, bytes]]] = []
        forms = self._forms
        fenced = self.fenced
        run = dumps(self.run_id)
        for rec in records:
            ident = (rec.key_text, orjson.Fragment(rec.pattern.provenance), rec.digest)
            # the rest of each of its rows' lines: its run, its expiry (the same for every row of it)
            rest = b"," + run + b"," + dumps(rec.expires_at) + b","
            if fenced:
                rec.seals = []
            for row in rec.rows:
                values = row.values
                if self._marked and row.table in self._marked:
                    values.setdefault(self._marked[row.table], None)
                group, row_id = (row.table, tuple(values)), values["id"]
                form = forms.get(group) or self._form(group)
                if form.linked:
                    sealed = dumps([*map(values.__getitem__, form.unlinked), *ident])
                    tail = b"," + dumps([values[c] for c in form.linked])[1:-1] + rest
                else:
                    sealed = dumps([*values.values(), *ident])
                    tail = rest
                if fenced:
                    seal = row_seal(form.started, sealed)
                    rec.seals.append((row.table, seal))
                    tail += b"%d]" % seal
                else:
                    tail += b"null]"
                # (a large row's bytes copied once, not once per piece added: a 64 MiB value's line
                # is made beside the values it came from)
                line = sealed[:-1] + tail if len(sealed) < LARGE_LINE_BYTES else \
                    b"".join((memoryview(sealed)[:-1], tail))
                for batch in rounds:
                    bucket = batch.setdefault(group, {})
                    if row_id not in bucket:
                        bucket[row_id] = line
                        break
                else:
                    rounds.append({group: {row_id: line}})
        return rounds

    def _form(self, group: tuple[str, tuple[str, ...]]) -> "Form":
        table, columns = group
        linked = self._linked.get(table, frozenset())
        form = self._forms[group] = Form(table, tuple(c for c in columns if c not in linked),
                                         tuple(c for c in columns if c in linked))
        return form

    def _statement(self, table: str, columns: tuple[str, ...], stage: str | None = None) -> str:
        key = (table, columns, stage)
        if key not in self._statements:
            types = column_types(self.cursor, self.mapping, table, columns)
            self._statements[key] = self.mapping.rule(table).upsert(
                columns, types, ledger.unretired if self.fenced else None,
                self._linked.get(table, frozenset()), staged=stage, latest=self.latest).as_string(self.cursor)
        return self._statements[key]


# A row's line longer than this is put together in one copy of its bytes (Writer._grouped).
LARGE_LINE_BYTES = 1 << 20
# Documents of rows larger than this go to PostgreSQL by COPY, streamed as they are: as a
# parameter, psycopg2 would quote a copy of one and build the statement text around another.
LARGE_DOCUMENT_BYTES = 4 * 1024 * 1024
STAGED = "ARRAY(SELECT doc FROM pg_temp.migrator_documents ORDER BY n)"
# Stored uncompressed (EXTERNAL): a document is read once, right after it came, and pglz
# compressing it then decompressing it cost PostgreSQL more than the statement that reads it
# (3.6 of 45 µs per key of a run, measured). PostgreSQL 15's CREATE TABLE cannot say so, hence
# the ALTER, on every call: cheap beside a document of megabytes.
STAGING = ("CREATE TEMP TABLE IF NOT EXISTS migrator_documents (n integer, doc text) ON COMMIT DELETE ROWS;"
           " ALTER TABLE pg_temp.migrator_documents ALTER doc SET STORAGE EXTERNAL")


def call_with_documents(cursor: Any, function: str, statements: list[str], documents: list[bytes]) -> tuple:
    """`SELECT * FROM function(statements, documents)` (migrator_write, migrator_compare): its one
    row. The documents (JSON of rows, as orjson wrote them) go as parameters, or, when one of them
    is large, through a temporary table filled by COPY, so the client holds each once."""
    if max(map(len, documents)) < LARGE_DOCUMENT_BYTES:
        param = Utf8Text if cursor.connection.encoding == "UTF8" else bytes.decode
        cursor.execute(f"SELECT * FROM {function}(%s, %s)", (statements, [param(d) for d in documents]))
        return cursor.fetchone()
    cursor.execute(STAGING)
    cursor.copy_expert("COPY pg_temp.migrator_documents (n, doc) FROM STDIN WITH (FORMAT binary)", _Binary(documents))
    cursor.execute(f"SELECT * FROM {function}(%s, {STAGED})", (statements,))
    row = cursor.fetchone()
    cursor.execute("TRUNCATE pg_temp.migrator_documents")
    return row


# COPY's binary format: its header (signature, no flags, no extension), and its trailer
BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
BINARY_TRAILER = struct.pack("!h", -1)
_ONE_FIELD = struct.Struct("!hi")  # a row of one field, and that field's length


def binary_rows(lines: list[bytes]) -> bytes:
    """COPY's binary format of rows of one text column, a row each of `lines` (UTF-8 text with no
    NUL byte, as orjson writes JSON): the lines copied once, each after its length."""
    fields = map(_ONE_FIELD.pack, repeat(1), map(len, lines))
    return b"".join(chain((BINARY_HEADER,), chain.from_iterable(zip(fields, lines)), (BINARY_TRAILER,)))


class _Binary:
    """COPY's binary format of rows (n, doc), read by psycopg2 a piece at a time: a document is
    handed over in slices of itself, never copied whole."""

    def __init__(self, documents: list[bytes]) -> None:
        parts: list[bytes | memoryview] = [BINARY_HEADER]
        for n, doc in enumerate(documents):
            parts += [struct.pack("!hii", 2, 4, n) + struct.pack("!i", len(doc)), memoryview(doc)]
        parts.append(BINARY_TRAILER)
        self.parts, self.at = parts, 0

    def read(self, size: int = -1) -> bytes:
        while self.parts and self.at >= len(self.parts[0]):
            self.parts.pop(0)
            self.at = 0
        if not self.parts:
            return b""
        part = self.parts[0]
        end = len(part) if size < 0 else min(len(part), self.at + size)
        piece, self.at = bytes(part[self.at:end]), end
        return piece


def column_types(cursor: Any, mapping: Mapping, table: str, columns: Sequence[str]) -> dict[str, ColumnType]:
    """The catalog's type of each column of `table` (all of them); read again when a column is new to it."""
    conn = cursor.connection
    known = _column_types.get(conn, {}).get(table, {})
    if not known or not all(c in known for c in columns):
        cursor.execute(COLUMN_TYPES, (mapping.table_names(),))
        tables: dict[str, dict[str, ColumnType]] = {}
        for relname, column, type_name, category, default in cursor.fetchall():
            tables.setdefault(relname, {})[column] = (type_name, category, default)
        _column_types[conn] = tables
        known = tables.get(table, {})
        missing = [c for c in columns if c not in known]
        if missing:
            what = f"table {table}" if not known else f"column(s) {', '.join(missing)} of table {table}"
            raise LookupError(f"{what} not in the target database: is its schema current? (`migrator init-db`)")
    return known
