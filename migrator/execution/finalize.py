"""What happens after a priority's batches: link legacy ids, verify, judge, decide what comes next.

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

from migrator.core import ledger
from migrator.core import runstate
from migrator.core import verify
from migrator.core.errors import transient
from migrator.core.mapping import Mapping, Priority
from migrator.core.merge import LEGACY_KEY
from migrator.core.options import RunOptions
from migrator.core.redact import redact_text
from migrator.core.rollback import RollbackFailed, rollback_run
from migrator.core.runstate import Fenced
from migrator.core.source import cluster_masters
from migrator.core.validate import RUN, Check, figure_checks, priority_checks, record
from migrator.core.writer import describe

log = structlog.get_logger("migrator.execution.finalize")

LINK = sql.SQL(
    "UPDATE {t} SET {linked} = m.entity_id FROM legacy_id_map m"
    " WHERE {t}.{linked} IS NULL AND {t}.{c} IS NOT NULL AND m.legacy_id = {legacy}"
)


def link_rows(conn: Any, mapping: Mapping, run_id: str) -> int:
    """Fill the linked columns of rows that name their entity by a legacy id, now that the
    entities are in (only while the run is running: its row is held until these writes commit)."""
    with conn, conn.cursor() as cur:
        runstate.hold(cur, run_id)
        cur.execute("SELECT set_config('migrator.run_id', %s, true)", (run_id,))
        # (the rows keep their seals: a seal leaves out the linked columns, which alone this fills)
        with ledger.sealing(cur):
            return link(cur, mapping)


def link(cur: Any, mapping: Mapping, keys: dict[str, list[str]] | None = None) -> int:
    """link_rows in the caller's transaction. `keys`: per table, only the rows of these source keys
    (what `migrator follow` just wrote); the links of other tables are left alone."""
    linked = 0
    statement = LINK if keys is None else sql.SQL(LINK.string + " AND {t}.source_key = ANY(%s)")
    for one in mapping.links:
        if keys is not None and not keys.get(one.table):
            continue
        t, c = sql.Identifier(one.table), sql.Identifier(one.column)
        cur.execute(statement.format(t=t, c=c, linked=sql.Identifier(one.into),
                                     legacy=sql.SQL(LEGACY_KEY).format(ref=sql.SQL("{}.{}").format(t, c))),
                    None if keys is None else (keys[one.table],))
        linked += cur.rowcount
    return linked


def begin_verification(client: redis.Redis, conn: Any, mapping: Mapping, run_id: str, priority: Priority,
                       opts: RunOptions, dispatch: int | None = None) -> int | None:
    """The batches of `priority` are in: link rows to their entities, and plan the priority's verification (its
    id). None when the source restarted since the run was planned: keys moved between ranges
    with the new hash seed, so the priority is scanned again.

    Raises Fenced when the run is not running (cancelled, rolled back), or when this step
    itself fails: the run is then failed, its rows kept, with the command that runs the step
    again. `dispatch`: the number the chord was sent with (workers), Fenced when a later one
    replaced it.
    """
    _still_running(conn, run_id, dispatch)
    try:
        if source_restarted(client, conn, mapping, run_id, priority):
            return None
        linked = 0 if opts.dry_run else link_rows(conn, mapping, run_id)
        log.info("priority_batches_done", run=run_id, priority=priority.label, linked=linked)
        return plan_priority(client, conn, run_id, priority, opts)
    except Fenced:
        raise
    except Exception as exc:
        if transient(exc):
            raise
        conn.rollback()
        halt(conn, run_id, priority, f"finalize of priority {priority.label} failed: {redact_text(describe(exc))}")


def plan_priority(client: redis.Redis, conn: Any, run_id: str, priority: Priority, opts: RunOptions,
                  reason: dict[str, Any] | None = None) -> int:
    """Plan the verification that validates `priority` in the run: sealed (its keys counted, its rows'
    seals checked: migrator/core/seal.py) unless the run asked for the re-read (--validation reread), is
    a dry run (nothing kept: its keys counted), or `reason` says the seals did not hold: then every
    key is read again and compared with its rows."""
    sealed = opts.validation == "sealed" and not opts.dry_run and reason is None
    return verify.plan_verification(client, conn, run_id, [priority], from_spool=not opts.scan_each_priority,
                                    sealed=sealed, reason=reason)


def halt(conn: Any, run_id: str, priority: Priority, what: str) -> None:
    """A priority's step after its batches cannot be taken (not a verdict on the data): the run
    is failed, its rows kept, and says how to take the step again; raises Fenced (nothing follows)."""
    why = f"{what}; once its cause is fixed, run it again: migrator resume {run_id}"
    record(conn, run_id, priority.label, [Check("finalize", False, why)])
    _end(conn, run_id, "failed", why)
    log.error("finalize_failed", run=run_id, priority=priority.label, error=why)
    raise Fenced(why)


def _still_running(conn: Any, run_id: str, dispatch: int | None = None) -> None:
    with conn, conn.cursor() as cur:
        runstate.hold(cur, run_id)
        if dispatch is not None and ledger.dispatch_of(cur, run_id) != dispatch:
            raise Fenced(f"run {run_id}: these batches were sent again since (resume, requeue)")


def _end(conn: Any, run_id: str, to: str, error: str | None = None) -> None:
    """Move a running run on (to completed, failed, rolling_back ...); Fenced when it is no longer
    running: an operator stopped it meanwhile, and that stands."""
    with conn, conn.cursor() as cur:
        try:
            runstate.transition(cur, run_id, to, error)
        except runstate.NotNow as exc:
            raise Fenced(str(exc)) from None


@dataclass(frozen=True)
class Step:
    """What comes after judging a priority: the next priority (None: the run has ended), or a
    verification to run first and judge again (the source restarted under the last one)."""

    next: Priority | None = None
    verify_again: int | None = None


def judge_priority(client: redis.Redis, conn: Any, mapping: Mapping, run_id: str, priority: Priority,
                   opts: RunOptions, verification_id: int, dispatch: int | None = None) -> Step:
    """Judge `priority` on its verification; after the last one, the run's own checks too.

    A failure of the judging itself (say, a table gone missing) fails the priority like a failed
    check would, rather than leave the run running forever; connection trouble is raised for a retry.
    """
    _still_running(conn, run_id, dispatch)
    try:
        result = verify.finish(client, conn, mapping, verification_id, retire=True)  # (the run's own: see verify._retire)
        if (result.get("error") or "").startswith(verify.RESTARTED):
            log.warning("verification_restarted", run=run_id, priority=priority.label, verification=verification_id)
            return Step(verify_again=plan_priority(client, conn, run_id, priority, opts, result.get("reason")))
        if result["verdict"] == "unsealed":  # no verdict yet: whether the rows hold what Redis holds is read again
            broken = result["seal"]["broken"]
            log.warning("seal_broken", run=run_id, priority=priority.label, verification=verification_id,
                        tables={table: list(why.values()) for table, why in broken.items()})
            return Step(verify_again=plan_priority(client, conn, run_id, priority, opts,
                                                   {"verification_id": verification_id, "broken": broken}))
        checks = priority_checks(conn, mapping, run_id, priority, opts, result)
    except Fenced:
        raise  # (cancelled or stopped meanwhile: not a verdict on the data)
    except Exception as exc:
        if transient(exc):
            raise
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
        _end(conn, run_id, "failed", f"{bad} priority(ies) did not validate")
    else:
        _end(conn, run_id, "dry_run" if opts.dry_run else "completed")
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
    """Mark the run failed and, unless told not to, roll back everything it wrote (a rollback
    that fails leaves the run rollback_failed, saying why)."""
    rolls_back = opts.rollback_on_failure and not opts.dry_run
    _end(conn, run_id, "rolling_back" if rolls_back else "failed", reason)  # (no batch of it commits from here)
    log.warning("run_failed", run=run_id, reason=reason)
    if rolls_back:
        try:
            rollback_run(conn, mapping, run_id)
        except RollbackFailed:
            pass  # the run says so, with the error
        except runstate.NotNow as refused:  # a later run (a follow session) changed its rows: theirs go back first
            with conn, conn.cursor() as cur:
                runstate.transition(cur, run_id, "rollback_failed", f"{reason}; not rolled back: {refused}")
