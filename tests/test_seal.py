"""The sealed validation of a priority (migrator/core/seal.py): its rows checked against the seals its
batches wrote, Redis not read again; any doubt (a row changed, deleted, added) and every key of the
priority is read again and compared, which decides."""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import migrator.core.verify
import migrator.execution.finalize
from migrator.apps.threadr import THREADR
from migrator.apps.threadr.demo import seed_demo
from migrator.core.mapping import Row
from migrator.core.source import KeyRead
from migrator.core.writer import Prepared, Writer

from helpers import migrate, verify

ROW = {"id": "7f0e8a4c-0000-4000-8000-000000000001", "title": "A thread", "tweets": ["one", "two"],
       "created_at": datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc), "views": 3, "user_id": None}
USER = {"id": "7f0e8a4c-0000-4000-8000-00000000000b", "email": "a@example.com",
        "created_at": datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=timezone.utc), "premium": True}


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


RUN = "6b0a8f5e-6f43-4d8e-9a57-3f1c2b7d9e10"
EXPIRES = datetime(2026, 12, 24, 8, 30, tzinfo=timezone.utc)
SESSION = {"id": "7f0e8a4c-0000-4000-8000-00000000000a", "user_ref": "u1", "email": "a@example.com", "user_id": None}


def record(key: str, rows: list[Row], pattern: str = "thread", digest: int = 1234,
           expires_at: datetime | None = None) -> Prepared:
    return Prepared(key.encode(), key, next(p for p in THREADR.patterns if p.name == pattern), rows, expires_at,
                    KeyRead(key.encode(), "string", -1, b"", 0), digest)


def seal_of(rec: Prepared, run_id: str = RUN) -> int:
    """The seal a bulk batch's writer gives the record's one row."""
    Writer(None, THREADR, run_id, fenced=True).documents([rec])  # (the cursor is for the statements alone)
    ((_, seal),) = rec.seals
    return seal


def sample_seal() -> int:
    return seal_of(record("threadr:thread:1", [Row("threads", dict(ROW))]))


def test_the_writer_sends_each_row_as_before_its_provenance_and_seal_beside_it():
    """The documents hold, column by column, what the writer sent before it serialised each row once:
    its values (a marked table's mark cleared), run, key, provenance, expiry, digest and seal; a
    row id seen twice in a later upsert; the rows of an upsert in id order."""
    first, again = dict(ROW), {**ROW, "views": 5}
    other = {**ROW, "id": "7f0e8a4c-0000-4000-8000-000000000000", "tweets": ["é \u00e9", 'q"uote']}
    records = [record("threadr:thread:1", [Row("threads", first)], expires_at=EXPIRES),
               record("threadr:thread:2", [Row("threads", again), Row("threads", other)], digest=-7),
               record("threadr:session:u1", [Row("sessions", dict(SESSION))], pattern="session"),
               record("threadr:user:u1", [Row("users", dict(USER))], pattern="user")]  # (a table no link fills)
    made = Writer(None, THREADR, RUN, fenced=True).documents(records)
    sent = [(table, [dict(zip(columns, line, strict=True)) for line in orjson.loads(document)])
            for table, columns, document in made]

    def expected(rec: Prepared, values: dict[str, Any], seal: int) -> dict[str, Any]:
        # the values as orjson writes them, the provenance as its pattern's metadata
        return {**orjson.loads(orjson.dumps(values)), "migration_run": RUN, "source_key": rec.key_text,
                "metadata": orjson.loads(rec.pattern.provenance), "source_digest": rec.digest,
                "expires_at": orjson.loads(orjson.dumps(rec.expires_at)), "row_seal": seal}

    (one,), (two, three), (four,), (five,) = (rec.seals for rec in records)
    assert sent == [
        ("users", [expected(records[3], USER, five[1])]),
        ("threads", [expected(records[1], other, three[1]), expected(records[0], first, one[1])]),
        ("sessions", [expected(records[2], {**SESSION, "deleted_at": None}, four[1])]),  # (its mark cleared)
        ("threads", [expected(records[1], again, two[1])]),  # the same id again: the next round
    ]
    assert [table for table, _ in (one, two, three, four, five)] == ["threads", "threads", "threads", "sessions", "users"]
    # the app's own writes and follow's send no seal
    (_, _, document), *_ = Writer(None, THREADR, None).documents(records[:1])
    assert orjson.loads(document)[0][-3:] == [None, "2026-12-24T08:30:00+00:00", None]


def test_the_seal_is_of_the_row_as_sent_the_same_in_every_process_and_not_of_its_linked_columns_or_expiry():
    seal = sample_seal()
    code = f"import sys; sys.path[:0] = {[str(Path(__file__).parent)]!r}; import test_seal; print(test_seal.sample_seal())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert int(other.stdout) == seal  # (another process, another hash seed: the same seal)
    assert -2**63 <= seal < 2**63  # a bigint
    key = "threadr:thread:1"
    changed = {
        "a value": record(key, [Row("threads", {**ROW, "views": 4})]),
        "a value within a list": record(key, [Row("threads", {**ROW, "tweets": ["one", "tw0"]})]),
        "a value now null": record(key, [Row("threads", {**ROW, "title": None})]),
        "a column more": record(key, [Row("threads", {**ROW, "deleted": False})]),
        "the same values under other names": record(key, [Row("threads", {(c if c != "title" else "subject"): v
                                                                          for c, v in ROW.items()})]),
        "the key": record("threadr:thread:2", [Row("threads", dict(ROW))]),
        "the provenance": record(key, [Row("threads", dict(ROW))], pattern="session"),
        "the digest": record(key, [Row("threads", dict(ROW))], digest=1235),
        "the table": record(key, [Row("thread_stats", dict(ROW))]),
    }
    seals = {what: seal_of(rec) for what, rec in changed.items()}
    assert seal not in seals.values() and len(set(seals.values())) == len(seals), seals
    # a linked column, which the link step fills later, its run and its expiry are no part of it
    assert seal_of(record(key, [Row("threads", {**ROW, "user_id": "9c1e0000-0000-4000-8000-000000000002"})])) == seal
    assert seal_of(record(key, [Row("threads", dict(ROW))]), run_id="00000000-0000-4000-8000-000000000009") == seal
    assert seal_of(record(key, [Row("threads", dict(ROW))], expires_at=EXPIRES)) == seal


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


def seals(pg: Any, table: str) -> dict[str, int | None]:
    with pg.cursor() as cur:
        cur.execute(f"SELECT id::text, row_seal FROM {table}")  # (a test's own table name)
        found = dict(cur.fetchall())
    pg.rollback()
    return found


def fell_back(pg: Any, run_id: str) -> tuple[dict, dict]:
    """Critical's sealed verification did not hold and a full one followed: what the seal check found
    broken (kept with the full one), and the full one's result."""
    with pg.cursor() as cur:
        cur.execute("SELECT compare, sealed, result, reason FROM migration_verifications WHERE run_id = %s"
                    " AND priorities = '{critical}' ORDER BY id", (run_id,))
        (compare, sealed, counted, _), (full_compare, full_sealed, full, reason) = cur.fetchall()
    pg.rollback()
    assert (compare, sealed, counted["verdict"]) == (False, True, "unsealed")
    assert (full_compare, full_sealed) == (True, False)
    assert reason["broken"] == counted["seal"]["broken"] and "subscriptions" in reason["broken"]
    return reason["broken"]["subscriptions"], full


# (subscriptions' rows may be given by a grant's ip key and its email key together: the check says so)
SHARED_UNSEALED = "1 row(s) without a seal: changed since their batch wrote them, or given by more than one key of premium_ip, premium_email (merged)"


def only_email_grants(r: Any) -> None:
    seed_demo(r, 60)
    r.delete(*r.keys("threadr:premium:ip:*"))  # no row under two keys: critical is sealed unless damaged


def test_a_column_changed_after_the_batches_loses_its_seal_and_the_full_pass_finds_it_different(
        settings, r, pg, monkeypatch):
    only_email_grants(r)
    damage_after_critical_batches(monkeypatch, f"UPDATE subscriptions SET plan = 'tampered' WHERE id = {GRANT}")
    report = migrate(settings)
    assert report["status"] == "rolled_back"
    broken, full = fell_back(pg, report["run_id"])
    assert list(broken.values()) == [SHARED_UNSEALED]
    assert full["different"] == 1 and full["missing"] == full["extra"] == 0
    checks = validation(pg, report["run_id"], "critical")
    assert not checks["verification"]["ok"] and checks["verification"]["data"]["validation"] == "reread after the seals"
    assert checks["verification"]["detail"].startswith("the seals did not hold (subscriptions: 1 row(s) without a seal: changed")


def test_a_row_deleted_after_the_batches_is_missing(settings, r, pg, monkeypatch):
    only_email_grants(r)
    damage_after_critical_batches(monkeypatch, f"DELETE FROM subscriptions WHERE id = {GRANT}")
    report = migrate(settings)
    assert report["status"] == "rolled_back"
    broken, full = fell_back(pg, report["run_id"])
    assert any("row(s) where the batches wrote" in why for why in broken.values())
    assert full["missing"] == 1 and full["different"] == full["extra"] == 0


def test_a_foreign_row_with_the_pattern_s_provenance_and_a_copied_seal_is_extra(settings, r, pg, monkeypatch):
    only_email_grants(r)
    # (an INSERT by hand keeps no seal, and the count gives it away too)
    damage_after_critical_batches(monkeypatch, "INSERT INTO subscriptions SELECT (jsonb_populate_record(NULL::subscriptions,"
                                  " to_jsonb(s) || jsonb_build_object('id', gen_random_uuid(), 'source_key', NULL))).*"
                                  f" FROM subscriptions s WHERE id = {GRANT}")
    report = migrate(settings)
    assert report["status"] == "rolled_back"
    broken, full = fell_back(pg, report["run_id"])
    assert list(broken.values()) == [SHARED_UNSEALED]
    assert full["extra"] == 1 and full["missing"] == full["different"] == 0


def test_a_row_deleted_and_put_back_changed_with_its_seal_copied_loses_the_seal(settings, r, pg, monkeypatch):
    """An INSERT outside a sealed write keeps no seal: a row put back by hand, seal and all, is read again."""
    only_email_grants(r)
    damage_after_critical_batches(
        monkeypatch, f"CREATE TEMP TABLE kept AS SELECT * FROM subscriptions WHERE id = {GRANT};"
        " DELETE FROM subscriptions WHERE id = (SELECT id FROM kept);"
        " INSERT INTO subscriptions SELECT (jsonb_populate_record(NULL::subscriptions,"
        " to_jsonb(k) || jsonb_build_object('plan', 'tampered'))).* FROM kept k; DROP TABLE kept")
    report = migrate(settings)
    assert report["status"] == "rolled_back"
    broken, full = fell_back(pg, report["run_id"])
    assert list(broken.values()) == [SHARED_UNSEALED]
    assert full["different"] == 1 and full["missing"] == full["extra"] == 0


def test_a_row_written_back_as_it_was_loses_its_seal_and_the_full_pass_passes_it(settings, r, pg, monkeypatch):
    only_email_grants(r)
    damage_after_critical_batches(monkeypatch, f"UPDATE subscriptions SET plan = plan WHERE id = {GRANT}")
    report = migrate(settings)
    assert report["status"] == "completed", report["error"]
    broken, full = fell_back(pg, report["run_id"])
    assert list(broken.values()) == [SHARED_UNSEALED]
    assert full["verdict"] == "clean"
    assert report["validated_by"] == {"critical": "reread after the seals", "high": "sealed", "medium": "sealed",
                                      "low": "sealed"}


def test_a_row_two_keys_give_makes_its_priority_read_again_and_it_passes(settings, r, pg, monkeypatch):
    """A premium grant under its ip key and its email key: one row, written twice, merged (each key fills
    its own lookup column), sealed by neither; its priority's keys are read again, and they match."""
    seed_demo(r, 60)
    reads = reads_while_validating(monkeypatch)
    report = migrate(settings)
    assert report["status"] == "completed", report["error"]
    broken, full = fell_back(pg, report["run_id"])
    assert all(why.endswith("given by more than one key of premium_ip, premium_email (merged)") for why in broken.values())
    assert full["verdict"] == "clean" and reads[0] == full["totals"]["compared"] > 0  # critical's keys alone
    assert report["validated_by"] == {"critical": "reread after the seals", "high": "sealed", "medium": "sealed",
                                      "low": "sealed"}


def test_the_reread_validation_compares_every_key_as_before(settings, r, pg, monkeypatch):
    only_email_grants(r)
    reads = reads_while_validating(monkeypatch)
    report = migrate(settings, validation="reread")
    assert report["status"] == "completed", report["error"]
    found = verifications(pg, report["run_id"])
    assert [(p, compare, sealed, verdict, reason) for p, compare, sealed, verdict, reason in found] == \
        [([p], True, False, "clean", None) for p in ("critical", "high", "medium", "low")]
    assert reads[0] >= sum(p["migrated"] for p in report["patterns"])  # every key migrated, read again
    assert report["validated_by"] == {p: "reread" for p in ("critical", "high", "medium", "low")}
    assert "every key's rows match PostgreSQL" in validation(pg, report["run_id"], "high")["verification"]["detail"]


def test_a_rerun_keeps_the_seals_of_unchanged_rows_reseals_a_changed_one_and_is_sealed_again(settings, r, pg):
    only_email_grants(r)
    first = migrate(settings)
    assert first["status"] == "completed", first["error"]
    before = {table: seals(pg, table) for table in ("subscriptions", "users", "threads", "usage_counters", "sessions")}
    assert all(None not in found.values() for found in before.values())
    counter = sorted(r.keys("threadr:usage:ip:*:daily:*"))[0]
    r.incr(counter)  # its row updated by the batch's upsert (GREATEST takes the new count): sealed anew
    second = migrate(settings)
    assert second["status"] == "completed", second["error"]
    after = {table: seals(pg, table) for table in before}
    changed = {(table, row_id) for table in before for row_id in before[table] if after[table][row_id] != before[table][row_id]}
    assert after["usage_counters"].keys() == before["usage_counters"].keys() and len(changed) == 1
    ((table, row_id),) = changed
    assert table == "usage_counters" and after[table][row_id] is not None
    assert second["validated_by"] == {p: "sealed" for p in ("critical", "high", "medium", "low")}


def test_a_counter_the_merge_keeps_above_what_was_sent_leaves_its_row_unsealed_for_the_full_pass(settings, r, pg):
    """GREATEST keeps a counter that went down in Redis, on a row the app wrote since its batch (through
    the dual-write service: no seal of a batch of this key says the batch's read was the last): the row
    is not what its batch sent, so it keeps no seal, and the full pass finds the row different from its key."""
    only_email_grants(r)
    key = sorted(r.keys("threadr:thread_stats:*"))[0]
    r.set(key, orjson.dumps({"created": 5, "viewed": 5}))
    assert migrate(settings)["status"] == "completed"
    with pg.cursor() as cur:  # written since by another than a batch (its seal goes)
        cur.execute("UPDATE thread_stats SET created = created WHERE source_key = %s", (key.decode(),))
    pg.commit()
    r.set(key, orjson.dumps({"created": 6, "viewed": 1}))  # one up (the row is updated), one down (kept at 5)
    report = migrate(settings)
    assert report["status"] == "rolled_back"
    with pg.cursor() as cur:
        cur.execute("SELECT result FROM migration_verifications WHERE run_id = %s AND priorities = '{medium}'"
                    " ORDER BY id", (report["run_id"],))
        (counted,), (full,) = cur.fetchall()
    pg.rollback()
    assert counted["verdict"] == "unsealed" and "thread_stats" in counted["seal"]["broken"]
    assert full["different"] == 1 and {p["pattern"]: p["columns"] for p in full["patterns"] if p["different"]} == \
        {"thread_stats": {"viewed": 1}}


def test_a_sealed_write_leaves_sealing_off_for_the_rest_of_its_transaction(settings, r, pg):
    seed_demo(r, 20)
    assert migrate(settings)["status"] == "completed"
    with pg.cursor() as cur:
        cur.execute("SELECT * FROM migrator_write_sealed('{}', '{}')")  # (a bulk batch's sub-batch, of nothing)
        cur.execute("UPDATE threads SET title = title WHERE id = (SELECT min(id::text)::uuid FROM threads) RETURNING row_seal")
        assert cur.fetchone() == (None,)
    pg.rollback()


def test_a_trigger_of_the_table_s_own_that_changes_rows_as_they_are_written_is_not_vouched_for(settings, r, pg):
    """A BEFORE INSERT trigger changes each row as sent (no seal can tell) and an AFTER INSERT one
    updates it inside the batch's own sealed write: neither table's seals are trusted."""
    only_email_grants(r)
    with pg, pg.cursor() as cur:
        cur.execute("CREATE FUNCTION pad() RETURNS trigger LANGUAGE plpgsql AS $$"
                    " BEGIN NEW.login_count := NEW.login_count + 1000; RETURN NEW; END $$")
        cur.execute("CREATE TRIGGER pad BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION pad()")
        cur.execute("CREATE FUNCTION bump() RETURNS trigger LANGUAGE plpgsql AS $$"
                    " BEGIN UPDATE threads SET title = title || '!' WHERE id = NEW.id; RETURN NULL; END $$")
        cur.execute("CREATE TRIGGER bump AFTER INSERT ON threads FOR EACH ROW EXECUTE FUNCTION bump()")
    try:
        report = migrate(settings, rollback_on_failure=False)
        with pg.cursor() as cur:
            cur.execute("SELECT count(*) FILTER (WHERE row_seal IS NOT NULL), count(*) FROM threads")
            sealed, rows = cur.fetchone()
    finally:
        with pg, pg.cursor() as cur:
            cur.execute("DROP TRIGGER pad ON users; DROP FUNCTION pad(); DROP TRIGGER bump ON threads; DROP FUNCTION bump()")
    assert report["status"] == "failed" and report["validated"] == {"critical": True, "high": False}
    assert rows > 0 and sealed == 0  # (the update inside the sealed write, from another trigger, kept none)
    counted = next(v for v in verifications(pg, report["run_id"]) if v[0] == ["high"])
    assert counted[3] == "unsealed"
    with pg.cursor() as cur:
        cur.execute("SELECT result -> 'seal' -> 'broken' FROM migration_verifications WHERE run_id = %s"
                    " AND priorities = '{high}' AND sealed", (report["run_id"],))
        (broken,) = cur.fetchone()
    pg.rollback()
    assert broken["users"] == {"triggers": "trigger(s) pad of its own may change a row as it is written"}
    assert broken["threads"] == {"triggers": "trigger(s) bump of its own may change a row as it is written"}


def test_a_row_marked_deleted_is_left_out_of_the_seal_check_and_one_unmarked_turns_it(settings, r, pg):
    """A login session that ended (`follow` marks its row, kept as history) is no key's row to give: a
    re-run that no longer finds its key is sealed all the same. The same row with the mark taken off
    by hand is a live row no batch wrote: low is read again, and the full pass finds it extra, and
    marks it again (its table's on_delete: verify._retire)."""
    only_email_grants(r)
    assert migrate(settings)["status"] == "completed"
    ended = sorted(r.keys("threadr:session:*"))[0]
    with pg, pg.cursor() as cur:
        # (as follow marks it: the update also takes its seal away)
        cur.execute("UPDATE sessions SET deleted_at = now() WHERE source_key = %s RETURNING row_seal", (ended.decode(),))
        assert cur.fetchall() == [(None,)]
    r.delete(ended)
    second = migrate(settings)
    assert second["status"] == "completed", second["error"]
    assert second["validated_by"]["low"] == "sealed"
    with pg, pg.cursor() as cur:
        cur.execute("UPDATE sessions SET deleted_at = NULL WHERE source_key = %s", (ended.decode(),))
    third = migrate(settings)
    assert third["validated_by"]["low"] == "reread after the seals; 1 stale row(s) retired"
    assert third["status"] == "completed", third["error"]
    with pg.cursor() as cur:
        cur.execute("SELECT deleted_at IS NOT NULL FROM sessions WHERE source_key = %s", (ended.decode(),))
        assert cur.fetchall() == [(True,)]
        cur.execute("SELECT result -> 'seal' -> 'broken' -> 'sessions' FROM migration_verifications WHERE run_id = %s"
                    " AND priorities = '{low}' AND sealed", (third["run_id"],))
        (broken,) = cur.fetchone()
    pg.rollback()
    assert list(broken.values()) == ["1 row(s) without a seal: changed since their batch wrote them"]
