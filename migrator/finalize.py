"""What happens after a priority's batches: link legacy user ids, verify, judge, decide what comes next.

The Celery chord callbacks and `run --local` both go through `begin_verification` (once the
batches are in) and `judge_priority` (once its verification's ranges are in), so the rules for
going on, stopping and rolling back live in one place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
import structlog
from psycopg2 import sql

from . import ledger, verify
from .errors import TRANSIENT
from .mapping import Mapping, Priority
from .merge import LEGACY_KEY, LINKED
from .options import RunOptions
from .redact import redact_text
from .rollback import rollback_run
from .source import cluster_masters
from .validate import RUN, Check, figure_checks, priority_checks, record
from .writer import describe

log = structlog.get_logger("migrator.finalize")

LINK = sql.SQL(
    "UPDATE {t} SET {linked} = m.entity_id FROM legacy_id_map m"
    " WHERE {t}.{linked} IS NULL AND {t}.{c} IS NOT NULL AND m.legacy_id = {legacy}"
)


def link_users(conn: Any, mapping: Mapping, run_id: str) -> int:
    """Fill user_id on rows that name their user by email, now that the users are in."""
    linked = 0
    with conn, conn.cursor() as cur:
        cur.execute("SELECT set_config('migrator.run_id', %s, true)", (run_id,))
        for table, column in mapping.user_links:
            t, c = sql.Identifier(table), sql.Identifier(column)
            cur.execute(LINK.format(t=t, c=c, linked=sql.Identifier(LINKED),
                                    legacy=sql.SQL(LEGACY_KEY).format(ref=sql.SQL("{}.{}").format(t, c))))
            linked += cur.rowcount
    return linked


def begin_verification(client: redis.Redis, conn: Any, mapping: Mapping, run_id: str, priority: Priority,
                       opts: RunOptions) -> int | None:
    """The batches of `priority` are in: link users, and plan the priority's verification (its
    id). None when the source restarted since the run was planned: keys moved between ranges
    with the new hash seed, so the priority is scanned again."""
    if source_restarted(client, conn, mapping, run_id, priority):
        return None
    linked = 0 if opts.dry_run else link_users(conn, mapping, run_id)
    log.info("priority_batches_done", run=run_id, priority=priority.label, linked=linked)
    return verify.plan_verification(client, conn, run_id, [priority])


@dataclass(frozen=True)
class Step:
    """What comes after judging a priority: the next priority (None: the run has ended), or a
    verification to run first and judge again (the source restarted under the last one)."""

    next: Priority | None = None
    verify_again: int | None = None


def judge_priority(client: redis.Redis, conn: Any, mapping: Mapping, run_id: str, priority: Priority,
                   opts: RunOptions, verification_id: int) -> Step:
    """Judge `priority` on its verification; after the last one, the run's own checks too.

    A failure of the judging itself (say, a table gone missing) fails the priority like a failed
    check would, rather than leave the run running forever; connection trouble is raised for a retry.
    """
    try:
        result = verify.finish(client, conn, mapping, verification_id)
        if (result.get("error") or "").startswith(verify.RESTARTED):
            log.warning("verification_restarted", run=run_id, priority=priority.label, verification=verification_id)
            return Step(verify_again=verify.plan_verification(client, conn, run_id, [priority]))
        checks = priority_checks(conn, mapping, run_id, priority, opts, result)
    except TRANSIENT:
        raise
    except Exception as exc:
        conn.rollback()
        checks = [Check("finalize", False, redact_text(describe(exc)))]
    failed = [] if record(conn, run_id, priority.label, checks) else [(priority.label, checks)]
    log.info("priority_validated", run=run_id, priority=priority.label, ok=not failed,
             failed_checks=[c.name for c in checks if not c.ok])
    following = opts.after(priority)
    if following is None and not failed:
        whole, _ = figure_checks(conn, mapping, opts)
        if not record(conn, run_id, RUN, whole):
            failed.append((RUN, whole))
    if failed and not opts.continue_on_error:
        why = "; ".join(f"{'the run' if label == RUN else 'priority ' + label} did not validate: "
                        + "; ".join(c.detail for c in checks if not c.ok) for label, checks in failed)
        fail_run(conn, mapping, run_id, opts, redact_text(why))
        return Step()
    if following is not None:
        return Step(following)
    with conn, conn.cursor() as cur:
        bad = sum(not ok for ok in ledger.latest_verdicts(cur, run_id).values())
        if bad:
            ledger.set_run_status(cur, run_id, "failed", f"{bad} priority(ies) did not validate")
        else:
            ledger.set_run_status(cur, run_id, "dry_run" if opts.dry_run else "completed")
    return Step()


def source_restarted(client: redis.Redis, conn: Any, mapping: Mapping, run_id: str, priority: Priority) -> bool:
    now = client.info("server").get("run_id")
    with conn, conn.cursor() as cur:
        planned = ledger.require_run(cur, run_id)["redis_run_id"]
        if cluster_masters(client) or not planned or now == planned:
            return False  # (a cluster's masters each have their own run id: not followed here)
        reopened = ledger.rescan_priority(cur, run_id, priority.label, now)
    record(conn, run_id, priority.label, [Check("source_restarted", False, f"Redis restarted during priority "
                                                f"{priority.label} (run id changed): its {reopened} range(s) are scanned again")])
    log.warning("source_restarted", run=run_id, priority=priority.label, ranges=reopened)
    return True


def fail_run(conn: Any, mapping: Mapping, run_id: str, opts: RunOptions, reason: str) -> None:
    """Mark the run failed and, unless told not to, roll back everything it wrote."""
    with conn, conn.cursor() as cur:
        ledger.set_run_status(cur, run_id, "failed", reason)
    log.warning("run_failed", run=run_id, reason=reason)
    if opts.rollback_on_failure and not opts.dry_run:
        rollback_run(conn, mapping, run_id)
