"""Reconciliation of a follow session: what the keyspace notifications missed (pub/sub drops them
while the subscriber is disconnected), found by the verification's own comparison and applied.

Range by range, the keys are compared with their rows (verify.check_range: their digests, column by
column). A range that differs is compared again once every change received before the first
comparison has been applied: what still differs, of keys with no event since, was missed, and those
keys are applied again (a key's current value, whole; under steady writes a key changed since is being
applied already, and is no miss); when too many differ to name, every key of the range. Then
the rows whose key is gone (a deletion missed) are found per table and retired by their table's
rule. Each reconciliation is recorded with its outcome; "clean" means nothing differed that the
events had not brought.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import redis
import structlog
from psycopg2 import sql

from migrator.core import ledger
from migrator.core import metrics
from migrator.execution.finalize import link_rows
from migrator.execution.follow import OPTIONS, Dirty, now_iso
from migrator.core.mapping import Mapping, Priority
from migrator.core.partition import KeyRange, plan_ranges, scan_range
from migrator.core.redact import redact_text
from migrator.core.source import key_client, node_client, roundtrip
from migrator.core.verify import DIFFERING, Tally, check_range
from migrator.core.writer import describe

log = structlog.get_logger("migrator.execution.reconcile")

# How long a range that differs waits for the changes received before it was compared to be applied.
SETTLE_S = 30.0
# Distinct source keys asked EXISTS per round trip.
EXISTS_CHUNK = 500


def reconcile(client: redis.Redis, connect: Callable[[], Any], mapping: Mapping, run_id: str, dirty: Dirty,
              reason: str) -> dict[str, Any]:
    """Compare the keyspace with its rows, mark dirty what the events missed; the outcome, recorded."""
    conn = connect()
    started = time.monotonic()
    try:
        with conn, conn.cursor() as cur:
            rec_id = ledger.start_reconciliation(cur, run_id, reason)
        try:
            outcome = _compare_all(client, conn, mapping, run_id, dirty)
        except Exception as exc:
            metrics.FOLLOW_RECONCILIATIONS.labels("failed").inc()
            error = redact_text(describe(exc))
            if not conn.closed:
                conn.rollback()
                with conn, conn.cursor() as cur:
                    ledger.fail_reconciliation(cur, rec_id, error)
            raise
        with conn, conn.cursor() as cur:
            ledger.end_reconciliation(cur, rec_id, outcome)
        metrics.FOLLOW_RECONCILIATIONS.labels("clean" if outcome["clean"] else "repaired").inc()
    finally:
        conn.close()
    log.info("reconciliation_done", run=run_id, reason=reason, clean=outcome["clean"], ranges=outcome["ranges"],
             ranges_repaired=len(outcome["repaired"]), keys_reapplied=outcome["keys_reapplied"],
             keys_gone=outcome["keys_gone"], seconds=round(time.monotonic() - started, 3))
    return outcome


def _compare_all(client: redis.Redis, conn: Any, mapping: Mapping, run_id: str, dirty: Dirty) -> dict[str, Any]:
    link_rows(conn, mapping, run_id)  # rows applied before the entity they name: linked now
    ranges = plan_ranges(client, None)
    labels = tuple(p.label for p in Priority)
    since = now_iso()
    repaired, reapplied, attributed = [], 0, {}
    for n, key_range in enumerate(ranges):
        spec = ledger.VerifySpec(n, None, run_id, labels, True, key_range, OPTIONS, since)
        compared_at = time.monotonic()
        tally = check_range(client, conn, mapping, spec)
        if _differs(tally):
            # changes received but not applied yet differ too: only what differs once they are in was missed
            deadline = time.monotonic() + SETTLE_S
            while not dirty.applied_through(compared_at) and time.monotonic() < deadline:
                time.sleep(0.05)
            tally = check_range(client, conn, mapping, spec)
            if _differs(tally):
                keys = _reapply(client, mapping, key_range, dirty) if tally.overflowed else \
                    _reapply_missed(tally.differing, compared_at, dirty)
                if keys:
                    reapplied += keys
                    repaired.append({"range": n, "node": key_range.node, "keys": keys,
                                     "differences": {f: sum(c[f] for c in tally.patterns.values()) for f in DIFFERING}})
        for table, found in tally.attributed.items():
            attributed[table] = attributed.get(table, 0) + found
    gone = _gone_keys(client, conn, mapping, attributed, dirty)
    return {"ranges": len(ranges), "repaired": repaired, "keys_reapplied": reapplied, "keys_gone": gone,
            "clean": not repaired and not gone}


def _differs(tally: Tally) -> bool:
    return any(c[f] for c in tally.patterns.values() for f in DIFFERING)


def _reapply_missed(differing: set[str], compared_at: float, dirty: Dirty) -> int:
    """The keys whose rows still differ and that no event has named since they were first compared,
    marked to apply again from their value alone (a reset); how many."""
    missed = [key.encode() for key in differing if not dirty.changed_since(key.encode(), compared_at)]
    for key in missed:
        dirty.add(key, event=False, reset=True)
    return len(missed)


def _reapply(client: redis.Redis, mapping: Mapping, key_range: KeyRange, dirty: Dirty) -> int:
    """Every key of a migrated pattern in the range, marked to apply again from its value alone (a
    reset: a merge rule would keep what differs, a counter's greater old value); how many."""
    node = node_client(client, key_range.node) if key_range.node else client
    prefixes = mapping.prefixes([p for p in mapping.patterns if p.migrated])
    marked = 0
    try:
        for keys in scan_range(node, key_range, OPTIONS.scan_count):
            for key in keys:
                if key.startswith(prefixes):
                    dirty.add(key, event=False, reset=True)
                    marked += 1
    finally:
        if node is not client:
            node.close()
    return marked


def _gone_keys(client: redis.Redis, conn: Any, mapping: Mapping, attributed: dict[str, int], dirty: Dirty) -> int:
    """Per table whose rows from keys outnumber those the ranges found under their key: the keys of
    its rows that are not in Redis any more, marked to apply (their rows get the table's on_delete);
    how many."""
    reader = key_client(client)
    gone = 0
    for table in mapping.table_names():
        rule = mapping.rule(table)
        live = sql.SQL("t.source_key IS NOT NULL") + (sql.SQL(" AND t.{} IS NULL").format(sql.Identifier(rule.deleted_at))
                                                     if rule.on_delete == "mark" else sql.SQL(""))
        with conn, conn.cursor() as cur:
            cur.execute(sql.SQL("SELECT count(*) FROM {} t WHERE {}").format(sql.Identifier(table), live))
            if cur.fetchone()[0] <= attributed.get(table, 0):
                continue
        with conn, conn.cursor(name="reconcile_keys") as cur:  # streamed: a table may not fit in memory
            cur.itersize = EXISTS_CHUNK
            cur.execute(sql.SQL("SELECT DISTINCT t.source_key FROM {} t WHERE {}").format(sql.Identifier(table), live))
            while chunk := [k.encode() for (k,) in cur.fetchmany(EXISTS_CHUNK)]:
                for key, exists in zip(chunk, roundtrip(reader, [("EXISTS", k) for k in chunk])):
                    if not exists:
                        dirty.add(key, event=False)
                        gone += 1
    return gone
