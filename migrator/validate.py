"""Validating a priority once its batches are in: the ledger against the source and the target.

- every batch of the priority is done, and each pattern balances;
- a fresh count of the source keys per pattern agrees with what the batches scanned (taken
  by the next priority's batches during their own pass; the last priority's in a pass of its own);
- a sample of migrated keys, read back from Redis and transformed again, is already in
  PostgreSQL: upserting it (inside a savepoint that is rolled back) would change no row.
"""
from __future__ import annotations

import hashlib
import math
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

import redis
from psycopg2 import sql

from . import ledger, throttle
from .mapping import SourceRecord, UNMAPPED, Mapping, Priority
from .options import RunOptions
from .partition import plan_ranges, scan_range
from .source import decode, key_client, node_client, read_keys
from .writer import Prepared, Writer

SAMPLE_PER_PATTERN = 20


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def source_counts(client: redis.Redis, mapping: Mapping, opts: RunOptions, priority: Priority,
                  run_id: str) -> dict[str, int]:
    """One SCAN pass: keys per in-scope pattern now (and unmapped keys when this pass counts them)."""
    counted = opts.counted(mapping, priority)
    prefixes = opts.prefixes(mapping, priority)
    counts: dict[str, int] = {}
    cap = throttle.for_run(client, run_id, opts)
    try:
        for whole in plan_ranges(client, 1):  # the whole keyspace: of the server, or of each master
            nc = node_client(client, whole.node) if whole.node else client
            try:
                for keys in scan_range(nc, whole, throttle.paced(opts)[1]):
                    if cap is not None:
                        cap.acquire(len(keys))
                    for key in keys:
                        if not key.startswith(prefixes):
                            continue
                        pattern, _ = mapping.pattern_of(key.decode("utf-8", "backslashreplace"))
                        name = pattern.name if pattern else UNMAPPED
                        if name in counted:
                            counts[name] = counts.get(name, 0) + 1
            finally:
                if nc is not client:
                    nc.close()
    finally:
        if cap is not None:
            cap.close()
    return counts


def sample_readback(client: redis.Redis, cur: Any, mapping: Mapping, opts: RunOptions, priority: Priority,
                    run_id: str, per_pattern: int = SAMPLE_PER_PATTERN) -> dict[str, dict[str, int]]:
    """Per pattern: keys sampled, still in PostgreSQL as in Redis, differing, gone from Redis."""
    tz = ZoneInfo(opts.source_timezone)
    writer = Writer(cur, mapping, run_id)
    client = key_client(client)
    out: dict[str, dict[str, int]] = {}
    for pattern in opts.scope(mapping, priority):
        if not pattern.migrated:
            continue
        # A pseudo-random sample, different per run, repeatable within it: row ids are hashes, so
        # the rows that follow a point of the id space picked from the run id are a random few,
        # found through the primary key instead of sorting the whole table.
        start = str(uuid.UUID(hashlib.md5(f"{run_id}:{pattern.name}".encode()).hexdigest()))
        side = sql.SQL("SELECT id, source_key FROM {t} WHERE id {op} %s::uuid AND metadata = %s::jsonb"
                       " AND source_key IS NOT NULL ORDER BY id LIMIT %s")
        after, before = (side.format(t=sql.Identifier(pattern.table), op=sql.SQL(op)) for op in (">=", "<"))
        cur.execute(sql.SQL("({}) UNION ALL ({})").format(after, before),
                    (start, pattern.provenance, per_pattern * 4, start, pattern.provenance, per_pattern * 4))
        keys = list(dict.fromkeys(row[1] for row in cur.fetchall()))[:per_pattern]  # a zset key owns many rows
        stats = {"sampled": len(keys), "same": 0, "differ": 0, "gone": 0}
        reads = read_keys(client, [(k.encode(), pattern.redis_type) for k in keys])
        now = datetime.now(timezone.utc)
        for key, read in zip(keys, reads):
            if read.redis_type == "none":
                stats["gone"] += 1
                continue
            try:
                rows = pattern.transform(SourceRecord(key, mapping.classify(key)[1], decode(read.raw, pattern.value_format),
                                                      None, now, tz))
            except (ValueError, TypeError, KeyError, AttributeError):
                stats["differ"] += 1
                continue
            cur.execute("SAVEPOINT readback")
            # expires_at is left out: it is bookkeeping, and absent columns are not compared
            changed = writer.upsert([Prepared(key.encode(), key, pattern, rows, None, read)])
            cur.execute("ROLLBACK TO SAVEPOINT readback")
            stats["same" if changed == 0 else "differ"] += 1
        out[pattern.name] = stats
    return out


def validate_priority(client: redis.Redis, conn: Any, mapping: Mapping, run_id: str, priority: Priority,
                      opts: RunOptions, count_now: bool = True) -> list[Check]:
    """The checks of one priority; its fresh source count only with `count_now` (else `recount_check`
    takes it from the next priority's pass)."""
    tolerance = opts.count_tolerance
    checks = []
    with conn.cursor() as cur:
        batches = [b for b in ledger.batches(cur, run_id) if b["priority"] == priority.label]
    conn.rollback()
    totals = ledger.pattern_totals(batches)
    failed = [b["id"] for b in batches if b["status"] != "done"]
    checks.append(Check("batches_done", not failed,
                        f"{len(batches) - len(failed)}/{len(batches)} batches done"
                        + (f"; not done: {failed} (`migrator batches {run_id} --failed`)" if failed else ""),
                        {"failed": failed}))
    unbalanced = [n for n, c in totals.items()
                  if c["scanned"] != c["migrated"] + c["skipped"] + c["dead"] + c["expired"]]
    checks.append(Check("balance", not unbalanced,
                        "scanned = migrated + skipped + dead + expired for every pattern" if not unbalanced
                        else f"unbalanced: {unbalanced}", {"unbalanced": unbalanced}))
    if count_now:
        checks.append(count_check(totals, source_counts(client, mapping, opts, priority, run_id), tolerance))
    if opts.dry_run or failed:
        return checks  # nothing kept to read back, or a table the batches could not write may be missing
    with conn.cursor() as cur:
        sample = sample_readback(client, cur, mapping, opts, priority, run_id)
    conn.rollback()
    differ = {n: s for n, s in sample.items() if s["differ"]}
    checks.append(Check("sample_readback", not differ,
                        f"{sum(s['same'] for s in sample.values())} sampled keys match PostgreSQL" if not differ
                        else f"sampled keys differ from PostgreSQL: {differ}", sample))
    return checks


def count_check(totals: dict[str, dict[str, int]], fresh: dict[str, int], tolerance: float, how: str = "") -> Check:
    """The batches' tallies against a fresh count of the source, per pattern (one-sided)."""
    off, gone = {}, {}
    for name in sorted(set(fresh) | set(totals)):
        counted = totals.get(name, {})
        now, seen = fresh.get(name, 0), counted.get("scanned", 0) - counted.get("expired", 0)
        # More keys now than the batches saw: keys the scan missed (or the app wrote since,
        # within the tolerance). Fewer is no loss: those keys were scanned, then expired or
        # were deleted by the app before this count (a TTL'd key of a skipped pattern is never
        # read, so its expiry is only seen here).
        if now - seen > math.floor(tolerance * max(now, seen)):
            off[name] = {"source_now": now, "scanned_not_expired": seen}
        elif now < seen:
            gone[name] = seen - now
    detail = "no key in the source that the batches did not see" + (
        f"; gone since they were scanned (expired or deleted): {gone}" if gone else "")
    if off:
        detail = f"more keys in the source than the batches saw, beyond {tolerance:.1%}: {off}"
    return Check("source_counts", not off, detail + (f" ({how})" if how else ""),
                 {"fresh": fresh, "differ": off, "gone_since_scan": gone})


def recount_check(client: redis.Redis, conn: Any, mapping: Mapping, run_id: str, earlier: Priority, by: Priority,
                  opts: RunOptions) -> Check:
    """The fresh source count of `earlier`, as the batches of `by` (the next priority) took it
    during their pass; a pass of its own when some of them did not finish."""
    with conn.cursor() as cur:
        rows = ledger.batches(cur, run_id)
    conn.rollback()
    totals = ledger.pattern_totals([b for b in rows if b["priority"] == earlier.label])
    later = [b for b in rows if b["priority"] == by.label]
    if later and all(b["status"] == "done" and b["recount"] is not None for b in later):
        fresh: dict[str, int] = {}
        for batch in later:
            for name, n in batch["recount"].items():
                fresh[name] = fresh.get(name, 0) + n
        return count_check(totals, fresh, opts.count_tolerance, f"counted again during the {by.label} pass")
    return count_check(totals, source_counts(client, mapping, opts, earlier, run_id), opts.count_tolerance)


def figure_checks(conn: Any, mapping: Mapping) -> tuple[list[Check], dict[str, Any]]:
    """The mapping's monitoring figures; those that must be zero (orphans) become checks."""
    figures: dict[str, Any] = {}
    checks = []
    with conn, conn.cursor() as cur:
        for figure in mapping.figures:
            cur.execute(figure.sql)
            figures[figure.name] = [list(r) for r in cur.fetchall()] if figure.rows else cur.fetchone()[0]
            if figure.must_be_zero:
                n = figures[figure.name]
                checks.append(Check(figure.name, n == 0, f"{n} {figure.name.replace('_', ' ')}", {"count": n}))
    return checks, figures


def validate_run(client: redis.Redis, conn: Any, mapping: Mapping, run_id: str,
                 priorities: list[Priority] | None = None) -> dict[str, Any]:
    """Validate a run again, now: each priority's checks, then the mapping's figures."""
    with conn, conn.cursor() as cur:
        run = ledger.require_run(cur, run_id)
    opts = RunOptions.from_json(run["options"])
    chosen = priorities or opts.priority_order()
    by_priority = {p.label: validate_priority(client, conn, mapping, run_id, p, opts) for p in chosen}
    checks, figures = figure_checks(conn, mapping)
    ok = all(c.ok for cs in by_priority.values() for c in cs) and all(c.ok for c in checks)
    return {
        "run_id": run_id,
        "ok": ok,
        "priorities": {p: [c.to_json() for c in cs] for p, cs in by_priority.items()},
        "checks": [c.to_json() for c in checks],
        "figures": figures,
    }


def render_validation(result: dict[str, Any]) -> str:
    out = [f"run {result['run_id']}: {'PASS' if result['ok'] else 'FAIL'}"]
    for priority, checks in result["priorities"].items():
        out += [f"  {priority:8} {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}" for c in checks]
    out += [f"  {'target':8} {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}" for c in result["checks"]]
    out.append("  figures: " + ", ".join(f"{k} {v}" for k, v in result["figures"].items()))
    return "\n".join(out)
