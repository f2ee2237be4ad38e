"""One merge rule per target table, and the upsert it becomes.

The batch writer and the dual-write paths share these rules, so a backfill running while the
app writes never overwrites a newer value: counters only grow (GREATEST), documents keep the
newer `version` column, lookup columns are filled by whichever source knows them (COALESCE).
An upsert that would change nothing does not touch the row (unless no key wrote it: the app's
own), so reruns leave tables identical.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from psycopg2 import sql

# Provenance and bookkeeping: refreshed when a row changes, never a reason to change it
# (a grant written under its ip and its email key would otherwise flip its source each run).
VOLATILE = frozenset({"id", "migration_run", "source_key", "metadata", "expires_at", "source_digest", "synced_at",
                      "row_seal"})
# The column of a row's seal (migrator/core/seal.py).
ROW_SEAL = "row_seal"


def expiry_moved(new: str) -> sql.Composable:
    """Row t's expiry against the one its key has now (`new`: the row the write or the comparison
    brings): set or removed, or more than a second apart (the same TTL read twice differs by the
    reads' round trips only: source.expiry), so a re-run leaves a row alone for it."""
    return sql.SQL("((t.expires_at IS NULL) <> ({new}.expires_at IS NULL)"
                   " OR abs(extract(epoch FROM t.expires_at - {new}.expires_at)) > 1)").format(new=sql.SQL(new))


# When a live `migrator follow` session last read the row's key: the database's clock just after the
# read (ledger.stamp_synced; only follow writes it). The fence between a bulk batch and follow: a batch
# reads its keys after its transaction began (now()), so a row stamped before then was read by follow
# before the batch read it, and the batch's value is the newer; a row stamped since may hold a newer
# read than the batch's, and the batch leaves it alone. Leaving it is safe even when the batch's read
# was the newer: the app's write after follow's read is a notification follow applies. (Only against
# the same key: a row another key also fills, a lookup's, takes that key's write as it did.) Being on
# the row, it is evaluated on the row as follow committed it, even when the batch's write waited for
# follow's transaction.
SYNCED_AT = "synced_at"
FENCE = sql.SQL("(t.{at} IS NULL OR t.{at} < now() OR t.source_key IS DISTINCT FROM EXCLUDED.source_key)").format(
    at=sql.Identifier(SYNCED_AT))
# A row follow deleted has no mark to carry: the fence's other half (ledger.unretired) says, for a
# table and a row's id and key, that follow did not delete that row of that key since the batch began.
Unretired = Callable[[str, sql.Composable, sql.Composable], sql.Composable]

# When a counter may start again lower (GREATEST keeps the larger only while neither holds): the row's
# expiry has passed, so the key that counted it has expired since and the app's count began anew (a
# stats key whose TTL only activity renews); or the row is as a bulk batch of this same key wrote it
# (sealed, unchanged since), whose read came before this one (a key deleted and made again between
# runs). A row the app wrote through the dual-write service has no seal: a batch's older read arriving
# after it does not lower it; nor does a batch of another key of the row (greatest as a merge of two).
RESTARTED = sql.SQL("(t.expires_at <= now() OR (t.row_seal IS NOT NULL AND t.source_key = EXCLUDED.source_key))")

# How rows naming an entity by a legacy id (an app's own id, an email) find its new id in
# legacy_id_map: emails case-folded, as the map stores them.
# What a table's rows become when their key goes (TableRule.on_delete).
ON_DELETE = ("delete", "mark")

LEGACY_KEY = "CASE WHEN position('@' IN {ref}) > 0 THEN lower({ref}) ELSE {ref} END"


@dataclass(frozen=True)
class TableRule:
    name: str
    greatest: tuple[str, ...] = ()  # counters within their period
    coalesce: tuple[str, ...] = ()  # lookups filled from more than one key
    version: str | None = None  # the document's own updated time
    # What `migrator follow` does to a row once its key is deleted, expires or is evicted (or no
    # longer gives it): "delete" it, or "mark" it, keeping it with `deleted_at` set (the table then
    # has that column; a key that comes back clears it).
    on_delete: str = "delete"
    deleted_at: str = "deleted_at"

    def __post_init__(self) -> None:
        if self.on_delete not in ON_DELETE:
            raise ValueError(f"table {self.name}: on_delete must be one of {', '.join(ON_DELETE)}, not {self.on_delete!r}")

    def merged(self, column: str, latest: bool = False) -> sql.Composable:
        """The value a write leaves in `column`. `latest`: the writer holds the key's latest value
        (`migrator follow`, one applier per key, reading it now), which a counter takes even lower."""
        col, new = sql.SQL("t.") + sql.Identifier(column), sql.SQL("EXCLUDED.") + sql.Identifier(column)
        if column in self.greatest and latest:
            return new
        if column in self.greatest:
            return sql.SQL("CASE WHEN {} THEN {} ELSE GREATEST({}, {}) END").format(RESTARTED, new, col, new)
        if column in self.coalesce:
            return sql.SQL("COALESCE({}, {})").format(new, col)
        return new

    def upsert(self, columns: Sequence[str], types: Mapping[str, tuple[str, ...]],
               unretired: Unretired | None = None, linked: frozenset[str] = frozenset(),
               staged: str | None = None, latest: bool = False) -> sql.Composed:
        """INSERT ... ON CONFLICT (id) DO UPDATE of rows given as one JSON array ($1) of arrays,
        or (`staged`) as the rows of that temporary table, each the text of one such array (`doc`),
        each holding the values of `columns` in that order; `types` gives each column's type name
        and category, from the catalog (see Writer). Fenced, given `unretired` (a bulk batch's): a
        row follow read since the transaction began is left as it is (FENCE), and one it deleted
        since is not made again.

        A row's seal (ROW_SEAL, when among `columns`) is kept from the write only when the row ends as
        it was sent: its merged content is the sent content (the `linked` columns aside, which the
        seal leaves out) and the row was a key's (an app's own row taken over may hold columns the
        write leaves alone); else the row has none.

        Positional arrays cost PostgreSQL a third of what objects through jsonb_populate_recordset
        did to parse (no key per value to sort and look up), and each value still goes through its
        type's input function from text, as populate_record's did.
        """
        content = [c for c in columns if c not in VOLATILE]
        updates = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(c), self.sealed(content, linked, latest) if c == ROW_SEAL
                                      else self.merged(c, latest))
            for c in columns if c != "id"
        )
        changed = sql.SQL("({}) IS DISTINCT FROM ({})").format(
            sql.SQL(", ").join(as_written(sql.SQL("t.") + sql.Identifier(c), types[c]) for c in content),
            sql.SQL(", ").join(as_written(self.merged(c, latest), types[c]) for c in content),
        )
        if "expires_at" in columns:  # (a TTL the app set, moved or removed since: the row follows it)
            changed = sql.SQL("({} OR {})").format(changed, expiry_moved("EXCLUDED"))
        # (a row no key wrote, the app's own, is taken over even when it says the same: its
        # provenance then says which key it is, and a rollback puts it back as it was)
        guard = sql.SQL("({} OR t.source_key IS NULL)").format(changed) if "source_key" in columns else changed
        if self.version and self.version in columns:
            v = sql.Identifier(self.version)
            guard = sql.SQL("(t.{} IS NULL OR EXCLUDED.{} >= t.{}) AND ").format(v, v, v) + changed
        values = [_element(i, c, types[c], self.name) for i, c in enumerate(columns)]
        # (OFFSET 0: each staged row's text parsed once, not once per column)
        rows = sql.SQL("jsonb_array_elements($1::jsonb) AS r") if staged is None else \
            sql.SQL("(SELECT doc::jsonb AS r FROM pg_temp.{} OFFSET 0) AS s").format(sql.Identifier(staged))
        kept = sql.SQL("")
        if unretired is not None:
            guard = FENCE + sql.SQL(" AND ") + guard
            kept = sql.SQL(" WHERE ") + unretired(self.name, values[columns.index("id")],
                                                  values[columns.index("source_key")])
        return sql.SQL(
            "INSERT INTO {table} AS t ({cols}) SELECT {values} FROM {rows}{kept}"
            " ON CONFLICT (id) DO UPDATE SET {updates} WHERE {guard}"
        ).format(
            table=sql.Identifier(self.name),
            cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
            values=sql.SQL(", ").join(values),
            rows=rows,
            kept=kept,
            updates=updates,
            guard=guard,
        )

    def sealed(self, content: Sequence[str], linked: frozenset[str], latest: bool = False) -> sql.Composable:
        """The seal an updated row keeps: the sent one when the merge left the sent content as it was
        (only GREATEST and COALESCE columns can make it otherwise), else none."""
        merging = [c for c in content if c not in linked and (c in self.greatest or c in self.coalesce)]
        same = sql.SQL("t.source_key IS NOT NULL")
        if merging:
            same += sql.SQL(" AND ({}) IS NOT DISTINCT FROM ({})").format(
                sql.SQL(", ").join(self.merged(c, latest) for c in merging),
                sql.SQL(", ").join(sql.SQL("EXCLUDED.") + sql.Identifier(c) for c in merging))
        return sql.SQL("CASE WHEN {} THEN EXCLUDED.{} END").format(same, sql.Identifier(ROW_SEAL))

    def compare(self, columns: Sequence[str], types: Mapping[str, tuple[str, ...]], *, provenances: Sequence[str],
                links: Mapping[str, Sequence[str]] | None = None, since: str | None = None, unknown: Sequence[str] = ()) -> sql.Composed:
        """A read-only statement over rows given as the writer gives them ($1: `columns`, the
        expected source_key and source_digest among them, and expires_at when the table has it):
        how many of them are found under the key that expects them, and the rows that are missing
        or differ, as [id, key, kind, [columns]].

        Every column of the table is compared but the provenance and the `unknown` ones (another
        key of the row fills them; the writer's COALESCE keeps them): one the rows leave out must
        hold its default, and a column linked through legacy_id_map (`links`: linked column -> the
        row's reference columns) must hold the entity the map names.
        Counters and documents must be equal: whether a difference is the app's (the key's value
        moved since the row was written, or the document's `version` is newer than `since`) or
        the row's own is said by `kind`: changed, or different.
        """
        cast = {c: _element(i, c, types[c], self.name) for i, c in enumerate(columns)}
        t = lambda c: sql.SQL("t.") + sql.Identifier(c)  # noqa: E731
        e = lambda c: sql.SQL("e.") + sql.Identifier(c)  # noqa: E731
        same: list[tuple[str, sql.Composable]] = []
        for c in columns:
            if c in VOLATILE or c in unknown:
                continue
            if links and c in links:
                # the entity the map names (the link step's rule), unless the record names one itself
                found = [sql.SQL("(SELECT m.entity_id FROM legacy_id_map m WHERE m.legacy_id = {})").format(
                    sql.SQL(LEGACY_KEY).format(ref=t(ref))) for ref in links[c]]
                expected = sql.SQL("COALESCE({})").format(sql.SQL(", ").join([e(c), *found]))
                same.append((c, sql.SQL("{} IS NOT DISTINCT FROM {}").format(t(c), expected)))
            else:  # a lookup column too: one the record cannot know is in `unknown`
                same.append((c, sql.SQL("{} IS NOT DISTINCT FROM {}").format(as_written(t(c), types[c]),
                                                                             as_written(e(c), types[c]))))
        for c, column_type in types.items():
            default = column_type[2]
            if c in columns or c in VOLATILE or c in unknown or default and "(" in default:
                continue  # (a default computed when the row was made, such as now(), cannot be checked)
            same.append((c, sql.SQL("{} IS NOT DISTINCT FROM {}").format(t(c), sql.SQL(default or "NULL"))))
        # every pattern writing this table stamps its own source; any of them is right
        same.append(("metadata", sql.SQL("t.metadata = ANY({}::jsonb[])").format(sql.Literal(list(provenances)))))
        content = sql.SQL(" AND ").join(s for _, s in same)
        if "expires_at" in columns:  # the TTL the key has now (a row another key wrote last has that key's)
            same.append(("expires_at", sql.SQL("(t.source_key IS DISTINCT FROM e.source_key OR NOT {})").format(
                expiry_moved("e"))))
        whole = sql.SQL(" AND ").join(s for _, s in same)
        newer = sql.SQL("false")
        if since is not None and self.version in columns:
            newer = sql.SQL("{} > {}::timestamptz").format(e(self.version), sql.Literal(since))
        # (a row whose content holds and whose expiry moved: the app set, moved or removed the key's
        # TTL since the row was written, as sessions and caches do on every read)
        kind = sql.SQL(
            "CASE WHEN t.id IS NULL THEN CASE WHEN {newer} THEN 'changed' ELSE 'missing' END"
            " WHEN t.source_digest IS DISTINCT FROM e.source_digest OR {newer} OR ({content}) THEN 'changed'"
            " ELSE 'different' END"
        ).format(newer=newer, content=content)
        differing = sql.SQL("array_remove(ARRAY[{}], NULL)").format(sql.SQL(", ").join(
            sql.SQL("CASE WHEN NOT ({}) THEN {} END").format(s, sql.Literal(c)) for c, s in same))
        return sql.SQL(
            "SELECT count(*) FILTER (WHERE t.source_key = e.source_key),"
            " coalesce(jsonb_agg(jsonb_build_array(e.id, e.source_key, {kind}, {differing}))"
            " FILTER (WHERE t.id IS NULL OR NOT ({whole})), '[]')"
            " FROM (SELECT {values} FROM jsonb_array_elements($1::jsonb) AS r) AS e"
            " LEFT JOIN {table} AS t ON t.id = e.id"
        ).format(
            kind=kind, differing=differing, whole=whole, table=sql.Identifier(self.name),
            values=sql.SQL(", ").join(sql.SQL("{} AS {}").format(cast[c], sql.Identifier(c)) for c in columns),
        )


def as_written(value: sql.Composable, column_type: tuple[str, ...]) -> sql.Composable:
    """A value as compared for a change: a numeric by its text, whose scale is part of what was written
    (19.90 and 19.9 are equal numbers, and a row holding the one for the other would go unnoticed)."""
    return sql.SQL("{}::text").format(value) if column_type[0] == "numeric" else value


def _element(index: int, column: str, column_type: tuple[str, ...], table: str) -> sql.Composable:
    """Element `index` of row `r` as a value of the column's type; a JSON null is SQL NULL, as
    jsonb_populate_record had it, json and jsonb columns included."""
    type_name, category = column_type[:2]  # format_type() and typcategory from the catalog
    if type_name in ("jsonb", "json"):
        return sql.SQL("NULLIF(r -> {}, 'null')::{}").format(sql.Literal(index), sql.SQL(type_name))
    if category in ("A", "C"):  # a JSON array or object: populate_record's own conversion
        return sql.SQL("(jsonb_populate_record(NULL::{t}, jsonb_build_object({c}, r -> {i}))).{col}").format(
            t=sql.Identifier(table), c=sql.Literal(column), i=sql.Literal(index), col=sql.Identifier(column))
    # type_name is catalog text, quoted where it needs to be
    return sql.SQL("(r ->> {})::{}").format(sql.Literal(index), sql.SQL(type_name))
