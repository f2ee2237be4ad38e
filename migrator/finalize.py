"""What happens after a priority's batches: link legacy user ids, validate, decide what comes next.

The Celery chord callback and `run --local` both call `after_priority`, so the rules for going
on, stopping and rolling back live in one place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import redis
import structlog
from psycopg2 import sql

from . import ledger
from .mapping import Mapping, Priority
from .errors import TRANSIENT
from .options import RunOptions
from .redact import redact_text
from .rollback import rollback_run
from .source import cluster_masters
from .validate import Check, recount_check, validate_priority
from .writer import describe

log = structlog.get_logger("migrator.finalize")

LINK = sql.SQL(
    "UPDATE {t} SET user_id = m.entity_id FROM legacy_id_map m"
    " WHERE {t}.user_id IS NULL AND {t}.{c} IS NOT NULL"
    " AND m.legacy_id = CASE WHEN position('@' IN {t}.{c}) > 0 THEN lower({t}.{c}) ELSE {t}.{c} END"
)


def link_users(conn: Any, mapping: Mapping, run_id: str) -> int:
    """Fill user_id on rows that name their user by email, now that the users are in."""
    linked = 0
    with conn, conn.cursor() as cur:
        cur.execute("SELECT set_config('migrator.run_id', %s, true)", (run_id,))
        for table, column in mapping.user_links:
            cur.execute(LINK.format(t=sql.Identifier(table), c=sql.Identifier(column)))
            linked += cur.rowcount
    return linked


@dataclass(frozen=True)
class Verdict:
    priority: str
    checks: list[Check]
    linked: int

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def finalize_priority(client: redis.Redis, conn: Any, mapping: Mapping, run_id: str, priority: Priority,
                      opts: RunOptions) -> list[Verdict]:
    """Link users, validate `priority`, and complete the validation of the priority before it
    with the source count this priority's pass took again; their verdicts, earlier first."""
    linked = 0 if opts.dry_run else link_users(conn, mapping, run_id)
    earlier = opts.before(priority)
    verdicts = []
    if earlier is not None:
        with conn.cursor() as cur:
            before = [Check(**c) for c in ledger.latest_checks(cur, run_id, earlier.label) if c["name"] != "source_counts"]
        conn.rollback()
        recount = recount_check(client, conn, mapping, run_id, earlier, priority, opts)
        verdicts.append(Verdict(earlier.label, [*before, recount], 0))
    checks = validate_priority(client, conn, mapping, run_id, priority, opts, count_now=opts.after(priority) is None)
    verdicts.append(Verdict(priority.label, checks, linked))
    for verdict in verdicts:
        with conn, conn.cursor() as cur:
            cur.execute("INSERT INTO migration_validations (run_id, priority, ok, checks) VALUES (%s, %s, %s, %s)",
                        (run_id, verdict.priority, verdict.ok, orjson.dumps([c.to_json() for c in verdict.checks]).decode()))
        log.info("priority_validated", run=run_id, priority=verdict.priority, ok=verdict.ok, linked=verdict.linked,
                 failed_checks=[c.name for c in verdict.checks if not c.ok])
    return verdicts


def after_priority(client: redis.Redis, conn: Any, mapping: Mapping, run_id: str, priority: Priority,
                   opts: RunOptions) -> Priority | None:
    """Validate `priority`; return the next priority to run, or None once the run has ended.

    A failure of the validation itself (say, a table gone missing) fails the run like a failed
    check would, rather than leave it running forever; connection trouble is raised for a retry.
    When the source restarted since the run was planned, the priority is scanned again (its
    value: `priority` once more): keys moved between ranges with the new hash seed, so the
    ranges already done no longer cover the keys they stand for.
    """
    if source_restarted(client, conn, mapping, run_id, priority):
        return priority
    try:
        verdicts = finalize_priority(client, conn, mapping, run_id, priority, opts)
    except TRANSIENT:
        raise
    except Exception as exc:
        conn.rollback()
        reason = redact_text(describe(exc))
        with conn, conn.cursor() as cur:
            cur.execute("INSERT INTO migration_validations (run_id, priority, ok, checks) VALUES (%s, %s, false, %s)",
                        (run_id, priority.label, orjson.dumps([Check("finalize", False, reason).to_json()]).decode()))
        verdicts = [Verdict(priority.label, [Check("finalize", False, reason)], 0)]
    failed = [v for v in verdicts if not v.ok]
    if failed and not opts.continue_on_error:
        why = "; ".join(f"priority {v.priority} did not validate: " + "; ".join(c.detail for c in v.checks if not c.ok)
                        for v in failed)
        fail_run(conn, mapping, run_id, opts, why)
        return None
    following = opts.after(priority)
    if following is not None:
        return following
    with conn, conn.cursor() as cur:
        bad = sum(not ok for ok in ledger.latest_verdicts(cur, run_id).values())
        if bad:
            ledger.set_run_status(cur, run_id, "failed", f"{bad} priority(ies) did not validate")
        else:
            ledger.set_run_status(cur, run_id, "dry_run" if opts.dry_run else "completed")
    return None


def source_restarted(client: redis.Redis, conn: Any, mapping: Mapping, run_id: str, priority: Priority) -> bool:
    now = client.info("server").get("run_id")
    with conn, conn.cursor() as cur:
        planned = ledger.require_run(cur, run_id)["redis_run_id"]
        if cluster_masters(client) or not planned or now == planned:
            return False  # (a cluster's masters each have their own run id: not followed here)
        reopened = ledger.rescan_priority(cur, run_id, priority.label, now)
        check = Check("source_restarted", False, f"Redis restarted during priority {priority.label} (run id changed): "
                                                 f"its {reopened} range(s) are scanned again")
        cur.execute("INSERT INTO migration_validations (run_id, priority, ok, checks) VALUES (%s, %s, false, %s)",
                    (run_id, priority.label, orjson.dumps([check.to_json()]).decode()))
    log.warning("source_restarted", run=run_id, priority=priority.label, ranges=reopened)
    return True


def fail_run(conn: Any, mapping: Mapping, run_id: str, opts: RunOptions, reason: str) -> None:
    """Mark the run failed and, unless told not to, roll back everything it wrote."""
    with conn, conn.cursor() as cur:
        ledger.set_run_status(cur, run_id, "failed", reason)
    log.warning("run_failed", run=run_id, reason=reason)
    if opts.rollback_on_failure and not opts.dry_run:
        rollback_run(conn, mapping, run_id)
