"""The run ledger in PostgreSQL, and every query of it: runs and their state, planned batches and
their leases, per-pattern counts, dead letters, verdicts, the journal exact rollback reads, and
verifications. Other modules decide; only this one reads or writes the ledger's tables
(migrator/core/sql/001_ledger.sql, 006_verify.sql, 008_fencing.sql, 013_verify_progress.sql, 015_spool.sql).
"""
from __future__ import annotations

import io
from contextlib import contextmanager
import os
import re
import struct
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator

import orjson
import psycopg2
from psycopg2 import sql
from psycopg2.extras import execute_values

from migrator.core.options import RunOptions
from migrator.core.partition import KeyRange
from migrator.core.redact import redact_text
from migrator.core.values import UUID

# The ledger tables a run writes (migrator/core/sql/001_ledger.sql), besides the tables of its mapping.
TABLES = ("migration_runs", "migration_batches", "migration_dead_letters", "migration_validations", "migration_journal",
          "migration_verifications", "migration_verify_ranges", "migration_follow", "migration_reconciliations",
          "migration_spool_ranges", "migration_spool", "migration_retired")

# Seconds between a running batch's heartbeats (migrator/core/lease.py); a batch silent for six of
# them is stale: its worker died, or is cut off.
HEARTBEAT_SECONDS = float(os.environ.get("MIGRATOR_HEARTBEAT_SECONDS") or 5)
STALE_SECONDS = 6 * HEARTBEAT_SECONDS
# Whether a batch is running with a heartbeat older than STALE_SECONDS (over migration_batches b).
STALE_SQL = ("(b.status = 'running' AND (b.heartbeat_at IS NULL"
             " OR b.heartbeat_at < clock_timestamp() - make_interval(secs => %(stale)s)))")

COUNT_FIELDS = ("scanned", "migrated", "skipped", "dead", "expired")
# ...plus the target rows the migrated keys became (a zset key may become many rows), and the
# references the keys read made (mapping.Reference) and those of them that dangle.
TALLY_FIELDS = (*COUNT_FIELDS, "rows", "references", "dangling")
# Where a batch's time goes (migration_batches.timings, seconds): "write" runs in a thread
# beside the others; "write_wait" is the part of it the batch waited for; "throttle" is
# time slept under --max-keys-per-sec.
STAGES = ("scan", "read", "transform", "write", "write_wait", "throttle")


@dataclass
class PatternCounts:
    """Per-pattern tallies of one batch; scanned = migrated + skipped + dead + expired."""

    by_pattern: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, pattern: str, outcome: str, n: int = 1, rows: int = 0) -> None:
        counts = self.by_pattern.get(pattern)  # (not setdefault: its default would be built per key)
        if counts is None:
            counts = self.by_pattern[pattern] = dict.fromkeys(TALLY_FIELDS, 0)
        counts["scanned"] += n
        counts[outcome] += n
        counts["rows"] += rows

    def note(self, pattern: str, field: str, n: int = 1) -> None:
        """Count something of the pattern's keys that is not an outcome (references, dangling)."""
        counts = self.by_pattern.get(pattern)
        if counts is None:
            counts = self.by_pattern[pattern] = dict.fromkeys(TALLY_FIELDS, 0)
        counts[field] += n

    def total(self, outcome: str) -> int:
        return sum(c[outcome] for c in self.by_pattern.values())


@dataclass(frozen=True)
class BatchSpec:
    id: int
    run_id: str
    priority: str
    key_range: KeyRange
    options: RunOptions
    mapping: str


# --- runs ------------------------------------------------------------------------------------

def create_run(cur: Any, run_id: str, mapping: str, options: RunOptions, source: str, redis_run_id: str | None,
               mapping_spec: str, mapping_digest: str) -> None:
    cur.execute(
        "INSERT INTO migration_runs (id, status, mapping, dry_run, options, source, redis_run_id, started_at,"
        " mapping_spec, mapping_digest) VALUES (%s, 'running', %s, %s, %s, %s, %s, now(), %s, %s)",
        (run_id, mapping, options.dry_run, orjson.dumps(options.to_json()).decode(), source, redis_run_id,
         mapping_spec, mapping_digest),
    )


def latest_run(cur: Any) -> str | None:
    """The newest run that was not a dry run (a follow session is not a run of the keyspace)."""
    cur.execute("SELECT id FROM migration_runs WHERE NOT dry_run AND kind = 'run' ORDER BY created_at DESC LIMIT 1")
    row = cur.fetchone()
    return str(row[0]) if row else None


RUN_ID = re.compile(UUID)


def require_run(cur: Any, run_id: str) -> dict[str, Any]:
    """The run's row; a LookupError naming the runs the ledger holds when `run_id` is not one of
    them, or not a run id at all (asked before the query, which would fail on it)."""
    if not RUN_ID.fullmatch(run_id):
        raise LookupError(f"{run_id!r} is not a run id (a UUID, as `migrator run` prints it); {known_runs(cur)}")
    run = get_run(cur, run_id)
    if run is None:
        raise LookupError(f"no run {run_id} in the ledger; {known_runs(cur)}; is DATABASE_URL the run's database?")
    return run


def known_runs(cur: Any, shown: int = 5) -> str:
    """The latest runs, to choose from in a message."""
    cur.execute("SELECT id, status, to_char(created_at, 'YYYY-MM-DD HH24:MI'), count(*) OVER ()"
                " FROM migration_runs ORDER BY created_at DESC LIMIT %s", (shown,))
    rows = cur.fetchall()
    if not rows:
        return "the ledger holds no run yet (`migrator run` starts one)"
    more = f" (and {rows[0][3] - len(rows):,} older)" if rows[0][3] > len(rows) else ""
    return "latest runs: " + ", ".join(f"{r} ({status}, {at})" for r, status, at, _ in rows) + more


def get_run(cur: Any, run_id: str) -> dict[str, Any] | None:
    cur.execute(
        "SELECT id, status, mapping, dry_run, options, source, created_at, started_at, finished_at, error, redis_run_id,"
        " mapping_spec, mapping_digest FROM migration_runs WHERE id = %s",
        (run_id,),
    )
    row = cur.fetchone()
    if row is None:
        return None
    keys = ("run_id", "status", "mapping", "dry_run", "options", "source", "created_at", "started_at", "finished_at", "error",
            "redis_run_id", "mapping_spec", "mapping_digest")
    return dict(zip(keys, row))


def run_status(cur: Any, run_id: str) -> str | None:
    """A run's state (None: no such run)."""
    cur.execute("SELECT status FROM migration_runs WHERE id = %s", (run_id,))
    row = cur.fetchone()
    return row[0] if row else None


def lock_run(cur: Any, run_id: str) -> str | None:
    """A run's state, its row locked until the transaction ends so that no one else moves it
    meanwhile (None: no such run)."""
    cur.execute("SELECT status FROM migration_runs WHERE id = %s FOR UPDATE", (run_id,))
    row = cur.fetchone()
    return row[0] if row else None


def set_run_status(cur: Any, run_id: str, status: str, *, fence_moves: bool, error: str | None, ends: bool) -> None:
    """Record the state migrator/core/runstate.py moved a run to: its fence moved on or not; `error`
    kept (None keeps the one there; `running` clears it); its end stamped when the state `ends`
    it (`running` clears that too)."""
    cur.execute(
        "UPDATE migration_runs SET status = %s, fence = fence + %s,"
        " error = CASE WHEN %s = 'running' THEN NULL ELSE COALESCE(%s, error) END,"
        " finished_at = CASE WHEN %s THEN now() WHEN %s = 'running' THEN NULL ELSE finished_at END WHERE id = %s",
        (status, int(fence_moves), status, error, ends, status, run_id),
    )


def hold_run(cur: Any, run_id: str) -> tuple[str, int] | None:
    """A run's state and fence, its row held (FOR SHARE) until the transaction ends: its state
    cannot change before this transaction's writes commit (None: no such run)."""
    cur.execute("SELECT status, fence FROM migration_runs WHERE id = %s FOR SHARE", (run_id,))
    return cur.fetchone()


def dispatch_of(cur: Any, run_id: str) -> int:
    """The number of the latest sending of a run's batches to the workers."""
    cur.execute("SELECT dispatch FROM migration_runs WHERE id = %s", (run_id,))
    return cur.fetchone()[0]


def next_dispatch(cur: Any, run_id: str) -> int:
    """Number a new sending of a run's batches to the workers: an earlier chord of the run, still
    waiting on a batch taken over since, then ends quietly."""
    cur.execute("UPDATE migration_runs SET dispatch = dispatch + 1 WHERE id = %s RETURNING dispatch", (run_id,))
    return cur.fetchone()[0]


def rescan_priority(cur: Any, run_id: str, priority: str, redis_run_id: str) -> int:
    """The source restarted: every batch of `priority` runs again, on the new server process."""
    cur.execute("UPDATE migration_runs SET redis_run_id = %s WHERE id = %s", (redis_run_id, run_id))
    cur.execute("UPDATE migration_batches SET status = 'pending' WHERE run_id = %s AND priority = %s",
                (run_id, priority))
    return cur.rowcount


# --- batches ---------------------------------------------------------------------------------

def plan_batches(cur: Any, run_id: str, priorities: Iterable[str], ranges: list[KeyRange]) -> None:
    """Record every (priority, range) batch before any of them runs."""
    execute_values(
        cur,
        "INSERT INTO migration_batches (run_id, priority, node, range_index, range_count, range_start, range_end)"
        " VALUES %s ON CONFLICT (run_id, priority, node, range_index) DO NOTHING",
        [(run_id, p, r.node, r.index, r.count, r.start, r.end) for p in priorities for r in ranges],
    )


def record_keys_planned(cur: Any, run_id: str, keys: int) -> None:
    """The keyspace's size as the run is planned: what each priority's pass is expected to walk
    (migrator/views/progress.py)."""
    cur.execute("UPDATE migration_runs SET keys_planned = %s WHERE id = %s", (keys, run_id))


def keys_walked(cur: Any, run_id: str) -> tuple[int | None, dict[str, int]]:
    """A run's keys planned (None: not recorded) and its keys walked so far, by priority."""
    cur.execute("SELECT r.keys_planned, b.priority, sum(b.keys_walked) FROM migration_runs r"
                " JOIN migration_batches b ON b.run_id = r.id WHERE r.id = %s GROUP BY 1, 2", (run_id,))
    found = cur.fetchall()
    planned = found[0][0] if found else None
    return planned, {priority: int(n) for _, priority, n in found}


def unfinished_batches(cur: Any, run_id: str, priority: str) -> list[tuple[int, str, int, int]]:
    """A priority's batches not done yet, in range order: (id, node, range index, range count)."""
    cur.execute("SELECT id, node, range_index, range_count FROM migration_batches WHERE run_id = %s AND priority = %s"
                " AND status <> 'done' ORDER BY node, range_index", (run_id, priority))
    return cur.fetchall()


def reopen_batches(cur: Any, run_id: str, batch_ids: list[int] | None = None) -> list[tuple[int, str]]:
    """Put batches back to pending for a requeue: the given ones, or every failed or stale one.
    A batch a live worker is running is left to it."""
    chosen = (f"b.id = ANY(%(ids)s) AND (b.status <> 'running' OR {STALE_SQL})" if batch_ids
              else f"(b.status = 'failed' OR {STALE_SQL})")
    # (a stale batch stays `running`, without a heartbeat: anyone may take it over, though its
    # lost worker's session may still hold the batch's lock)
    cur.execute(f"UPDATE migration_batches b SET status = CASE b.status WHEN 'running' THEN 'running' ELSE 'pending' END,"
                f" error = NULL, heartbeat_at = NULL WHERE b.run_id = %(run)s AND {chosen} RETURNING b.id, b.priority",
                {"run": run_id, "ids": batch_ids or [], "stale": STALE_SECONDS})
    return cur.fetchall()


def set_task_ids(cur: Any, tasks: list[tuple[int, str]]) -> None:
    """The Celery task each batch was last sent as, (batch id, task id): `cancel` revokes them while they wait."""
    execute_values(cur, "UPDATE migration_batches b SET task_id = v.task FROM (VALUES %s) AS v (id, task)"
                        " WHERE b.id = v.id", tasks)


def queued_tasks(cur: Any, run_id: str) -> list[str]:
    """The tasks of a run's batches not done yet that were sent to the workers (none for a --local run)."""
    cur.execute("SELECT task_id FROM migration_batches WHERE run_id = %s AND status <> 'done' AND task_id IS NOT NULL",
                (run_id,))
    return [row[0] for row in cur.fetchall()]


CLAIM = f"""
UPDATE migration_batches b SET status = 'running', attempts = b.attempts + 1, started_at = clock_timestamp(),
       heartbeat_at = clock_timestamp(), worker = %(worker)s, error = NULL, keys_walked = 0
FROM migration_runs r
WHERE b.id = %(id)s AND r.id = b.run_id AND r.status = 'running' AND b.status <> 'done'
  AND (%(locked)s OR {STALE_SQL})
RETURNING b.run_id, b.priority, b.range_index, b.range_count, b.range_start, b.range_end, b.node, r.options, r.mapping,
          b.attempts, r.fence
"""


def claim_batch(cur: Any, batch_id: int, worker: str, locked: bool) -> tuple[BatchSpec, int, int] | None:
    """Mark a batch running for `worker` when it may be taken (migrator/core/lease.py): its run is
    running, it is not done, and this session holds its lock (`locked`) or it is stale. Its spec,
    its attempt number and its run's fence; None when it may not be taken."""
    cur.execute(CLAIM, {"worker": worker, "locked": locked, "stale": STALE_SECONDS, "id": batch_id})
    row = cur.fetchone()
    if row is None:
        return None
    run_id, priority, index, count, start, end, node, options, mapping, attempt, fence = row
    spec = BatchSpec(batch_id, str(run_id), priority, KeyRange(index, count, int(start), int(end), node),
                     RunOptions.from_json(options), mapping)
    return spec, attempt, fence


def batch_state(cur: Any, batch_id: int) -> tuple[str, str] | None:
    """A batch's status and its run's (None: no such batch)."""
    cur.execute("SELECT b.status, r.status FROM migration_batches b JOIN migration_runs r ON r.id = b.run_id"
                " WHERE b.id = %s", (batch_id,))
    return cur.fetchone()


def lock_attempt(cur: Any, batch_id: int) -> int | None:
    """A batch's attempt number, its row locked until the transaction ends (None: no such batch)."""
    cur.execute("SELECT attempts FROM migration_batches WHERE id = %s FOR UPDATE", (batch_id,))
    row = cur.fetchone()
    return row[0] if row else None


HEARTBEAT = """
UPDATE migration_batches b SET heartbeat_at = clock_timestamp(), keys_walked = %s FROM migration_runs r
WHERE b.id = %s AND b.attempts = %s AND b.status = 'running' AND r.id = b.run_id
RETURNING r.status, r.fence
"""


def heartbeat(cur: Any, batch_id: int, attempt: int, walked: int) -> tuple[str, int] | None:
    """A running batch's attempt says it is alive, with its keys walked so far (what progress
    counts, so it moves within a long range): its run's state and fence, or None when the batch
    is no longer that attempt's (another worker took it over)."""
    cur.execute(HEARTBEAT, (walked, batch_id, attempt))
    return cur.fetchone()


def give_back(cur: Any, batch_id: int, attempt: int, reason: str) -> None:
    """A batch stopped before its end: pending again, if `attempt` still runs it."""
    cur.execute("UPDATE migration_batches SET status = 'pending', heartbeat_at = NULL, error = %s"
                " WHERE id = %s AND attempts = %s AND status = 'running'", (reason, batch_id, attempt))


def live_batches(cur: Any, run_id: str) -> int:
    """A run's batches running with a heartbeat that has not stopped."""
    cur.execute(f"SELECT count(*) FROM migration_batches b WHERE b.run_id = %(run)s AND b.status = 'running'"
                f" AND NOT {STALE_SQL}", {"run": run_id, "stale": STALE_SECONDS})
    return cur.fetchone()[0]


def finish_batch(cur: Any, batch_id: int, counts: PatternCounts, rows_written: int, checksum: str,
                 timings: dict[str, float], dangling: dict[str, list[dict[str, Any]]], walked: int,
                 seals: dict[str, dict[str, list[int]]]) -> None:
    """Mark a batch done with its tallies, examples of its dangling references per pattern, its
    keys walked (its heartbeat wrote them so far) and the figures of the seals it wrote (seal.Figures)."""
    cur.execute(
        "UPDATE migration_batches SET status = 'done', finished_at = clock_timestamp(), keys_scanned = %s, keys_migrated = %s,"
        " keys_skipped = %s, keys_dead = %s, keys_expired = %s, rows_written = %s, pattern_counts = %s, checksum = %s,"
        " timings = %s, dangling = %s, keys_walked = %s, seals = %s WHERE id = %s",
        (*(counts.total(f) for f in COUNT_FIELDS), rows_written, orjson.dumps(counts.by_pattern).decode(), checksum,
         orjson.dumps(timings).decode(), orjson.dumps(dangling).decode(), walked, orjson.dumps(seals).decode(), batch_id),
    )


def batch_seals(cur: Any, run_id: str, priority: str) -> list[dict[str, dict[str, list[int]]]]:
    """The seal figures of a priority's done batches (seal.Figures), one per batch."""
    cur.execute("SELECT seals FROM migration_batches WHERE run_id = %s AND priority = %s AND status = 'done'",
                (run_id, priority))
    return [seals for (seals,) in cur.fetchall()]


def refuse_batch(cur: Any, batch_id: int, error: str) -> None:
    """A worker that cannot run a batch it was sent (another mapping than the run's) says why,
    unless the batch is done or another worker runs it."""
    cur.execute("UPDATE migration_batches SET status = 'failed', error = %s WHERE id = %s AND status IN ('pending', 'failed')",
                (error, batch_id))


def fail_batch(cur: Any, batch_id: int, attempt: int, error: str) -> None:
    """Record a batch's failure, unless another worker has taken it over since (`attempt`)."""
    cur.execute(
        "UPDATE migration_batches SET status = 'failed', finished_at = clock_timestamp(), heartbeat_at = NULL, error = %s"
        " WHERE id = %s AND attempts = %s",
        (error, batch_id, attempt),
    )


def batches(cur: Any, run_id: str) -> list[dict[str, Any]]:
    """Every batch of a run; `stale`: running, but its heartbeat stopped (`silent_s` ago)."""
    cur.execute(
        "SELECT b.id, b.priority, b.node, b.range_index, b.range_count, b.status, b.attempts, b.keys_scanned,"
        " b.keys_migrated, b.keys_skipped, b.keys_dead, b.keys_expired, b.rows_written, b.pattern_counts, b.error,"
        " EXTRACT(EPOCH FROM (b.finished_at - b.started_at)), b.started_at, b.finished_at, b.dangling, b.worker,"
        f" {STALE_SQL}, EXTRACT(EPOCH FROM clock_timestamp() - COALESCE(b.heartbeat_at, b.started_at))"
        " FROM migration_batches b WHERE b.run_id = %(run)s"
        " ORDER BY array_position(ARRAY['critical','high','medium','low'], b.priority), b.node, b.range_index",
        {"run": run_id, "stale": STALE_SECONDS},
    )
    keys = ("id", "priority", "node", "range_index", "range_count", "status", "attempts", "scanned", "migrated", "skipped",
            "dead", "expired", "rows_written", "pattern_counts", "error", "seconds", "started_at", "finished_at", "dangling",
            "worker", "stale", "silent_s")
    rows = [dict(zip(keys, row)) for row in cur.fetchall()]
    for row in rows:
        for f in ("seconds", "silent_s"):
            row[f] = float(row[f]) if row[f] is not None else None
    return rows


def stage_seconds(cur: Any, run_id: str) -> dict[str, float]:
    """Seconds per stage over every done batch of a run (see STAGES)."""
    cur.execute(
        "SELECT s.stage, sum((b.timings ->> s.stage)::float8) FROM migration_batches b,"
        " unnest(%s::text[]) AS s(stage) WHERE b.run_id = %s AND b.status = 'done' GROUP BY s.stage",
        (list(STAGES), run_id),
    )
    found = dict(cur.fetchall())
    return {stage: round(found.get(stage) or 0.0, 3) for stage in STAGES}


def dangling_examples(batches: list[dict[str, Any]], pattern: str, limit: int = 5) -> list[dict[str, Any]]:
    """A few of a pattern's dangling references, over batches (ledger.batches rows)."""
    found: list[dict[str, Any]] = []
    for batch in batches:
        found += (batch.get("dangling") or {}).get(pattern, [])
    return found[:limit]


def pattern_totals(batches: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per-pattern counts summed over batches."""
    totals: dict[str, dict[str, int]] = {}
    for batch in batches:
        for name, counts in batch["pattern_counts"].items():
            into = totals.setdefault(name, dict.fromkeys(TALLY_FIELDS, 0))
            for f in TALLY_FIELDS:
                into[f] += counts.get(f, 0)
    return totals


def batch_ranges(cur: Any, run_id: str, priority: str) -> list[KeyRange]:
    """The cursor ranges a priority's batches were planned over, in range order."""
    cur.execute("SELECT range_index, range_count, range_start, range_end, node FROM migration_batches"
                " WHERE run_id = %s AND priority = %s ORDER BY node, range_index", (run_id, priority))
    return [KeyRange(index, count, int(start), int(end), node) for index, count, start, end, node in cur.fetchall()]


# --- the spool: one SCAN of each range, for the run's later passes (migrator/core/spool.py) -----

SPOOL_TABLE = "migration_spool"  # the table of the keys themselves, named to operators (VACUUM FULL)
SPOOL_RANGE = "run_id = %(run)s AND node = %(node)s AND range_count = %(count)s AND range_index = %(index)s"

COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"  # COPY's binary format starts so
JSONB_VERSION = b"\x01"  # jsonb's binary form: this byte, then the JSON text


def _spool_key(run_id: str, key_range: KeyRange) -> dict[str, Any]:
    return {"run": run_id, "node": key_range.node, "count": key_range.count, "index": key_range.index,
            "start": key_range.start, "end": key_range.end}


def write_spool(cur: Any, run_id: str, key_range: KeyRange, source_process: str | None, walked: int,
                chunks: list[tuple[str, int, int, bytes, bytes, dict[str, int]]]) -> None:
    """A range's spool, replacing the one kept before (a batch run again): (priority, chunk number,
    keys, lengths, packed keys, keys per pattern) per chunk. In the caller's transaction: a batch
    that fails leaves none of it."""
    where = _spool_key(run_id, key_range)
    cur.execute(f"DELETE FROM migration_spool_ranges WHERE {SPOOL_RANGE}", where)  # (its chunks cascade)
    cur.execute("INSERT INTO migration_spool_ranges (run_id, node, range_count, range_index, range_start, range_end,"
                " source_process, keys_walked, keys_spooled, bytes_spooled) VALUES (%(run)s, %(node)s, %(count)s,"
                " %(index)s, %(start)s, %(end)s, %(process)s, %(walked)s, %(keys)s, %(bytes)s)",
                {**where, "process": source_process, "walked": walked, "keys": sum(c[2] for c in chunks),
                 "bytes": sum(len(c[3]) + len(c[4]) for c in chunks)})
    # by COPY's binary format: as bytea literals, the packed keys cost PostgreSQL 1.4 µs per key to
    # read (hex, twice their size, through the SQL lexer); as they are, a tenth of that (measured)
    run, node, count, index = uuid.UUID(run_id).bytes, key_range.node.encode(), _int4(key_range.count), _int4(key_range.index)
    cur.copy_expert("COPY migration_spool (run_id, node, range_count, range_index, priority, chunk, keys, lengths, packed,"
                    " counts) FROM STDIN WITH (FORMAT binary)",
                    io.BytesIO(copy_binary((run, node, count, index, priority.encode(), _int4(n), _int4(keys), lengths, packed,
                                            JSONB_VERSION + orjson.dumps(counts))
                                           for priority, n, keys, lengths, packed, counts in chunks)))


def _int4(n: int) -> bytes:
    return struct.pack("!i", n)


def copy_binary(rows: Iterable[tuple[bytes, ...]]) -> bytes:
    """Rows in COPY's binary format, each field given in its type's binary form (no NULLs)."""
    parts = [COPY_SIGNATURE + struct.pack("!ii", 0, 0)]
    for row in rows:
        parts.append(struct.pack("!h", len(row)))
        for value in row:
            parts += [struct.pack("!i", len(value)), value]
    parts.append(struct.pack("!h", -1))
    return b"".join(parts)


def copied_rows(data: bytes) -> list[list[bytes]]:
    """The rows of COPY ... TO STDOUT's binary format, each field as its type's binary form (no NULLs)."""
    if not data.startswith(COPY_SIGNATURE):
        raise ValueError("not COPY's binary format")
    pos = len(COPY_SIGNATURE) + 8 + struct.unpack_from("!i", data, len(COPY_SIGNATURE) + 4)[0]  # (past its header extension)
    rows = []
    while True:
        (fields,) = struct.unpack_from("!h", data, pos)
        pos += 2
        if fields == -1:
            return rows
        row = []
        for _ in range(fields):
            (size,) = struct.unpack_from("!i", data, pos)
            row.append(data[pos + 4 : pos + 4 + size])
            pos += 4 + size
        rows.append(row)


def _spool_range(cur: Any, where: dict[str, Any]) -> int | None:
    """The keys walked of a range's spool, if it was taken of this range on this server process."""
    cur.execute(f"SELECT keys_walked FROM migration_spool_ranges WHERE {SPOOL_RANGE} AND range_start = %(start)s"
                " AND range_end = %(end)s AND source_process IS NOT DISTINCT FROM %(process)s", where)
    found = cur.fetchone()
    return None if found is None else found[0]


def read_spool(cur: Any, run_id: str, key_range: KeyRange, priority: str,
               source_process: str | None) -> tuple[int, list[tuple[int, bytes, bytes]]] | None:
    """A range's spool of `priority`, if it was taken of this range on this server process: the keys
    its SCAN walked, and (keys, lengths, packed keys) per chunk in order; None when there is none."""
    where = {**_spool_key(run_id, key_range), "priority": priority, "process": source_process}
    walked = _spool_range(cur, where)
    if walked is None:
        return None
    # by COPY's binary format: a SELECT sends bytea as hex, which costs PostgreSQL (byteaout, twice
    # the bytes on the wire) and Python (decoding it) about a µs per key; this sends the bytes as they are
    out = io.BytesIO()
    cur.copy_expert(cur.mogrify(f"COPY (SELECT keys, lengths, packed FROM migration_spool WHERE {SPOOL_RANGE}"
                                " AND priority = %(priority)s ORDER BY chunk) TO STDOUT WITH (FORMAT binary)",
                                where).decode(), out)
    return walked, [(int.from_bytes(keys, "big", signed=True), lengths, packed)
                    for keys, lengths, packed in copied_rows(out.getvalue())]


def spool_counts(cur: Any, run_id: str, key_range: KeyRange, priority: str,
                 source_process: str | None) -> tuple[int, dict[str, int]] | None:
    """A range's spool of `priority`, if it was taken of this range on this server process, as the
    keys its SCAN walked and its keys per pattern (the sum of its chunks' counts); None when there
    is none, or a chunk of it has no counts (saved before they were kept: 020_spool_counts.sql)."""
    where = {**_spool_key(run_id, key_range), "priority": priority, "process": source_process}
    walked = _spool_range(cur, where)
    if walked is None:
        return None
    cur.execute(f"SELECT counts FROM migration_spool WHERE {SPOOL_RANGE} AND priority = %(priority)s", where)
    chunks = [counts for (counts,) in cur.fetchall()]
    if None in chunks:
        return None
    total: dict[str, int] = {}
    for counts in chunks:
        for name, n in counts.items():
            total[name] = total.get(name, 0) + n
    return walked, total


def drop_spool(cur: Any, run_id: str) -> None:
    """A run's spool, once nothing of the run reads it again (its chunks cascade)."""
    cur.execute("DELETE FROM migration_spool_ranges WHERE run_id = %s", (run_id,))


def spool_size(cur: Any, run_id: str) -> dict[str, int]:
    """What a run's spool holds now: ranges, key names and their bytes (names and lengths)."""
    cur.execute("SELECT count(*), coalesce(sum(keys_spooled), 0), coalesce(sum(bytes_spooled), 0)"
                " FROM migration_spool_ranges WHERE run_id = %s", (run_id,))
    return dict(zip(("ranges", "keys", "bytes"), map(int, cur.fetchone())))


# --- dead letters ----------------------------------------------------------------------------

def add_dead_letters(cur: Any, run_id: str, batch_id: int, letters: list[tuple]) -> None:
    """letters: (pattern, key bytes, key text, redis type, raw bytes, ttl ms, reason)."""
    if not letters:
        return
    execute_values(
        cur,
        "INSERT INTO migration_dead_letters (run_id, batch_id, pattern, redis_key, key_text, redis_type, raw_value, ttl_ms, error)"
        " VALUES %s ON CONFLICT (run_id, sha256(redis_key)) DO UPDATE SET batch_id = EXCLUDED.batch_id,"
        " raw_value = EXCLUDED.raw_value, error = EXCLUDED.error, created_at = now()",
        [(run_id, batch_id, *letter) for letter in letters],
    )


def dead_keys(cur: Any, run_id: str, keys: list[bytes]) -> set[bytes]:
    """Those of `keys` the run made dead letters (by their index: run and digest of the key)."""
    cur.execute("SELECT redis_key FROM migration_dead_letters WHERE run_id = %s"
                " AND sha256(redis_key) = ANY(ARRAY(SELECT sha256(k) FROM unnest(%s::bytea[]) k))",
                (run_id, [psycopg2.Binary(key) for key in keys]))
    return {bytes(row[0]) for row in cur.fetchall()}


def all_dead_keys(cur: Any, run_id: str, most: int) -> set[bytes] | None:
    """Every key the run made dead letters, if it made at most `most`; None if more."""
    cur.execute("SELECT redis_key FROM migration_dead_letters WHERE run_id = %s LIMIT %s", (run_id, most + 1))
    keys = {bytes(row[0]) for row in cur.fetchall()}
    return keys if len(keys) <= most else None


# A dead letter's reason, normalised so that reasons differing only by the key's data group
# together: row images and key values in PostgreSQL's detail, quoted values and numbers (hex,
# with thousands separators; not the digit of a name such as UTF-8) become placeholders.
# PostgreSQL double-quotes names, worth keeping, and values after a colon; Python does when the
# value holds an apostrophe. Applied in this order.
REASON_FORM = (
    (r"\(Failing row contains .*\)$", "(Failing row contains (…))"),
    (r"\)=\(.*\) (already exists|is not present|conflicts)", r")=(…) \1"),
    (': "[^"]*"', ': "…"'),
    ("\"[^\"]*'[^\"]*\"", '"…"'),
    (r"'[^']*'", "'…'"),
    (r"(?<![[:alpha:]]-)\m(0x[[:xdigit:]]+|[[:digit:]]+([.,][[:digit:]]+)*)\M", "N"),
)


def dead_reasons(cur: Any, run_id: str, top: int = 3) -> list[dict[str, Any]]:
    """Per priority and pattern: the dead letters and their `top` most frequent normalised reasons,
    most dead first. Grouped as stored, then masked (emails, IP addresses): what `status`, `report`
    and the dead-letter check show."""
    form = "d.error"
    for _ in REASON_FORM:
        form = f"regexp_replace({form}, %s, %s, 'g')"
    cur.execute(
        f"WITH letters AS (SELECT b.priority, d.pattern, {form} AS reason FROM migration_dead_letters d"
        "   LEFT JOIN migration_batches b ON b.id = d.batch_id WHERE d.run_id = %s),"
        " grouped AS (SELECT priority, pattern, reason, count(*) AS n,"
        "   sum(count(*)) OVER (PARTITION BY priority, pattern) AS dead,"
        "   row_number() OVER (PARTITION BY priority, pattern ORDER BY count(*) DESC, reason) AS rank"
        "   FROM letters GROUP BY priority, pattern, reason)"
        " SELECT priority, pattern, dead, reason, n FROM grouped WHERE rank <= %s"
        " ORDER BY array_position(ARRAY['critical','high','medium','low'], priority), dead DESC, pattern, rank",
        (*(arg for rule in REASON_FORM for arg in rule), run_id, top),
    )
    out: list[dict[str, Any]] = []
    for priority, pattern, dead, reason, n in cur.fetchall():
        if not out or (out[-1]["priority"], out[-1]["pattern"]) != (priority, pattern):
            out.append({"priority": priority, "pattern": pattern, "dead": int(dead), "dead_reasons": []})
        out[-1]["dead_reasons"].append({"reason": redact_text(reason), "count": n})
    return out


# --- verdicts --------------------------------------------------------------------------------

def record_validation(cur: Any, run_id: str, label: str, ok: bool, checks: list[dict[str, Any]]) -> None:
    """Keep a verdict: of a priority, or of the run as a whole (label "run"), with its checks."""
    cur.execute("INSERT INTO migration_validations (run_id, priority, ok, checks) VALUES (%s, %s, %s, %s)",
                (run_id, label, ok, orjson.dumps(checks).decode()))


def latest_validations(cur: Any, run_id: str) -> dict[str, tuple[bool, list[dict[str, Any]]]]:
    """Per priority (and "run"), its latest verdict: whether it passed, and its checks (one never
    validated is absent)."""
    cur.execute("SELECT DISTINCT ON (priority) priority, ok, checks FROM migration_validations WHERE run_id = %s"
                " ORDER BY priority, created_at DESC", (run_id,))
    return {label: (ok, checks) for label, ok, checks in cur.fetchall()}


def latest_verdicts(cur: Any, run_id: str) -> dict[str, bool]:
    """Per priority, whether its latest validation passed (priorities never validated are absent)."""
    return {label: ok for label, (ok, _) in latest_validations(cur, run_id).items()}


def first_unvalidated(cur: Any, run_id: str, order: list[str]) -> str | None:
    """The first priority (in run order) whose latest validation is missing or failed."""
    verdicts = latest_verdicts(cur, run_id)
    return next((p for p in order if not verdicts.get(p)), None)


# --- the journal: prior images of the rows a run changed (exact rollback, migrator/core/rollback.py) -

DELETE_INSERTED = sql.SQL(
    "DELETE FROM {t} WHERE migration_run = %(run)s AND NOT EXISTS"
    " (SELECT 1 FROM migration_journal j WHERE j.run_id = %(run)s AND j.table_name = %(name)s AND j.row_id = {t}.id)"
)
DELETE_CHANGED = sql.SQL(
    "DELETE FROM {t} USING migration_journal j"
    " WHERE j.run_id = %(run)s AND j.table_name = %(name)s AND j.row_id = {t}.id"
)
# Each prior image from its text, exactly (025_journal_text.sql), else from its JSON; every column but
# a generated one, an identity's own value kept.
RESTORE_CHANGED = sql.SQL(
    "INSERT INTO {t} ({cols}) OVERRIDING SYSTEM VALUE SELECT {values} FROM (SELECT CASE WHEN j.old_text IS NOT NULL"
    " THEN j.old_text::{t} ELSE jsonb_populate_record(NULL::{t}, j.old_row) END AS r"
    " FROM migration_journal j WHERE j.run_id = %(run)s AND j.table_name = %(name)s) AS s"
)
STORED_COLUMNS = ("SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped"
                  " AND attgenerated = '' ORDER BY attnum")


def undo_table(cur: Any, run_id: str, table: str) -> tuple[int, int]:
    """Put one table back as it was before a run: the rows it inserted deleted, the rows it changed
    given their journaled prior image again. (rows deleted, rows restored)"""
    params = {"run": run_id, "name": table}
    t = sql.Identifier(table)
    cur.execute(DELETE_INSERTED.format(t=t), params)
    deleted = cur.rowcount
    cur.execute(DELETE_CHANGED.format(t=t), params)
    cur.execute(STORED_COLUMNS, (sql.Identifier(table).as_string(cur),))
    columns = [sql.Identifier(c) for (c,) in cur.fetchall()]
    restore = RESTORE_CHANGED.format(t=t, cols=sql.SQL(", ").join(columns),
                                     values=sql.SQL(", ").join(sql.SQL("(s.r).") + c for c in columns))
    with sealing(cur):  # a prior image comes back as it was, its seal with it (the seal held for that image)
        cur.execute(restore, params)
        restored = cur.rowcount  # (sealing's own statement, on leaving, would be counted otherwise)
    return deleted, restored


@contextmanager
def sealing(cur: Any) -> Iterator[None]:
    """The statements run inside keep the row seals they write (migrator/core/sql/018_row_seal.sql):
    only for writes that vouch for what they leave; off again for the rest of the transaction."""
    cur.execute("SELECT set_config('migrator.sealing', 'on', true)")
    yield
    cur.execute("SELECT set_config('migrator.sealing', 'off', true)")


def later_writers(cur: Any, run_id: str) -> list[tuple[str, str]]:
    """(id, status) of the runs, follow sessions included, not rolled back, that changed or deleted
    rows this run wrote since (their journal holds such a row's image from this run)."""
    cur.execute("SELECT r.id::text, r.status FROM migration_runs r WHERE r.id <> %(run)s AND r.status <> 'rolled_back'"
                " AND EXISTS (SELECT FROM migration_journal j WHERE j.run_id = r.id"
                " AND j.old_row ->> 'migration_run' = %(run)s::text) ORDER BY r.created_at DESC", {"run": run_id})
    return cur.fetchall()


def forget_journal(cur: Any, run_id: str) -> None:
    """A run's prior images, once it is undone, and the rows it deleted (they are back)."""
    cur.execute("DELETE FROM migration_journal WHERE run_id = %s", (run_id,))
    cur.execute("DELETE FROM migration_retired WHERE run_id = %s", (run_id,))


# --- verifications (migrator/core/verify.py) ------------------------------------------------------

@dataclass(frozen=True)
class VerifySpec:
    """One range of a verification, as a worker runs it."""

    id: int
    verification_id: int | None  # None: a verification kept in memory (verify.verify_in_memory)
    run_id: str
    priorities: tuple[str, ...]
    compare: bool
    key_range: KeyRange
    options: RunOptions
    run_started: str  # ISO time the run began: documents written after it changed since the run
    from_spool: bool = False  # the range's keys are read from the run's spool, when it holds them (else SCANned)
    bucket: str = ""  # the token bucket its reads take from (throttle.Throttle): the run's, or its own cap's


def create_verification(cur: Any, run_id: str, priorities: list[str], compare: bool, ranges: list[KeyRange],
                        redis_run_id: str | None, from_spool: bool = False, sealed: bool = False,
                        reason: dict[str, Any] | None = None, max_keys_per_sec: int | None = None) -> int:
    cur.execute("INSERT INTO migration_verifications (run_id, priorities, compare, redis_run_id, from_spool, sealed, reason,"
                " max_keys_per_sec) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (run_id, priorities, compare, redis_run_id, from_spool, sealed,
                 None if reason is None else orjson.dumps(reason).decode(), max_keys_per_sec))
    verification_id = cur.fetchone()[0]
    execute_values(
        cur,
        "INSERT INTO migration_verify_ranges (verification_id, node, range_index, range_count, range_start, range_end)"
        " VALUES %s",
        [(verification_id, r.node, r.index, r.count, r.start, r.end) for r in ranges],
    )
    return verification_id


def verification_reader(cur: Any) -> str | None:
    """The current role when it may not record a verification (it only reads the ledger), else None."""
    cur.execute("SELECT current_user, bool_and(has_table_privilege(t, p)) FROM unnest(%s::text[]) t, unnest(%s::text[]) p",
                (["migration_verifications", "migration_verify_ranges"], ["INSERT", "UPDATE"]))
    role, may_write = cur.fetchone()
    return None if may_write else role


def unfinished_ranges(cur: Any, verification_id: int) -> list[tuple[int, str, int, int]]:
    """A verification's ranges not done yet, in range order: (id, node, range index, range count)."""
    cur.execute("SELECT id, node, range_index, range_count FROM migration_verify_ranges WHERE verification_id = %s"
                " AND status <> 'done' ORDER BY node, range_index", (verification_id,))
    return cur.fetchall()


def start_verify_range(cur: Any, range_id: int) -> VerifySpec | None:
    """Mark a verification range running; None when it is already done (a redelivery)."""
    cur.execute(
        "UPDATE migration_verify_ranges v SET status = 'running', attempts = attempts + 1,"
        " started_at = clock_timestamp(), error = NULL, keys_walked = 0 FROM migration_verifications f, migration_runs r"
        " WHERE v.id = %s AND f.id = v.verification_id AND r.id = f.run_id AND v.status <> 'done'"
        " RETURNING v.verification_id, f.run_id, f.priorities, f.compare, v.range_index, v.range_count, v.range_start,"
        " v.range_end, v.node, r.options, r.started_at, f.from_spool, f.max_keys_per_sec",
        (range_id,),
    )
    row = cur.fetchone()
    if row is None:
        cur.execute("SELECT 1 FROM migration_verify_ranges WHERE id = %s", (range_id,))
        if cur.fetchone() is None:
            raise LookupError(f"verification range {range_id} is not in the ledger; is DATABASE_URL the run's database?")
        return None
    verification_id, run_id, priorities, compare, index, count, start, end, node, options, started, from_spool, cap = row
    opts, bucket = capped(RunOptions.from_json(options), str(run_id), verification_id, cap)
    return VerifySpec(range_id, verification_id, str(run_id), tuple(priorities), compare,
                      KeyRange(index, count, int(start), int(end), node), opts, started.isoformat(), from_spool, bucket)


def capped(opts: RunOptions, run_id: str, verification_id: int | None, cap: int | None) -> tuple[RunOptions, str]:
    """A verification's options and token bucket: the run's, or with its own cap (0: none) and a
    bucket of its own, so that the run's rate, should it still read, is not shared with another."""
    if cap is None:
        return opts, run_id
    return replace(opts, max_keys_per_sec=cap or None), f"{run_id}:verification:{verification_id}"


def finish_verify_range(cur: Any, range_id: int, counts: dict[str, dict[str, int]], attributed: dict[str, int],
                        examples: list[dict[str, Any]], walked: int) -> None:
    cur.execute(
        "UPDATE migration_verify_ranges SET status = 'done', finished_at = clock_timestamp(), counts = %s,"
        " attributed = %s, examples = %s, keys_walked = %s WHERE id = %s",
        (orjson.dumps(counts).decode(), orjson.dumps(attributed).decode(), orjson.dumps(examples).decode(), walked,
         range_id),
    )


def verify_range_walked(cur: Any, range_id: int, walked: int) -> None:
    """A running verification range's keys walked so far, from a session of its own (the range's
    transaction shows nothing until it commits), for the progress display."""
    cur.execute("UPDATE migration_verify_ranges SET keys_walked = %s WHERE id = %s AND status = 'running'",
                (walked, range_id))


def latest_verification_id(cur: Any, run_id: str) -> int | None:
    cur.execute("SELECT max(id) FROM migration_verifications WHERE run_id = %s", (run_id,))
    return cur.fetchone()[0]


def verification_walked(cur: Any, run_id: str, after: int | None) -> dict[str, Any] | None:
    """The run's latest verification after id `after` (None: any), as its progress counts it: keys
    walked by its ranges, the run's keys planned, ranges done of all, and seconds since it began
    (until it ended); None when there is none yet."""
    cur.execute(
        "SELECT v.id, v.status, v.priorities, r.keys_planned, extract(epoch FROM coalesce(v.finished_at, now())"
        " - v.created_at), coalesce(sum(g.keys_walked), 0), count(g.id), count(g.id) FILTER (WHERE g.status = 'done')"
        " FROM migration_verifications v JOIN migration_runs r ON r.id = v.run_id"
        " LEFT JOIN migration_verify_ranges g ON g.verification_id = v.id"
        " WHERE v.run_id = %s AND v.id > %s GROUP BY v.id, r.keys_planned ORDER BY v.id DESC LIMIT 1",
        (run_id, after or 0))
    row = cur.fetchone()
    if row is None:
        return None
    keys = ("id", "status", "priorities", "keys_planned", "elapsed_s", "walked", "ranges", "ranges_done")
    found = dict(zip(keys, row))
    return {**found, "priorities": list(found["priorities"]), "elapsed_s": float(found["elapsed_s"]),
            "walked": int(found["walked"])}


def fail_verify_range(cur: Any, range_id: int, error: str) -> None:
    cur.execute("UPDATE migration_verify_ranges SET status = 'failed', finished_at = clock_timestamp(), error = %s"
                " WHERE id = %s", (error, range_id))


def verify_ranges(cur: Any, verification_id: int) -> list[dict[str, Any]]:
    cur.execute(
        "SELECT id, node, range_index, range_count, status, attempts, counts, attributed, examples, error,"
        " started_at, finished_at FROM migration_verify_ranges WHERE verification_id = %s ORDER BY node, range_index",
        (verification_id,),
    )
    keys = ("id", "node", "range_index", "range_count", "status", "attempts", "counts", "attributed", "examples",
            "error", "started_at", "finished_at")
    return [dict(zip(keys, row)) for row in cur.fetchall()]


def get_verification(cur: Any, verification_id: int) -> dict[str, Any]:
    cur.execute("SELECT v.id, v.run_id, v.priorities, v.compare, v.status, v.created_at, v.finished_at, v.result,"
                " v.error, r.started_at, r.options, v.redis_run_id, v.sealed, v.reason FROM migration_verifications v"
                " JOIN migration_runs r ON r.id = v.run_id WHERE v.id = %s", (verification_id,))
    row = cur.fetchone()
    if row is None:
        raise LookupError(f"no verification {verification_id} in the ledger")
    keys = ("id", "run_id", "priorities", "compare", "status", "created_at", "finished_at", "result", "error",
            "run_started", "options", "redis_run_id", "sealed", "reason")
    found = dict(zip(keys, row))
    found["run_id"] = str(found["run_id"])
    return found


def end_verification(cur: Any, verification_id: int, result: dict[str, Any] | None, error: str | None = None) -> None:
    cur.execute("UPDATE migration_verifications SET status = %s, finished_at = clock_timestamp(), result = %s, error = %s"
                " WHERE id = %s", ("failed" if error else "done", None if result is None else orjson.dumps(result).decode(),
                                   error, verification_id))


def verification_progress(cur: Any, run_id: str) -> dict[str, dict[str, Any]]:
    """Per priority, its latest verification: ranges done of all, status and verdict."""
    cur.execute(
        "SELECT DISTINCT ON (p) p, v.id, v.status, v.result ->> 'verdict', count(r.*), count(r.*) FILTER (WHERE r.status = 'done')"
        " FROM migration_verifications v CROSS JOIN unnest(v.priorities) AS p JOIN migration_verify_ranges r"
        " ON r.verification_id = v.id WHERE v.run_id = %s GROUP BY p, v.id ORDER BY p, v.id DESC",
        (run_id,),
    )
    return {p: {"verification_id": vid, "status": status, "verdict": verdict, "ranges": ranges, "done": done}
            for p, vid, status, verdict, ranges, done in cur.fetchall()}


# --- follow sessions (migrator/execution/follow.py, migrator/execution/reconcile.py) ------------------------------

FOLLOW_KIND = "follow"  # migration_runs.kind of a follow session
FOLLOW_STALE_S = 30.0  # a session whose process has not heartbeated for this long is gone
# A follow session's figures, as its process records them with its heartbeat.
FOLLOW_FIGURES = ("events", "keys_applied", "rows_written", "rows_retired", "dead", "failures", "pending", "lag_s",
                  "events_per_s", "applied_per_s", "reconnects", "nodes", "unsubscribed")
RECONCILIATION = ("reason", "started_at", "finished_at", "ranges", "ranges_repaired", "keys_reapplied", "keys_gone",
                  "clean", "error")


def running_follow_sessions(cur: Any, stale_s: float) -> list[tuple[str, bool]]:
    """Follow sessions that are running, each with whether its process heartbeated within
    `stale_s`; the table locked until the transaction ends, so two starts cannot both pass."""
    cur.execute("LOCK TABLE migration_follow IN SHARE ROW EXCLUSIVE MODE")
    cur.execute("SELECT f.run_id::text, f.heartbeat_at > now() - make_interval(secs => %s) FROM migration_follow f"
                " JOIN migration_runs r ON r.id = f.run_id WHERE r.status = 'running'", (stale_s,))
    return cur.fetchall()


def mark_follow_session(cur: Any, run_id: str, mode: str, nodes: list[str]) -> None:
    cur.execute("UPDATE migration_runs SET kind = %s WHERE id = %s", (FOLLOW_KIND, run_id))
    cur.execute("INSERT INTO migration_follow (run_id, mode, nodes) VALUES (%s, %s, %s)", (run_id, mode, nodes))


def end_follow_session(cur: Any, run_id: str, error: str | None) -> None:
    cur.execute("UPDATE migration_follow SET error = %s WHERE run_id = %s", (error, run_id))


def record_follow_figures(cur: Any, run_id: str, figures: dict[str, Any]) -> None:
    """The session's figures now, and its heartbeat; its fence's entries that no running batch can
    need any more forgotten (a batch heeds only those since it began)."""
    cur.execute(sql.SQL("UPDATE migration_follow SET heartbeat_at = now(), {} WHERE run_id = %s").format(
        sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(f)) for f in FOLLOW_FIGURES)),
        [*(figures[f] for f in FOLLOW_FIGURES), run_id])
    cur.execute("DELETE FROM migration_retired WHERE run_id = %s AND retired_at < (SELECT coalesce(min(started_at), now())"
                " FROM migration_batches WHERE status = 'running')", (run_id,))  # (claimed before its transaction began)


def follow_progress(cur: Any, run_id: str) -> dict[str, Any] | None:
    """A follow session's figures and its latest reconciliation (None: `run_id` is no follow session)."""
    cur.execute(sql.SQL("SELECT f.mode, f.heartbeat_at, extract(epoch FROM now() - f.heartbeat_at), f.error,"
                        " {} FROM migration_follow f WHERE f.run_id = %s").format(
        sql.SQL(", ").join(sql.SQL("f.") + sql.Identifier(f) for f in FOLLOW_FIGURES)), (run_id,))
    row = cur.fetchone()
    if row is None:
        return None
    mode, heartbeat, silent, error, *figures = row
    cur.execute("SELECT count(*), count(*) FILTER (WHERE NOT clean) FROM migration_reconciliations"
                " WHERE run_id = %s AND finished_at IS NOT NULL", (run_id,))
    done, repaired = cur.fetchone()
    cur.execute(sql.SQL("SELECT {} FROM migration_reconciliations WHERE run_id = %s AND finished_at IS NOT NULL"
                        " ORDER BY id DESC LIMIT 1").format(sql.SQL(", ").join(map(sql.Identifier, RECONCILIATION))),
                (run_id,))
    last = cur.fetchone()
    return {"mode": mode, "heartbeat_at": heartbeat, "silent_s": float(silent), "error": error,
            **dict(zip(FOLLOW_FIGURES, figures)), "reconciliations": done, "reconciliations_repaired": repaired,
            "last_reconciliation": dict(zip(RECONCILIATION, last)) if last else None}


def live_follow_session(cur: Any) -> str | None:
    """The follow session running now, if any (its process may have died: see its silent_s)."""
    cur.execute("SELECT r.id::text FROM migration_runs r WHERE r.kind = %s AND r.status = 'running'"
                " ORDER BY r.created_at DESC LIMIT 1", (FOLLOW_KIND,))
    row = cur.fetchone()
    return row[0] if row else None


def dead_letters_now(cur: Any, run_id: str) -> set[bytes]:
    """The keys of the dead letters this transaction wrote."""
    cur.execute("SELECT redis_key FROM migration_dead_letters WHERE run_id = %s AND created_at = now()", (run_id,))
    return {bytes(k) for (k,) in cur.fetchall()}


def dead_letter_count(cur: Any, run_id: str) -> int:
    """The dead letters the run (or follow session) holds now."""
    cur.execute("SELECT count(*) FROM migration_dead_letters WHERE run_id = %s", (run_id,))
    return cur.fetchone()[0]


def has_dead_letters(cur: Any, run_id: str) -> bool:
    """Whether the run holds any dead letter (an index probe: a follow batch asks before it forgets)."""
    cur.execute("SELECT EXISTS (SELECT FROM migration_dead_letters WHERE run_id = %s)", (run_id,))
    return cur.fetchone()[0]


def forget_dead_letters(cur: Any, run_id: str, keys: list[bytes]) -> None:
    """Keys that failed before and applied now are no dead letters any more."""
    cur.execute("DELETE FROM migration_dead_letters WHERE run_id = %s AND created_at < now()"
                " AND sha256(redis_key) = ANY(ARRAY(SELECT sha256(k) FROM unnest(%s::bytea[]) k))",
                (run_id, [psycopg2.Binary(k) for k in keys]))


# (the latest deletion of a row, or key, is the one a batch running now is to know of)
RETIRED_AGAIN = (" ON CONFLICT (table_name, source_key, row_id) DO UPDATE SET run_id = EXCLUDED.run_id,"
                 " retired_at = EXCLUDED.retired_at")
# migration_retired's row_id for every row of a key (016_follow_fence.sql)
WHOLE_KEY = "00000000-0000-0000-0000-000000000000"

# Rows that no key of theirs gives now ({which}: which rows): deleted (their prior image journaled by
# hand, since the journal trigger fires on UPDATE only), or marked (the trigger journals it).
RETIRE_DELETE = (
    "WITH gone AS (DELETE FROM {t} WHERE {which} RETURNING {t}.*),"
    " journaled AS (INSERT INTO migration_journal (run_id, table_name, row_id, old_row, old_text)"
    " SELECT %(run)s, %(name)s, g.id, to_jsonb(g), g::text FROM gone g WHERE g.migration_run IS DISTINCT FROM %(run)s::uuid"
    " ON CONFLICT DO NOTHING),"
    # the fence of a bulk batch running now (merge.SYNCED_AT): the row is not to come back from its older read
    " fenced AS (INSERT INTO migration_retired (table_name, row_id, source_key, run_id, retired_at)"
    " SELECT %(name)s, g.id, g.source_key, %(run)s, clock_timestamp() FROM gone g" + RETIRED_AGAIN + ")"
    " SELECT count(*) FROM gone")
RETIRE_MARK = (
    "WITH marked AS (UPDATE {t} SET {at} = now(), migration_run = %(run)s, synced_at = clock_timestamp()"
    " WHERE {which} AND {at} IS NULL RETURNING 1)"
    " SELECT count(*) FROM marked")
# The rows of some keys but those kept (follow: the keys it applied and the ids they give now).
# (NOT IN a subquery is a hashed lookup per row; NOT id = ANY(array) walks the whole array for each.)
NOT_KEPT = "source_key = ANY(%(keys)s) AND id NOT IN (SELECT unnest(%(keep)s::uuid[]))"
# Rows named by id and key (a run's validation: the rows it found that no key gives).
NAMED = "(id, source_key) IN (SELECT * FROM unnest(%(ids)s::uuid[], %(keys)s::text[]))"
# (clock_timestamp(): the statement runs after follow read the keys; see merge.SYNCED_AT)
STAMP_SYNCED = sql.SQL("UPDATE {t} SET synced_at = clock_timestamp() FROM unnest(%s::uuid[], %s::text[]) AS s (id, key)"
                       " WHERE {t}.id = s.id AND {t}.source_key = s.key")


def unretired(table: str, row_id: sql.Composable, source_key: sql.Composable) -> sql.Composable:
    """A bulk batch's condition on each row it writes (merge.TableRule.upsert, fenced): that follow
    did not delete it, as its key's, nor find its key giving no row of the table, since the batch's
    transaction began (RETIRE_DELETE, retire_keys: merge.SYNCED_AT's fence for a row that is gone).
    Asked once per statement first (an index probe, an InitPlan): only when follow deleted rows of
    the table since is each row looked up, so a run without follow pays for no join."""
    return sql.SQL("(NOT EXISTS (SELECT FROM migration_retired WHERE table_name = {t} AND retired_at >= now())"
                   " OR NOT EXISTS (SELECT FROM migration_retired g WHERE g.table_name = {t} AND g.source_key = {key}"
                   " AND g.row_id IN ({id}, {whole}) AND g.retired_at >= now()))").format(
        t=sql.Literal(table), id=row_id, key=source_key, whole=sql.Literal(WHOLE_KEY) + sql.SQL("::uuid"))


def retire_keys(cur: Any, run_id: str, table: str, keys: list[str]) -> None:
    """These keys, read by follow in this transaction, give no row of `table`: a bulk batch that
    began before inserts none of theirs there from its older read (unretired), though follow had no
    row of theirs to delete (the key made and deleted between the batch's read and its write)."""
    cur.execute("INSERT INTO migration_retired (table_name, source_key, row_id, run_id, retired_at)"
                " SELECT %s, k, %s, %s, clock_timestamp() FROM unnest(%s::text[]) k" + RETIRED_AGAIN,
                (table, WHOLE_KEY, run_id, keys))


def stamp_synced(cur: Any, table: str, given: list[tuple[str, str]]) -> None:
    """These rows of `table` (id, key) were just written, or found current, by follow from keys it read
    in this transaction: their mark says so to a bulk batch that began before (merge.SYNCED_AT). A row
    the upsert left as it was too (the batch's read of its key may be older than follow's), unless
    another key's: follow's read of this key says nothing of that one's."""
    cur.execute(STAMP_SYNCED.format(t=sql.Identifier(table)), ([i for i, _ in given], [k for _, k in given]))


def retire_rows(cur: Any, run_id: str, table: str, keys: list[str], keep: list[str], mark: str | None) -> int:
    """Rows of `table` written for `keys` but not among `keep` (ids): deleted, journaled for
    rollback; or, with `mark` (a column), kept with it set. How many."""
    return _retire(cur, run_id, table, NOT_KEPT, {"keys": keys, "keep": keep}, mark)


def retire_named(cur: Any, run_id: str, table: str, rows: list[tuple[str, str]], mark: str | None) -> int:
    """These rows of `table` (id, source key), as retire_rows does. How many."""
    return _retire(cur, run_id, table, NAMED, {"ids": [i for i, _ in rows], "keys": [k for _, k in rows]}, mark)


def _retire(cur: Any, run_id: str, table: str, which: str, params: dict[str, Any], mark: str | None) -> int:
    t = sql.Identifier(table)
    statement = (sql.SQL(RETIRE_MARK).format(t=t, at=sql.Identifier(mark), which=sql.SQL(which)) if mark
                 else sql.SQL(RETIRE_DELETE).format(t=t, which=sql.SQL(which)))
    cur.execute(statement, {"run": run_id, "name": table, **params})
    return cur.fetchone()[0]


def rows_retiring(cur: Any, table: str, keys: list[str], keep: list[str], columns: tuple[str, ...],
                  mark: str | None) -> list[tuple[str, dict[str, Any]]]:
    """The rows retire_rows would retire, each as (id, {column: value} of `columns`)."""
    statement = sql.SQL("SELECT id::text, {cols} FROM {t} WHERE source_key = ANY(%s)"
                        " AND id NOT IN (SELECT unnest(%s::uuid[]))").format(
        cols=sql.SQL(", ").join(map(sql.Identifier, columns)), t=sql.Identifier(table))
    if mark:
        statement += sql.SQL(" AND {} IS NULL").format(sql.Identifier(mark))
    cur.execute(statement, (keys, keep))
    return [(row_id, dict(zip(columns, values))) for row_id, *values in cur.fetchall()]


def repoint_rows(cur: Any, run_id: str, table: str, rows: list[tuple[str, str, str, Any, int]]) -> int:
    """Rows another key gives too, written by a key that went: their provenance set to that other key's
    (id, source_key, metadata JSON, expires_at, source_digest), which follow just read (stamped, as
    stamp_synced does), the prior image journaled by the trigger. How many."""
    cur.execute(sql.SQL(
        "UPDATE {} AS t SET source_key = v.key, migration_run = %s, metadata = v.metadata, expires_at = v.expires_at,"
        " source_digest = v.digest, synced_at = clock_timestamp()"  # (read in this transaction: merge.SYNCED_AT)
        " FROM unnest(%s::uuid[], %s::text[], %s::jsonb[], %s::timestamptz[], %s::bigint[])"
        " AS v(id, key, metadata, expires_at, digest) WHERE t.id = v.id").format(sql.Identifier(table)),
        (run_id, *map(list, zip(*rows))))
    return cur.rowcount


def start_reconciliation(cur: Any, run_id: str, reason: str) -> int:
    cur.execute("INSERT INTO migration_reconciliations (run_id, reason) VALUES (%s, %s) RETURNING id", (run_id, reason))
    return cur.fetchone()[0]


def fail_reconciliation(cur: Any, reconciliation_id: int, error: str) -> None:
    cur.execute("UPDATE migration_reconciliations SET finished_at = now(), clean = false, error = %s WHERE id = %s",
                (error, reconciliation_id))


def end_reconciliation(cur: Any, reconciliation_id: int, outcome: dict[str, Any]) -> None:
    cur.execute("UPDATE migration_reconciliations SET finished_at = now(), ranges = %s, ranges_repaired = %s,"
                " keys_reapplied = %s, keys_gone = %s, clean = %s, detail = %s WHERE id = %s",
                (outcome["ranges"], len(outcome["repaired"]), outcome["keys_reapplied"], outcome["keys_gone"],
                 outcome["clean"], orjson.dumps({"repaired": outcome["repaired"]}).decode(), reconciliation_id))
