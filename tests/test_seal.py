"""The sealed validation of a priority (migrator/core/seal.py): its rows checked against the seals its
batches wrote, Redis not read again; any doubt (a row changed, deleted, added) and every key of the
priority is read again and compared, which decides."""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone
from typing import Any

import migrator.core.verify
import migrator.execution.finalize
from migrator.apps.threadr.demo import seed_demo
from migrator.core.seal import row_seal

from helpers import migrate, verify

PROVENANCE = '{"source":"redis_thread"}'
ROW = {"id": "7f0e8a4c-0000-4000-8000-000000000001", "title": "A thread", "tweets": ["one", "two"],
       "created_at": datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc), "views": 3, "user_id": None}


def verifications(pg: Any, run_id: str) -> list[tuple]:
    """(priorities, compare, sealed, verdict, reason) of each verification of the run, in order."""
    with pg.cursor() as cur:
        cur.execute("SELECT priorities, compare, sealed, result ->> 'verdict', reason FROM migration_verifications"
                    " WHERE run_id = %s ORDER BY id", (run_id,))
        found = cur.fetchall()
    pg.rollback()
    return found


def validation(pg: Any, run_id: str, priority: str) -> dict[str, dict]:
    """The checks of a priority's latest validation, by name."""
    with pg.cursor() as cur:
        cur.execute("SELECT checks FROM migration_validations WHERE run_id = %s AND priority = %s"
                    " ORDER BY created_at DESC LIMIT 1", (run_id, priority))
        (checks,) = cur.fetchone()
    pg.rollback()
    return {c["name"]: c for c in checks}


def reads_while_validating(monkeypatch: Any) -> list[int]:
    """Keys the in-run validations read from Redis (the verifier's value reads), counted."""
    counted = [0]
    real = migrator.core.verify.read_keys

    def counting(client, keys, *args, **kwargs):
        counted[0] += len(keys)
        return real(client, keys, *args, **kwargs)

    monkeypatch.setattr(migrator.core.verify, "read_keys", counting)
    return counted


def damage_after_critical_batches(monkeypatch: Any, statement: str) -> None:
    """`statement` runs once critical's batches are in and linked, before its validation (as an
    operator's session would: no seal vouches for what it changes)."""
    real_link = migrator.execution.finalize.link_rows
    calls = []

    def link_then_damage(conn, mapping, run_id):
        linked = real_link(conn, mapping, run_id)
        calls.append(run_id)
        if len(calls) == 1:
            with conn, conn.cursor() as cur:
                cur.execute(statement)
        return linked

    monkeypatch.setattr(migrator.execution.finalize, "link_rows", link_then_damage)


GRANT = "(SELECT id FROM subscriptions WHERE kind = 'premium_grant' AND source_key LIKE 'threadr:premium:email:%' ORDER BY id LIMIT 1)"


def test_the_seal_is_of_the_row_as_sent_the_same_in_every_process_and_not_of_its_linked_columns():
    seal = row_seal("threads", ROW, "threadr:thread:1", PROVENANCE, 1234)
    code = ("import datetime; from migrator.core.seal import row_seal; "
            f"print(row_seal('threads', {ROW!r}, 'threadr:thread:1', {PROVENANCE!r}, 1234))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert int(other.stdout) == seal  # (another process, another hash seed: the same seal)
    assert -2**63 <= seal < 2**63  # a bigint
    assert row_seal("threads", {**ROW, "views": 4}, "threadr:thread:1", PROVENANCE, 1234) != seal
    assert row_seal("threads", {**ROW, "tweets": ["one", "tw0"]}, "threadr:thread:1", PROVENANCE, 1234) != seal
    assert row_seal("threads", ROW, "threadr:thread:2", PROVENANCE, 1234) != seal
    assert row_seal("threads", ROW, "threadr:thread:1", '{"source":"redis_other"}', 1234) != seal
    assert row_seal("threads", ROW, "threadr:thread:1", PROVENANCE, 1235) != seal
    assert row_seal("thread_stats", ROW, "threadr:thread:1", PROVENANCE, 1234) != seal
    # a linked column, which the link step fills later, is no part of it
    linked = frozenset({"user_id"})
    assert (row_seal("threads", {**ROW, "user_id": "9c1e0000-0000-4000-8000-000000000002"}, "threadr:thread:1",
                     PROVENANCE, 1234, linked) == row_seal("threads", ROW, "threadr:thread:1", PROVENANCE, 1234, linked))


def test_a_clean_run_is_validated_by_its_seals_without_reading_redis_again(settings, r, pg, monkeypatch):
    seed_demo(r, 60)
    r.delete(*r.keys("threadr:premium:ip:*"))  # a grant's row under its ip key as well is shared: see below
    reads = reads_while_validating(monkeypatch)
    report = migrate(settings)
    assert report["status"] == "completed", report["error"]
    assert reads[0] == 0  # no value read again
    found = verifications(pg, report["run_id"])
    assert [(p, compare, sealed, verdict) for p, compare, sealed, verdict, _ in found] == \
        [([p], False, True, "sealed") for p in ("critical", "high", "medium", "low")]
    for priority in ("critical", "high", "medium", "low"):
        checks = validation(pg, report["run_id"], priority)
        assert all(c["ok"] for c in checks.values())
        assert checks["verification"]["data"]["validation"] == "sealed"
        assert "as their batches wrote them" in checks["verification"]["detail"]
    with pg.cursor() as cur:
        cur.execute("SELECT count(*) FILTER (WHERE row_seal IS NULL), count(*) FROM threads")
        unsealed, rows = cur.fetchone()
    pg.rollback()
    assert rows > 0 and unsealed == 0
    assert report["validated_by"] == {p: "sealed" for p in ("critical", "high", "medium", "low")}
    # the independent check, every key read again, agrees
    assert verify(settings, report["run_id"])["verdict"] == "clean"
