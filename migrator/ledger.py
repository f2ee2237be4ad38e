"""The run ledger in PostgreSQL: runs, their planned batches, per-pattern counts, dead letters."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import orjson
from psycopg2.extras import execute_values

from .options import RunOptions
from .partition import KeyRange

# The ledger tables a run writes (migrator/sql/001_ledger.sql), besides the tables of its mapping.
TABLES = ("migration_runs", "migration_batches", "migration_dead_letters", "migration_validations", "migration_journal",
          "migration_verifications", "migration_verify_ranges", "migration_follow", "migration_reconciliations")

# Seconds between a running batch's heartbeats (migrator/lease.py); a batch silent for six of
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
        counts = self.by_pattern.setdefault(pattern, dict.fromkeys(TALLY_FIELDS, 0))
        counts["scanned"] += n
        counts[outcome] += n
        counts["rows"] += rows

    def note(self, pattern: str, field: str, n: int = 1) -> None:
        """Count something of the pattern's keys that is not an outcome (references, dangling)."""
        counts = self.by_pattern.setdefault(pattern, dict.fromkeys(TALLY_FIELDS, 0))
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


def create_run(cur: Any, run_id: str, mapping: str, options: RunOptions, source: str, redis_run_id: str | None,
               mapping_spec: str, mapping_digest: str) -> None:
    cur.execute(
        "INSERT INTO migration_runs (id, status, mapping, dry_run, options, source, redis_run_id, started_at,"
        " mapping_spec, mapping_digest) VALUES (%s, 'running', %s, %s, %s, %s, %s, now(), %s, %s)",
        (run_id, mapping, options.dry_run, orjson.dumps(options.to_json()).decode(), source, redis_run_id,
         mapping_spec, mapping_digest),
    )


def plan_batches(cur: Any, run_id: str, priorities: Iterable[str], ranges: list[KeyRange]) -> None:
    """Record every (priority, range) batch before any of them runs."""
    execute_values(
        cur,
        "INSERT INTO migration_batches (run_id, priority, node, range_index, range_count, range_start, range_end)"
        " VALUES %s ON CONFLICT (run_id, priority, node, range_index) DO NOTHING",
        [(run_id, p, r.node, r.index, r.count, r.start, r.end) for p in priorities for r in ranges],
    )


def batch_ids(cur: Any, run_id: str, priority: str, statuses: tuple[str, ...] = ("pending", "failed", "running")) -> list[int]:
    cur.execute(
        "SELECT id FROM migration_batches WHERE run_id = %s AND priority = %s AND status = ANY(%s) ORDER BY node, range_index",
        (run_id, priority, list(statuses)),
    )
    return [r[0] for r in cur.fetchall()]


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


def finish_batch(cur: Any, batch_id: int, counts: PatternCounts, rows_written: int, checksum: str,
                 timings: dict[str, float], dangling: dict[str, list[dict[str, Any]]]) -> None:
    """Mark a batch done with its tallies (and examples of its dangling references, per pattern)."""
    cur.execute(
        "UPDATE migration_batches SET status = 'done', finished_at = clock_timestamp(), keys_scanned = %s, keys_migrated = %s,"
        " keys_skipped = %s, keys_dead = %s, keys_expired = %s, rows_written = %s, pattern_counts = %s, checksum = %s,"
        " timings = %s, dangling = %s WHERE id = %s",
        (*(counts.total(f) for f in COUNT_FIELDS), rows_written, orjson.dumps(counts.by_pattern).decode(), checksum,
         orjson.dumps(timings).decode(), orjson.dumps(dangling).decode(), batch_id),
    )


def stage_seconds(cur: Any, run_id: str) -> dict[str, float]:
    """Seconds per stage over every done batch of a run (see STAGES)."""
    cur.execute(
        "SELECT s.stage, sum((b.timings ->> s.stage)::float8) FROM migration_batches b,"
        " unnest(%s::text[]) AS s(stage) WHERE b.run_id = %s AND b.status = 'done' GROUP BY s.stage",
        (list(STAGES), run_id),
    )
    found = dict(cur.fetchall())
    return {stage: round(found.get(stage) or 0.0, 3) for stage in STAGES}


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


def latest_run(cur: Any) -> str | None:
    """The newest run that was not a dry run (a follow session is not a run of the keyspace)."""
    cur.execute("SELECT id FROM migration_runs WHERE NOT dry_run AND kind = 'run' ORDER BY created_at DESC LIMIT 1")
    row = cur.fetchone()
    return str(row[0]) if row else None


RUN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)


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


def rescan_priority(cur: Any, run_id: str, priority: str, redis_run_id: str) -> int:
    """The source restarted: every batch of `priority` runs again, on the new server process."""
    cur.execute("UPDATE migration_runs SET redis_run_id = %s WHERE id = %s", (redis_run_id, run_id))
    cur.execute("UPDATE migration_batches SET status = 'pending' WHERE run_id = %s AND priority = %s",
                (run_id, priority))
    return cur.rowcount


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


def dangling_examples(batches: list[dict[str, Any]], pattern: str, limit: int = 5) -> list[dict[str, Any]]:
    """A few of a pattern's dangling references, over batches (ledger.batches rows)."""
    found: list[dict[str, Any]] = []
    for batch in batches:
        found += (batch.get("dangling") or {}).get(pattern, [])
    return found[:limit]


def latest_verdicts(cur: Any, run_id: str) -> dict[str, bool]:
    """Per priority, whether its latest validation passed (priorities never validated are absent)."""
    cur.execute("SELECT DISTINCT ON (priority) priority, ok FROM migration_validations WHERE run_id = %s"
                " ORDER BY priority, created_at DESC", (run_id,))
    return dict(cur.fetchall())


def latest_checks(cur: Any, run_id: str, priority: str) -> list[dict[str, Any]]:
    """The checks of a priority's latest validation ([] when it has none)."""
    cur.execute("SELECT checks FROM migration_validations WHERE run_id = %s AND priority = %s"
                " ORDER BY created_at DESC LIMIT 1", (run_id, priority))
    row = cur.fetchone()
    return row[0] if row else []


def first_unvalidated(cur: Any, run_id: str, order: list[str]) -> str | None:
    """The first priority (in run order) whose latest validation is missing or failed."""
    verdicts = latest_verdicts(cur, run_id)
    return next((p for p in order if not verdicts.get(p)), None)


def pattern_totals(batches: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per-pattern counts summed over batches."""
    totals: dict[str, dict[str, int]] = {}
    for batch in batches:
        for name, counts in batch["pattern_counts"].items():
            into = totals.setdefault(name, dict.fromkeys(TALLY_FIELDS, 0))
            for f in TALLY_FIELDS:
                into[f] += counts.get(f, 0)
    return totals


# --- verifications (migrator/verify.py) ----------------------------------------------------

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


def create_verification(cur: Any, run_id: str, priorities: list[str], compare: bool, ranges: list[KeyRange],
                        redis_run_id: str | None) -> int:
    cur.execute("INSERT INTO migration_verifications (run_id, priorities, compare, redis_run_id) VALUES (%s, %s, %s, %s)"
                " RETURNING id", (run_id, priorities, compare, redis_run_id))
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


def verify_range_ids(cur: Any, verification_id: int, statuses: tuple[str, ...] = ("pending", "failed", "running")) -> list[int]:
    cur.execute("SELECT id FROM migration_verify_ranges WHERE verification_id = %s AND status = ANY(%s)"
                " ORDER BY node, range_index", (verification_id, list(statuses)))
    return [r[0] for r in cur.fetchall()]


def start_verify_range(cur: Any, range_id: int) -> VerifySpec | None:
    """Mark a verification range running; None when it is already done (a redelivery)."""
    cur.execute(
        "UPDATE migration_verify_ranges v SET status = 'running', attempts = attempts + 1,"
        " started_at = clock_timestamp(), error = NULL FROM migration_verifications f, migration_runs r"
        " WHERE v.id = %s AND f.id = v.verification_id AND r.id = f.run_id AND v.status <> 'done'"
        " RETURNING v.verification_id, f.run_id, f.priorities, f.compare, v.range_index, v.range_count, v.range_start,"
        " v.range_end, v.node, r.options, r.started_at",
        (range_id,),
    )
    row = cur.fetchone()
    if row is None:
        cur.execute("SELECT 1 FROM migration_verify_ranges WHERE id = %s", (range_id,))
        if cur.fetchone() is None:
            raise LookupError(f"verification range {range_id} is not in the ledger; is DATABASE_URL the run's database?")
        return None
    verification_id, run_id, priorities, compare, index, count, start, end, node, options, started = row
    return VerifySpec(range_id, verification_id, str(run_id), tuple(priorities), compare,
                      KeyRange(index, count, int(start), int(end), node), RunOptions.from_json(options),
                      started.isoformat())


def finish_verify_range(cur: Any, range_id: int, counts: dict[str, dict[str, int]], attributed: dict[str, int],
                        examples: list[dict[str, Any]]) -> None:
    cur.execute(
        "UPDATE migration_verify_ranges SET status = 'done', finished_at = clock_timestamp(), counts = %s,"
        " attributed = %s, examples = %s WHERE id = %s",
        (orjson.dumps(counts).decode(), orjson.dumps(attributed).decode(), orjson.dumps(examples).decode(), range_id),
    )


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
                " v.error, r.started_at, r.options, v.redis_run_id FROM migration_verifications v"
                " JOIN migration_runs r ON r.id = v.run_id WHERE v.id = %s", (verification_id,))
    row = cur.fetchone()
    if row is None:
        raise LookupError(f"no verification {verification_id} in the ledger")
    keys = ("id", "run_id", "priorities", "compare", "status", "created_at", "finished_at", "result", "error",
            "run_started", "options", "redis_run_id")
    found = dict(zip(keys, row))
    found["run_id"] = str(found["run_id"])
    return found


def end_verification(cur: Any, verification_id: int, result: dict[str, Any] | None, error: str | None = None) -> None:
    cur.execute("UPDATE migration_verifications SET status = %s, finished_at = clock_timestamp(), result = %s, error = %s"
                " WHERE id = %s", ("failed" if error else "done", None if result is None else orjson.dumps(result).decode(),
                                   error, verification_id))


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
    """Per priority and pattern: the dead letters and their `top` most frequent normalised reasons
    (as stored: unmasked), most dead first."""
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
        out[-1]["dead_reasons"].append({"reason": reason, "count": n})
    return out


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
