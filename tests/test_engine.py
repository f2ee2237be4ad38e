"""The engine against real Redis and PostgreSQL: balance, idempotence, bisection, dry runs, hostile input."""
from __future__ import annotations

import gc
import json
import os
import time
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
import pytest

import migrator.core.batch
from migrator.apps.threadr.demo import DANGLING, GIANT_THREAD_BYTES, seed_demo, seed_hostile
from migrator.core.ledger import COUNT_FIELDS
from migrator.core.mapping import UNMAPPED
from migrator.core.rollback import rollback_run
from migrator.core.options import RunOptions
from migrator.core.runstate import NotNow
from migrator.execution.finalize import fail_run
from migrator.apps.threadr import THREADR

from helpers import by_pattern, fingerprint, grants_after_critical_batches, migrate, validate, verify

USER = {"user_id": None, "email": None, "password_hash": "$2b$12$abcdefghijklmnopqrstuvABCDEFGHIJKLMNOPQRSTUVWXYZ01234",
        "role": "user", "status": "active", "created_at": "2026-01-01T00:00:00", "updated_at": "2026-01-02 00:00:00",
        "login_count": 1, "failed_login_attempts": 0, "is_email_verified": False, "metadata": {}}


def put_user(r, ref: str, email: str, **over) -> None:
    """A user as the app stores one: its record and its email index entry."""
    r.set(f"threadr:user:{ref}", json.dumps({**USER, "user_id": ref, "email": email, **over}), ex=86400)
    r.set(f"threadr:user:email:{email}", ref, ex=86400)


def test_demo_keyspace_balances_for_every_pattern(settings, r, pg):
    seeded = seed_demo(r, 300, malformed=12)
    report = migrate(settings)
    assert report["status"] == "completed" and report["balanced"]
    patterns = by_pattern(report)
    for p in patterns.values():
        assert p["scanned"] == p["migrated"] + p["skipped"] + p["dead"] + p["expired"], p
    # every key of the keyspace is accounted for exactly once
    assert report["totals"]["scanned"] == r.dbsize()
    # only what Threadr's code could not have written: the hostile keys, and one record its model refuses
    assert report["totals"]["dead"] == seeded["malformed"] + seeded["refused"] == 12 + 1
    # the index checks find exactly the dangling references the demo leaves (and what the app
    # races leave is within budget: the run completed)
    assert {name: p["dangling"] for name, p in patterns.items() if p["dangling"]} == DANGLING
    # the run spaced the garbage collector's passes out in its process (the bench shows why)
    assert gc.get_threshold() == migrator.core.batch.GC_THRESHOLDS
    for pattern in THREADR.patterns:
        if seeded.get(pattern.name):
            assert pattern.name in patterns, pattern.name
            if pattern.skip:  # (an index of the wrong type is a dead letter)
                assert patterns[pattern.name]["skipped"] + patterns[pattern.name]["dead"] == \
                    patterns[pattern.name]["scanned"] > 0
                assert patterns[pattern.name]["skip_reason"] == pattern.skip
    assert patterns[UNMAPPED]["skipped"] == seeded["unmapped"]
    with pg.cursor() as cur:
        cur.execute("SELECT count(*) FROM migration_dead_letters WHERE run_id = %s AND error <> ''", (report["run_id"],))
        assert cur.fetchone()[0] == seeded["malformed"] + seeded["refused"]
        cur.execute("SELECT error FROM migration_dead_letters WHERE run_id = %s AND pattern = 'user_threads'",
                    (report["run_id"],))
        assert {e for e, in cur.fetchall()} == {"wrong Redis type: expected string, found set"}  # an index, read
        cur.execute("SELECT count(*) FROM users WHERE metadata->>'source' LIKE '%%redis%%'")
        assert cur.fetchone()[0] == patterns["user"]["migrated"]


def test_second_run_leaves_identical_tables(settings, r, pg):
    seed_demo(r, 150)
    first = migrate(settings)
    before = fingerprint(pg)
    second = migrate(settings)
    assert fingerprint(pg) == before
    assert second["figures"]["rows_written"] == 0 and first["figures"]["rows_written"] > 0
    assert [(p["pattern"], p["migrated"]) for p in second["patterns"]] == [(p["pattern"], p["migrated"]) for p in first["patterns"]]


def test_dry_run_numbers_equal_real_run_numbers_and_keep_nothing(settings, r, pg):
    seed_demo(r, 150, malformed=6)
    empty = fingerprint(pg)
    dry = migrate(settings, dry_run=True)
    assert dry["status"] == "dry_run" and fingerprint(pg) == empty
    real = migrate(settings)
    assert real["status"] == "completed"
    counts = lambda report: [(p["pattern"], *(p[f] for f in (*COUNT_FIELDS, "rows"))) for p in report["patterns"]]
    assert counts(dry) == counts(real) and dry["figures"]["rows_written"] == real["figures"]["rows_written"]


def test_poisoned_sub_batch_commits_good_rows_and_dead_letters_only_bad_ones(settings, r, pg):
    """Records Python accepts and PostgreSQL refuses are found by halving the sub-batch."""
    for i in range(20):
        put_user(r, f"user_{i:02d}", f"u{i}@x.io")
    put_user(r, "user_overflow", "big@x.io", login_count=2 ** 40)  # beyond the integer column
    put_user(r, "user_nul", "nul\u0000@x.io")  # a NUL: no text column holds one
    report = migrate(settings, batch_size=50)
    users = by_pattern(report)["user"]
    assert (users["migrated"], users["dead"]) == (20, 2)
    with pg.cursor() as cur:
        cur.execute("SELECT key_text, error FROM migration_dead_letters WHERE pattern = 'user'")
        letters = dict(cur.fetchall())
        cur.execute("SELECT count(*) FROM users")
        assert cur.fetchone()[0] == 20
    assert set(letters) == {"threadr:user:user_overflow", "threadr:user:user_nul"}
    assert "out of range" in letters["threadr:user:user_overflow"]
    assert "holds a NUL character (\\u0000)" in letters["threadr:user:user_nul"]


def test_check_violation_and_unique_violation_in_one_sub_batch(settings, r, pg):
    """A CHECK of the table and a unique index, violated in one sub-batch: each record alone."""
    failure = {"attempts": 2, "last_attempt": "2026-11-27T17:00:00", "email": "a@x.io", "client_ip": "1.2.3.4"}
    for i in range(10):
        r.set(f"threadr:failed_login:u{i}@x.io:1.2.3.4", json.dumps({**failure, "email": f"u{i}@x.io"}))
    r.set("threadr:failed_login:neg@x.io:1.2.3.4", json.dumps({**failure, "email": "neg@x.io", "attempts": -1}))
    report = migrate(settings, batch_size=100)
    assert (by_pattern(report)["failed_login"]["migrated"], by_pattern(report)["failed_login"]["dead"]) == (10, 1)
    with pg.cursor() as cur:
        cur.execute("SELECT error, raw_value FROM migration_dead_letters")
        error, raw = cur.fetchone()
    assert "login_failures_attempts_check" in error
    assert json.loads(bytes(raw))["attempts"] == -1  # the raw value is kept in PostgreSQL


def test_hostile_values_become_dead_letters_with_reasons(settings, r, pg):
    put_user(r, "user_ok", "ok@x.io")
    r.set("threadr:user:user_json", b'{"email": "x@')
    r.hset("threadr:user:user_hash", "email", "h@x.io")
    r.set("threadr:email:nonutf8@x.io", b"\xff\xfe\x00bad")
    r.set("threadr:user:user_huge", json.dumps({**USER, "user_id": "user_huge", "email": "huge@x.io",
                                                "metadata": {"blob": "x" * (5 * 1024 * 1024)}}))
    r.set("threadr:user:user_nul", json.dumps({**USER, "user_id": "user_nul", "email": "nul@x.io", "metadata": {"a": "\u0000"}}))
    r.set(b"threadr:user:user_\xff", b"{}")
    r.set("threadr:usage:ip:1.2.3.4:daily:2026-11-27", "abc")
    r.lpush("threadr:thread:8a1f2c3d-0000-4000-8000-000000000001", "x")
    report = migrate(settings)
    assert report["status"] == "completed" and report["balanced"]
    with pg.cursor() as cur:
        cur.execute("SELECT key_text, redis_type, error FROM migration_dead_letters")
        reasons = {key: (rtype, error) for key, rtype, error in cur.fetchall()}
        cur.execute("SELECT legacy_id, length(app_metadata->>'blob') FROM users ORDER BY legacy_id")
        # a 5 MB user is the app's data: it migrates whole (no size is refused by default)
        assert cur.fetchall() == [("user_huge", 5 * 1024 * 1024), ("user_ok", None)]
    assert "not valid JSON" in reasons["threadr:user:user_json"][1]
    assert reasons["threadr:user:user_hash"] == ("hash", "wrong Redis type: expected string, found hash")
    assert "not valid UTF-8" in reasons["threadr:email:nonutf8@x.io"][1]
    assert "\\u0000" in reasons["threadr:user:user_nul"][1] or "NUL" in reasons["threadr:user:user_nul"][1]
    assert "not valid UTF-8" in reasons["threadr:user:user_\\xff"][1]
    assert "not an integer" in reasons["threadr:usage:ip:1.2.3.4:daily:2026-11-27"][1]
    assert reasons["threadr:thread:8a1f2c3d-0000-4000-8000-000000000001"][0] == "list"
    assert report["totals"]["dead"] == 7 and report["totals"]["migrated"] == 3  # two users and user_ok's index
    # an operator's cap refuses what is larger, keeping its first bytes and saying how to lift it
    capped = migrate(settings, max_value_bytes=1024 * 1024)
    assert by_pattern(capped)["user"]["dead"] == 5
    with pg.cursor() as cur:
        cur.execute("SELECT error, length(raw_value) FROM migration_dead_letters WHERE run_id = %s"
                    " AND key_text = 'threadr:user:user_huge'", (capped["run_id"],))
        error, kept = cur.fetchone()
    assert "over the 1,048,576-byte limit of --max-value-bytes" in error and kept == 64 * 1024 + 1


def test_keys_that_expire_mid_run_are_counted_as_expired(settings, r, pg, monkeypatch):
    for i in range(30):
        put_user(r, f"user_{i:02d}", f"u{i}@x.io")
    real_read = migrator.core.batch.read_keys

    def read_after_expiry(client, wanted, *args):
        # the race made certain: some users vanish between SCAN and the value read
        for key, _ in [w for w in wanted if b":email:" not in w[0]][::3]:
            client.delete(key)
        return real_read(client, wanted, *args)

    monkeypatch.setattr(migrator.core.batch, "read_keys", read_after_expiry)
    report = migrate(settings, max_dead_ratio=1.0)  # (their index entries dangle: not what is measured here)
    users = by_pattern(report)["user"]
    assert users["expired"] == 10 and users["migrated"] == 20 and users["dead"] == 0 and report["balanced"]
    assert by_pattern(report)["user_email_index"]["dangling"] == 10


def test_every_row_names_its_run_and_the_pattern_it_came_from(settings, r, pg):
    """Provenance is set per statement (run id, and metadata when the rows share a pattern) or
    per row (grants by ip and by email share subscriptions and a sub-batch): right either way."""
    seed_demo(r, 200)
    report = migrate(settings, batch_size=5000)  # ip and email grants in one statement
    expected = {p.table: set() for p in THREADR.patterns if p.table}
    for p in THREADR.patterns:
        if p.table and by_pattern(report).get(p.name, {}).get("migrated"):
            expected[p.table].add(json.loads(p.provenance)["source"])
    with pg.cursor() as cur:
        for table in ("subscriptions", "users", "usage_counters", "threads"):
            cur.execute(f"SELECT metadata->>'source', count(*), count(*) FILTER (WHERE migration_run::text = %s)"
                        f" FROM {table} GROUP BY 1", (report["run_id"],))
            found = {source: (n, of_run) for source, n, of_run in cur.fetchall()}
            assert set(found) == expected[table] and all(n == of_run > 0 for n, of_run in found.values()), table
        cur.execute("SELECT metadata->>'source' FROM subscriptions WHERE source_key LIKE 'threadr:premium:ip:%%'")
        assert {s for (s,) in cur.fetchall()} == {"redis_ip_premium"}
    assert {"redis_ip_premium", "redis_email_premium"} <= expected["subscriptions"]


def test_exact_bytes_for_password_hashes_and_tweets(settings, r, pg):
    seed_demo(r, 60)
    migrate(settings)
    with pg.cursor() as cur:
        cur.execute("SELECT legacy_id, password_hash FROM users")
        hashes = dict(cur.fetchall())
        cur.execute("SELECT id::text, tweets::text, original_content FROM threads")
        threads = {tid: (json.loads(tweets), content) for tid, tweets, content in cur.fetchall()}
    assert hashes and threads
    for ref, stored in hashes.items():
        assert stored.encode() == json.loads(r.get(f"threadr:user:{ref}"))["password_hash"].encode()
    emoji = 0
    for tid, (tweets, content) in threads.items():
        source = json.loads(r.get(f"threadr:thread:{tid}"))
        assert tweets == source["tweets"] and content == source["original_content"]
        assert [t["content"].encode() for t in tweets] == [t["content"].encode() for t in source["tweets"]]
        emoji += any("🚀" in t["content"] for t in tweets)
    assert emoji, "the demo keyspace should carry emoji"


def test_subscriptions_by_email_link_to_their_user_whatever_the_order(settings, r, pg):
    r.set("threadr:subscription:user:Ann@X.io", json.dumps({"subscription_id": "sub_1", "status": "active", "plan_name": "threadr_pro"}))
    put_user(r, "user_ann", "ann@x.io")
    migrate(settings)
    with pg.cursor() as cur:
        cur.execute("SELECT s.user_id = u.id FROM subscriptions s, users u WHERE u.legacy_id = 'user_ann'")
        assert cur.fetchone() == (True,)


def test_records_that_share_what_an_id_once_looked_at_are_rows_of_their_own_and_a_rerun_writes_none(settings, r, pg):
    """Two records the app keeps apart differ only where an id built from one field would not
    look: each is a row of its own, and a second run finds nothing to write."""
    for email, ip, at in (("ann@x.io", "203.0.113.1", "2026-11-20T10:00:00"), ("bob@x.io", "203.0.113.2", "2026-11-20T10:00:05")):
        grant = {"granted_at": at, "expires_at": "2030-01-01T00:00:00", "plan": "premium", "duration_days": 30,
                 "client_ip": ip, "email": email,
                 "payment_info": {"payment_reference": "ORDER-1001", "granted_by": "admin_api", "client_ip": ip}}
        r.set(f"threadr:premium:ip:{ip}", json.dumps(grant))
        r.set(f"threadr:premium:email:{email}", json.dumps(grant))
    # one Stripe subscription the webhook stored under the user's id and under the email
    sub = {"subscription_id": "sub_1", "status": "active", "plan_name": "threadr_pro"}
    r.set("threadr:subscription:user:user_ann", json.dumps(sub))
    r.set("threadr:subscription:user:ann@x.io", json.dumps(sub))
    for email in ("dana@x.io", "Dana@x.io"):  # the app keys a newsletter entry by the email as typed
        r.set(f"threadr:email:{email}", json.dumps({"email": email, "subscribed_at": "2026-11-01T00:00:00"}))
    # two points of one time series at one instant (members differ by their value)
    r.zadd("analytics:user_ann:timeseries:views:day", {
        json.dumps({"timestamp": "2026-11-01T00:00:00", "value": v, "period": "day"}): 1761955200 for v in (1.0, 2.0)})
    first = migrate(settings)
    assert first["status"] == "completed" and first["totals"]["dead"] == 0
    with pg.cursor() as cur:
        cur.execute("SELECT email, ip, payment_reference FROM subscriptions WHERE kind = 'premium_grant' ORDER BY email")
        assert cur.fetchall() == [("ann@x.io", "203.0.113.1", "ORDER-1001"), ("bob@x.io", "203.0.113.2", "ORDER-1001")]
        cur.execute("SELECT count(*), count(DISTINCT stripe_subscription_id) FROM subscriptions WHERE kind = 'stripe'")
        assert cur.fetchone() == (2, 1)
        cur.execute("SELECT email FROM newsletter_subscribers ORDER BY email")
        assert cur.fetchall() == [("Dana@x.io",), ("dana@x.io",)]
        cur.execute("SELECT value FROM analytics_timeseries ORDER BY value")
        assert cur.fetchall() == [(1.0,), (2.0,)]
    tables = fingerprint(pg)
    second = migrate(settings)
    assert second["figures"]["rows_written"] == 0 and fingerprint(pg) == tables


def test_rollback_restores_the_database_exactly(settings, r, pg):
    # Rows that existed before the run: one the run will update, one it will not touch.
    put_user(r, "user_old", "old@x.io", login_count=1)
    put_user(r, "user_keep", "keep@x.io")
    migrate(settings)
    with pg.cursor() as cur:
        cur.execute("UPDATE users SET migration_run = NULL")  # as if written by the app itself
    pg.commit()
    before = fingerprint(pg)
    put_user(r, "user_old", "old@x.io", login_count=9, updated_at="2026-06-01T00:00:00")
    seed_demo(r, 40)
    report = migrate(settings)
    assert fingerprint(pg) != before
    summary = rollback_run(pg, THREADR, report["run_id"])
    # what it says it did: one changed row put back, every other row of the run's deleted
    assert {t: n["restored"] for t, n in summary.items() if n["restored"]} == {"users": 1}
    assert summary["threads"]["deleted"] > 0 and summary["users"]["deleted"] > 0
    assert fingerprint(pg) == before


def test_a_run_is_not_rolled_back_before_a_later_one_that_changed_its_rows(settings, r, pg):
    """Run B updated a row run A wrote: A's prior image is older than B's, so A goes back only after
    B (undone the other way, B's image of the row, A's own, would come back after both). Refused with
    the order to run; newest first, the tables are as they were before A."""
    before = fingerprint(pg)
    put_user(r, "user_a", "a@x.io", login_count=1)
    put_user(r, "user_b", "b@x.io")
    first = migrate(settings)
    put_user(r, "user_a", "a@x.io", login_count=5, updated_at="2026-06-01T00:00:00")
    second = migrate(settings)
    with pytest.raises(NotNow) as refused:
        rollback_run(pg, THREADR, first["run_id"])
    assert f"migrator rollback {second['run_id']}; then migrator rollback {first['run_id']}" in str(refused.value)
    changed = fingerprint(pg)
    assert changed != before
    # a run that fails so (a follow session changed its rows meanwhile) keeps its rows and says why
    fail_run(pg, THREADR, first["run_id"], RunOptions(), "a check failed")
    with pg.cursor() as cur:
        cur.execute("SELECT status, error FROM migration_runs WHERE id = %s", (first["run_id"],))
        status, error = cur.fetchone()
    pg.rollback()
    assert status == "rollback_failed" and error.startswith("a check failed; not rolled back: ") and second["run_id"] in error
    assert fingerprint(pg) == changed
    rollback_run(pg, THREADR, second["run_id"])
    rollback_run(pg, THREADR, first["run_id"])
    assert fingerprint(pg) == before


def one(pg, query: str) -> Any:
    """The first column of the query's first row."""
    with pg.cursor() as cur:
        cur.execute(query)
        found = cur.fetchone()[0]
    pg.rollback()
    return found


def test_a_rerun_gives_a_row_the_expiry_its_key_has_now(settings, r, pg):
    """The app refreshed a session's TTL, made a grant lasting and shortened a user's after a run:
    a re-run writes those rows' expires_at again (a TTL read again unchanged writes nothing)."""
    seed_demo(r, 20)
    migrate(settings)
    assert migrate(settings)["figures"]["rows_written"] == 0
    session = one(pg, "SELECT min(source_key) FROM sessions WHERE expires_at IS NOT NULL")
    grant = one(pg, "SELECT min(source_key) FROM subscriptions WHERE expires_at IS NOT NULL"
                    " AND source_key LIKE 'threadr:premium:%'")
    user = one(pg, "SELECT min(source_key) FROM users WHERE expires_at IS NOT NULL")
    r.expire(session, 7 * 86_400)
    r.persist(grant)
    r.expire(user, 3_600)
    third = migrate(settings)
    assert third["status"] == "completed" and third["figures"]["rows_written"] >= 3, third
    with pg.cursor() as cur:
        for key, table in ((session, "sessions"), (grant, "subscriptions"), (user, "users")):
            cur.execute(f"SELECT (extract(epoch FROM expires_at) * 1000)::bigint FROM {table} WHERE source_key = %s", (key,))
            (row,) = cur.fetchone()
            due = r.pexpiretime(key)
            assert (row is None) if due == -1 else (due - 1000 < row <= due + 5), (key, row, due)
    pg.rollback()


def test_a_rerun_retires_the_rows_no_key_gives_and_its_rollback_brings_them_back(settings, r, pg):
    """The app deleted a thread and a session and trimmed a time series after a run: a re-run makes
    the tables hold what Redis holds (its validation gives the rows no key gives now their table's
    on_delete: deleted, a session's marked), validates, says so, and its rollback puts them back. A
    verification on its own only tells (extra)."""
    seed_demo(r, 40)
    migrate(settings)
    thread, session = one(pg, "SELECT min(source_key) FROM threads"), one(pg, "SELECT min(source_key) FROM sessions")
    series = one(pg, "SELECT source_key FROM analytics_timeseries GROUP BY 1 HAVING count(*) > 1 ORDER BY 1 LIMIT 1")
    before = fingerprint(pg)
    r.delete(thread, session)
    r.zpopmin(series)
    report = migrate(settings)
    assert report["status"] == "completed" and all(report["validated"].values()), report
    for priority in ("high", "medium", "low"):
        assert report["validated_by"][priority].endswith("; 1 stale row(s) retired"), report["validated_by"]
    with pg.cursor() as cur:
        cur.execute("SELECT count(*) FROM threads WHERE source_key = %s", (thread,))
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT deleted_at IS NOT NULL FROM sessions WHERE source_key = %s", (session,))
        assert cur.fetchall() == [(True,)]
        cur.execute("SELECT count(*) FROM analytics_timeseries WHERE source_key = %s", (series,))
        assert cur.fetchone()[0] == r.zcard(series)
    pg.rollback()
    rollback_run(pg, THREADR, report["run_id"])
    assert fingerprint(pg) == before
    r.delete(next(k for k in r.scan_iter("threadr:thread:*") if k.decode() != thread))
    told = verify(settings, report["run_id"])
    extra = {name: p["extra"] for name, p in by_pattern(told).items() if p["extra"] or p["retired"]}
    assert told["verdict"] == "differences" and extra == {"thread": 2, "session": 1, "analytics_timeseries": 1}, extra
    assert fingerprint(pg) == before


def grant_premium_access(r, client_ip: str | None, email: str | None, days: int = 30, reference: str = "cs_1",
                         now: datetime | None = None) -> None:
    """A grant as Threadr's RedisManager.grant_premium_access writes it: the same value under the
    ip key (named after a None ip too) and the email key, for the grant's days and a week more."""
    now = now or datetime.now()
    grant = {"granted_at": now.isoformat(), "expires_at": (now + timedelta(days=days)).isoformat(), "plan": "premium",
             "duration_days": days, "client_ip": client_ip, "email": email,
             "payment_info": {"payment_reference": reference, "granted_by": "stripe_webhook", "amount": 499, "currency": "usd"}}
    ttl = max(1, days * 86_400 + 7 * 86_400)
    r.setex(f"threadr:premium:ip:{client_ip}", ttl, json.dumps(grant))
    if email:
        r.setex(f"threadr:premium:email:{email}", ttl, json.dumps(grant))


def test_a_rerun_after_a_new_purchase_or_subscription_retires_what_they_replaced_and_keeps_what_a_key_still_gives(
        settings, r, pg):
    """Threadr overwrites ip:None and the buyer's email key with every Stripe grant, and a customer's
    subscription key with every new subscription: the rows the old values gave are no key's now and
    a re-run retires them (each key once gave them alone) and validates, where it used to fail on
    every run. A grant another purchase displaced from ip:None while the buyer's email key still holds
    it is no extra row: it stays."""
    seed_demo(r, 20)
    grant_premium_access(r, None, "ann@x.io", reference="cs_1")
    grant_premium_access(r, None, "bob@x.io", reference="cs_2", now=datetime.now() - timedelta(seconds=5))
    sub = {"subscription_id": "sub_1", "plan_name": "threadr_pro", "plan_display_name": "Pro", "tier_level": 2,
           "status": "active", "current_period_start": "2026-11-01 00:00:00", "current_period_end": "2026-12-01 00:00:00",
           "cancel_at_period_end": False, "thread_limit": -1, "features": [], "is_annual": False,
           "monthly_price": 1999, "annual_price": 19190}
    r.setex("threadr:subscription:user:cy@x.io", 31_536_000, json.dumps(sub))
    first = migrate(settings)
    assert first["status"] == "completed", first
    bob = one(pg, "SELECT id::text FROM subscriptions WHERE email = 'bob@x.io'")
    grant_premium_access(r, None, "ann@x.io", reference="cs_3")  # a renewal: both of ann's keys overwritten
    r.setex("threadr:subscription:user:cy@x.io", 31_536_000, json.dumps({**sub, "subscription_id": "sub_2"}))
    second = migrate(settings)
    assert second["status"] == "completed" and all(second["validated"].values()), second
    assert second["validated_by"]["critical"].endswith("; 2 stale row(s) retired"), second["validated_by"]
    with pg.cursor() as cur:
        cur.execute("SELECT payment_reference FROM subscriptions WHERE email = 'ann@x.io'")
        assert cur.fetchall() == [("cs_3",)]
        cur.execute("SELECT stripe_subscription_id FROM subscriptions WHERE source_key = 'threadr:subscription:user:cy@x.io'")
        assert cur.fetchall() == [("sub_2",)]
        # bob's grant: ip:None names ann's since, bob's email key still holds it
        cur.execute("SELECT payment_reference FROM subscriptions WHERE id = %s", (bob,))
        assert cur.fetchall() == [("cs_2",)]
    pg.rollback()
    assert verify(settings, second["run_id"])["verdict"] == "clean"
    # damaged: bob's email key gone too, no key gives his grant: extra, and a re-run retires it
    r.delete("threadr:premium:email:bob@x.io")
    told = verify(settings, second["run_id"])
    assert told["verdict"] == "differences" and by_pattern(told)["premium_ip"]["extra"] + \
        by_pattern(told)["premium_email"]["extra"] == 1, told
    third = migrate(settings)
    assert third["status"] == "completed" and third["validated_by"]["critical"].endswith("; 1 stale row(s) retired")
    assert one(pg, f"SELECT count(*) FROM subscriptions WHERE id = '{bob}'") == 0


def test_a_grant_whose_expiry_passes_after_the_run_still_verifies_clean(settings, r, pg):
    """A grant's key outlives its expires_at by a week: once that passes, the row and a fresh read
    of the key still agree (no status taken from the clock at the read)."""
    grant_premium_access(r, "1.2.3.4", "eve@x.io", days=0, now=datetime.now() + timedelta(seconds=2))
    r.expire("threadr:premium:ip:1.2.3.4", 3_600)
    r.expire("threadr:premium:email:eve@x.io", 3_600)
    report = migrate(settings)
    assert report["status"] == "completed", report
    assert one(pg, "SELECT premium_expires_at > now() FROM subscriptions") is True
    time.sleep(2.5)
    assert one(pg, "SELECT premium_expires_at > now() FROM subscriptions") is False
    told = verify(settings, report["run_id"])
    assert told["verdict"] == "clean" and told["different"] == 0, told
    # damaged: a row's status edited is still told
    with pg.cursor() as cur:
        cur.execute("UPDATE subscriptions SET status = 'expired'")
    pg.commit()
    assert verify(settings, report["run_id"])["different"] == 2  # (as each of the grant's two keys gives it)


def test_a_counter_the_app_starts_again_lower_is_taken_by_a_rerun_and_one_the_app_wrote_is_not_lowered(settings, r, pg):
    """Threadr's per-user thread stats live 30 days past their last action, then start from zero: a
    re-run writes the new, lower counts (the row was a batch's of that key, or its expiry has passed)
    and validates, where GREATEST kept the old ones and failed every run. A row the app wrote since
    (no seal: the dual-write service's) keeps its larger count against a batch's older read."""
    stats = lambda **n: json.dumps({"created": 0, "viewed": 0, "updated": 0, "deleted": 0, "copied": 0, **n})  # noqa: E731
    r.setex("threadr:thread_stats:user_a", 30 * 86_400, stats(created=7, viewed=40))
    r.setex("threadr:thread_stats:user_b", 30 * 86_400, stats(created=3, viewed=9))
    r.setex("threadr:thread_stats:user_c", 30 * 86_400, stats(created=5))
    migrate(settings)
    r.delete("threadr:thread_stats:user_a")  # expired after 30 idle days, then one view
    r.setex("threadr:thread_stats:user_a", 30 * 86_400, stats(viewed=1))
    with pg.cursor() as cur:  # user_b's row expired since its run wrote it; user_c's the app wrote higher
        cur.execute("UPDATE thread_stats SET expires_at = now() - interval '1 day', row_seal = NULL"
                    " WHERE source_key = 'threadr:thread_stats:user_b'")
        cur.execute("UPDATE thread_stats SET created = 6 WHERE source_key = 'threadr:thread_stats:user_c'")
    pg.commit()
    r.setex("threadr:thread_stats:user_b", 30 * 86_400, stats(created=1))
    report = migrate(settings, rollback_on_failure=False)
    with pg.cursor() as cur:
        cur.execute("SELECT source_key, created, viewed FROM thread_stats ORDER BY 1")
        assert cur.fetchall() == [("threadr:thread_stats:user_a", 0, 1), ("threadr:thread_stats:user_b", 1, 0),
                                  ("threadr:thread_stats:user_c", 6, 0)]
    pg.rollback()
    # (user_c's row holds more than its key, the app's write kept: what the validation then tells)
    assert report["status"] == "failed" and "thread_stats: 1 different" in report["error"], report
    with pg.cursor() as cur:
        cur.execute("UPDATE thread_stats SET created = 5 WHERE source_key = 'threadr:thread_stats:user_c'")
    pg.commit()
    again = migrate(settings)
    assert again["status"] == "completed" and all(again["validated"].values()), again


def test_keys_named_after_an_empty_client_ip_are_migrated(settings, r, pg):
    """SecurityUtils.get_client_ip gives "" for a forwarded header that starts with a comma, and the
    app names its usage counters, usage log and grants after it: they migrate, not unmapped."""
    r.setex("threadr:usage:ip::daily:2026-12-07", 86_400, 3)
    r.setex("threadr:usage:ip::monthly:2026-12", 31 * 86_400, 5)
    r.setex("threadr:usage:log::1796600000.5", 7 * 86_400, json.dumps({"client_ip": "", "timestamp": "2026-12-07T10:00:00"}))
    grant_premium_access(r, "", None)
    report = migrate(settings)
    patterns = by_pattern(report)
    assert report["status"] == "completed" and UNMAPPED not in patterns, report
    assert {n: patterns[n]["migrated"] for n in ("usage_counter", "usage_log", "premium_ip")} == \
        {"usage_counter": 2, "usage_log": 1, "premium_ip": 1}
    assert one(pg, "SELECT string_agg(subject || ':' || count, ',' ORDER BY count) FROM usage_counters") == ":3,:5"
    assert one(pg, "SELECT ip FROM subscriptions") == ""


def test_a_counter_is_an_integer_as_incr_writes_one_and_any_other_text_a_dead_letter(settings, r, pg):
    """int() takes " 42", "+1", "1_000", "007" and other scripts' digits: each a different text that
    would arrive as the same number, with verify clean. Only what INCR writes is a counter."""
    texts = {"a": "42", "b": " 42", "c": "+1", "d": "007", "e": "\u0664\u0662", "f": "1_000", "g": "-0", "h": "0"}
    for subject, text in texts.items():
        r.set(f"threadr:usage:ip:{subject}:daily:2026-12-07", text)
    report = migrate(settings)
    counters = by_pattern(report)["usage_counter"]
    assert (counters["migrated"], counters["dead"]) == (2, 6), counters
    assert one(pg, "SELECT string_agg(subject || '=' || count, ',' ORDER BY subject) FROM usage_counters") == "a=42,h=0"
    assert "is not an integer as INCR writes one" in one(pg, "SELECT min(error) FROM migration_dead_letters")


def test_a_nan_point_of_a_time_series_migrates_as_null_and_keeps_its_series(settings, r, pg):
    """Threadr's analytics POST takes a NaN, and pydantic writes that point's value as null: the series
    migrates with that point's value NULL (a dead letter of the whole key lost its good points)."""
    key = "analytics:user_nan:timeseries:engagement_rate:MetricPeriod.DAY"
    r.zadd(key, {b'{"timestamp":"2026-11-22T00:00:00","value":0.25,"period":"day"}': 1.0,
                 b'{"timestamp":"2026-11-23T00:00:00","value":null,"period":"day"}': 2.0})
    report = migrate(settings)
    assert report["status"] == "completed" and by_pattern(report)["analytics_timeseries"]["migrated"] == 1, report
    assert one(pg, "SELECT string_agg(coalesce(value::text, 'NULL'), ',' ORDER BY point_at) FROM analytics_timeseries") \
        == "0.25,NULL"
    assert verify(settings, report["run_id"])["verdict"] == "clean"
    with pg.cursor() as cur:  # damaged: the NaN point given a value
        cur.execute("UPDATE analytics_timeseries SET value = 0 WHERE value IS NULL")
    pg.commit()
    assert verify(settings, report["run_id"])["different"] == 1


def test_filters_by_priority_table_and_pattern(settings, r, pg):
    seed_demo(r, 80)
    critical = migrate(settings, priorities=("critical",))
    assert {p["priority"] for p in critical["patterns"]} == {"critical"}
    only_email = migrate(settings, patterns=("threadr:premium:email:*",))
    assert [p["pattern"] for p in only_email["patterns"]] == ["premium_email"]
    users = migrate(settings, tables=("users",))
    assert [p["pattern"] for p in users["patterns"]] == ["user"]
    # a glob over the patterns' names or key globs takes every one it matches
    for glob in ("premium_*", "threadr:premium:*"):
        premium = migrate(settings, patterns=(glob,))
        assert [p["pattern"] for p in premium["patterns"]] == ["premium_ip", "premium_email"]
        assert premium["status"] == "completed" and premium["balanced"]


def test_keys_and_values_crafted_as_injections_arrive_as_inert_data(settings, r, pg):
    """Keys and values only ever travel as query parameters: SQL, shell and JSON tricks are just text."""
    tricks = ["x'); DROP TABLE users; --", "$(rm -rf /)", "`touch /tmp/pwned`", '","role":"admin', "\\u0000?", "%s %(id)s {}"]
    for i, trick in enumerate(tricks):
        ref = f"user_inj{i}"
        put_user(r, ref, f"inj{i}@x.io", metadata={"note": trick}, email_verification_token=trick)
        r.set(f"threadr:email:{trick}@x.io", json.dumps({"email": trick, "source": trick, "referrer": trick}))
        r.set(f"threadr:usage:email:{trick}:daily:2026-11-27", 3)
    report = migrate(settings)
    assert report["status"] == "completed" and report["balanced"]
    with pg.cursor() as cur:
        cur.execute("SELECT count(*) FROM users WHERE legacy_id LIKE 'user_inj%%'")
        assert cur.fetchone()[0] == len(tricks)  # the users table is still there, every row in it
        cur.execute("SELECT email_verification_token, app_metadata->>'note' FROM users WHERE legacy_id LIKE 'user_inj%%'"
                    " ORDER BY legacy_id")
        assert cur.fetchall() == [(t, t) for t in tricks]
        cur.execute("SELECT role FROM users WHERE legacy_id LIKE 'user_inj%%'")
        assert {row[0] for row in cur.fetchall()} == {"user"}
        cur.execute("SELECT email, referrer FROM newsletter_subscribers ORDER BY email")
        assert sorted(cur.fetchall()) == sorted((f"{t}@x.io", t) for t in tricks)
        cur.execute("SELECT subject FROM usage_counters WHERE subject_type = 'email'")
        assert sorted(row[0] for row in cur.fetchall()) == sorted(tricks)
    assert not os.path.exists("/tmp/pwned")


def test_a_connection_cut_mid_batch_is_retried_on_a_new_connection_and_nothing_doubles(settings, r, pg, monkeypatch):
    """pg_terminate_backend in the middle of a batch's transaction: nothing half-written stays."""
    import psycopg2

    import migrator.core.writer

    users = seed_demo(r, 60)["user"]
    real_upsert = migrator.core.writer.Writer.upsert
    calls = {"n": 0}

    def cut_after_two(self, records):
        calls["n"] += 1
        if calls["n"] == 3:  # two sub-batches written, uncommitted: now the server drops us
            with psycopg2.connect(settings.database_url) as killer, killer.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(%s)", (self.cursor.connection.get_backend_pid(),))
        return real_upsert(self, records)

    monkeypatch.setattr(migrator.core.writer.Writer, "upsert", cut_after_two)
    report = migrate(settings, batch_size=20, priorities=("high",))
    assert report["status"] == "completed" and report["balanced"]
    assert by_pattern(report)["user"]["migrated"] == users  # counted once: the cut attempt left nothing
    with pg.cursor() as cur:
        cur.execute("SELECT count(*) FROM users")
        assert cur.fetchone()[0] == users
        cur.execute("SELECT attempts FROM migration_batches WHERE run_id = %s", (report["run_id"],))
        assert cur.fetchone()[0] == 2  # retried once, on a new connection


def test_a_redis_restart_mid_priority_rescans_that_priority_and_loses_no_key(settings, pg, tmp_path, monkeypatch):
    """Cursors mean nothing on a new server process (new hash seed): the priority starts over."""
    import subprocess
    import time

    import redis as redis_py

    import migrator.execution.runner
    from migrator.core.config import Settings
    from servers import spare_port

    port = spare_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
               "--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no"]

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        for _ in range(100):
            try:
                redis_py.Redis(port=port).ping()
                return proc
            except redis_py.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    procs = [start()]
    source = redis_py.Redis(port=port)
    seeded = seed_demo(source, 400)
    real = migrator.execution.runner.migrate_batch
    done = {"high": 0}

    def restart_after_first_high_batch(client, conn, mapping, batch_id, *args, **kwargs):
        result = real(client, conn, mapping, batch_id, *args, **kwargs)
        if result is not None and result.priority == "high":
            done["high"] += 1
            if done["high"] == 1:
                source.shutdown(save=True)  # keeps the data, not the hash seed
                procs[0].wait(10)
                procs[0] = start()
        return result

    monkeypatch.setattr(migrator.execution.runner, "migrate_batch", restart_after_first_high_batch)
    try:
        report = migrate(Settings(f"redis://127.0.0.1:{port}/0", settings.database_url, settings.broker_url), ranges=4)
    finally:
        procs[0].terminate()
        procs[0].wait(10)
    assert report["status"] == "completed" and report["balanced"]
    assert by_pattern(report)["user"]["migrated"] == seeded["user"]  # every key, once
    assert done["high"] == 4 + 4  # the priority ran all its ranges again
    with pg.cursor() as cur:
        cur.execute("SELECT count(*) FROM users")
        assert cur.fetchone()[0] == seeded["user"]
        cur.execute("SELECT checks->0->>'name' FROM migration_validations WHERE run_id = %s AND NOT ok", (report["run_id"],))
        assert [row[0] for row in cur.fetchall()] == ["source_restarted"]


def test_a_batch_delivered_twice_at_once_runs_once(settings, r, pg):
    """A slow batch redelivered while it runs (visibility timeout): the first one's lease (its
    advisory lock, its heartbeat) makes the second delivery wait, then find the batch done."""
    import threading

    from migrator.core.batch import migrate_batch
    from migrator.core.options import RunOptions
    from migrator.execution.runner import plan_run

    seed_demo(r, 300)
    client = settings.redis()
    run_id = plan_run(client, pg, THREADR, RunOptions(priorities=("high",)), settings.redis_url)
    with pg.cursor() as cur:
        cur.execute("SELECT id FROM migration_batches WHERE run_id = %s", (run_id,))
        (batch_id,) = cur.fetchone()
    pg.rollback()
    results = []

    def deliver() -> None:
        conn = settings.postgres()
        try:
            results.append(migrate_batch(settings.redis(), conn, THREADR, batch_id, connect=settings.postgres))
        finally:
            conn.close()

    deliveries = [threading.Thread(target=deliver) for _ in range(2)]
    for d in deliveries:
        d.start()
    for d in deliveries:
        d.join(120)
    client.close()
    ran = [res for res in results if res is not None]
    assert len(results) == 2 and len(ran) == 1  # one delivery did the work, the other found it done
    with pg.cursor() as cur:
        cur.execute("SELECT attempts, status, keys_migrated FROM migration_batches WHERE id = %s", (batch_id,))
        attempts, status, migrated = cur.fetchone()
    assert (attempts, status) == (1, "done") and migrated == ran[0].counts.total("migrated")


def test_hostile_keyspace_at_scale_keeps_every_good_record_and_reports_every_bad_one(settings, r, pg, monkeypatch):
    """5 % malformed keys of every kind, huge values, large collections, keys expiring mid-run."""
    import migrator.core.batch

    seeded = seed_demo(r, 1000)
    good = sum(n for name, n in seeded.items())
    wide = 20_000
    hostile = seed_hostile(r, good, wide=wide)["malformed"]
    giant = next(k for k in r.scan_iter("threadr:thread:*", count=1000, _type="string") if r.strlen(k) >= GIANT_THREAD_BYTES)
    real_read = migrator.core.batch.read_keys
    vanished = {"n": 0}

    def read_while_keys_expire(client, wanted, *args):
        # some keys expire between SCAN and the read (not the large ones, counted below)
        for key, _ in wanted[::97]:
            if b"huge" not in key and b"user_wide" not in key and key != giant and key != b"threadr:usage:stats":
                vanished["n"] += client.delete(key)
        return real_read(client, wanted, *args)

    monkeypatch.setattr(migrator.core.batch, "read_keys", read_while_keys_expire)
    report = migrate(settings, ranges=4, max_dead_ratio=1.0)  # hostile by design: no dead-letter budget
    assert report["status"] == "completed" and report["balanced"]
    totals = report["totals"]
    assert totals["scanned"] == good + hostile + 3 + 1 + 1
    assert totals["expired"] == vanished["n"] > 0
    assert totals["dead"] >= 3 and totals["dead"] <= hostile + 3  # every hostile key not expired first, and the huge ones
    with pg.cursor() as cur:
        cur.execute("SELECT count(*) FROM migration_dead_letters WHERE run_id = %s", (report["run_id"],))
        assert cur.fetchone()[0] == totals["dead"]
        # no size is refused by default: the three 5 MB values are read whole and refused for what
        # they say (no password_hash), their dead letters keeping the first MiB and their size
        cur.execute("SELECT length(raw_value), error FROM migration_dead_letters WHERE run_id = %s"
                    " AND key_text LIKE 'threadr:user:user_huge%%'", (report["run_id"],))
        huge = cur.fetchall()
        assert len(huge) == 3 and all(length == migrator.core.batch.DEAD_LETTER_VALUE_BYTES for length, _ in huge)
        size = r.strlen("threadr:user:user_huge0")
        assert all("password_hash" in e and f"the value is {size:,} bytes; its first 1,048,576 are kept here" in e
                   for _, e in huge)
        # the large time series: its last point refused, so none of its rows kept, and its dead letter
        # capped alike, with the true size
        cur.execute("SELECT length(raw_value), error FROM migration_dead_letters WHERE run_id = %s"
                    " AND key_text LIKE '%%user_wide%%'", (report["run_id"],))
        length, error = cur.fetchone()
        assert length == migrator.core.batch.DEAD_LETTER_VALUE_BYTES
        assert "TimeSeriesDataPoint model refuses it" in error and f"in {wide + 1:,} members;" in error
        cur.execute("SELECT count(*) FROM analytics_timeseries WHERE source_key LIKE '%%user_wide%%'")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT count(*) FROM usage_stats")  # the stats hash, grown by `wide` counters: every one a row
        assert cur.fetchone()[0] == r.hlen("threadr:usage:stats") > wide
        cur.execute("SELECT count(*) FROM users")
        users_in = cur.fetchone()[0]
    assert users_in == by_pattern(report)["user"]["migrated"] > 0
    # the valid 64 MiB thread: migrated whole
    with pg.cursor() as cur:
        cur.execute("SELECT length(original_content) FROM threads WHERE source_key = %s", (giant.decode(),))
        assert cur.fetchone()[0] == len(json.loads(r.get(giant))["original_content"]) >= GIANT_THREAD_BYTES - 31


def test_a_postgres_restart_mid_run_is_retried_and_the_run_completes(settings, r, tmp_path, monkeypatch):
    """The target's server process restarts in the middle of a batch: retried on a new connection."""
    import threading

    import psycopg2

    import migrator.core.writer
    from migrator.core.config import Settings
    from migrator.core.schema import init_db
    from servers import PostgresServer

    server = PostgresServer()
    server.start()
    try:
        conn = psycopg2.connect(server.url)
        init_db(conn, THREADR)
        conn.close()
        users = seed_demo(r, 80)["user"]
        real_upsert = migrator.core.writer.Writer.upsert
        calls = {"n": 0}

        def restart_on_third_write(self, records):
            calls["n"] += 1
            if calls["n"] == 3:  # two sub-batches in, uncommitted: the server goes down and comes back
                threading.Thread(target=lambda: (server.stop(), server.start())).start()
                time.sleep(0.5)
            return real_upsert(self, records)

        monkeypatch.setattr(migrator.core.writer.Writer, "upsert", restart_on_third_write)
        report = migrate(Settings(settings.redis_url, server.url, settings.broker_url), batch_size=20,
                         priorities=("high",))
        assert report["status"] == "completed" and report["balanced"]
        conn = psycopg2.connect(server.url)
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM users")
            assert cur.fetchone()[0] == by_pattern(report)["user"]["migrated"] == users
            cur.execute("SELECT attempts FROM migration_batches WHERE run_id = %s", (report["run_id"],))
            assert cur.fetchone()[0] >= 2
        conn.close()
    finally:
        server.stop()
        server.remove()


def test_dead_letters_are_written_out_as_they_pile_up_and_none_is_lost(settings, r, pg, monkeypatch):
    monkeypatch.setattr(migrator.core.batch, "DEAD_LETTER_SPILL_BYTES", 2000)  # spill every few letters
    for i in range(60):
        r.set(f"threadr:user:user_bad{i:02d}", b'{"email": ' + b"x" * 100)
    report = migrate(settings, batch_size=7, max_dead_ratio=1.0)
    assert report["status"] == "completed" and by_pattern(report)["user"]["dead"] == 60
    with pg.cursor() as cur:
        cur.execute("SELECT count(DISTINCT key_text), count(*) FROM migration_dead_letters WHERE run_id = %s",
                    (report["run_id"],))
        assert cur.fetchone() == (60, 60)


def test_read_keys_gives_each_type_its_shape_in_one_round_trip(r):
    from migrator.core.source import read_keys

    r.set("s", b"\xff\x00")
    r.hset("h", mapping={"a": "1"})
    r.zadd("z", {"m": 1.5, "n": 2})
    r.sadd("st", "x", "y")
    r.set("ttl", "1", px=60_000)
    reads = read_keys(r, [(b"s", "string"), (b"h", "hash"), (b"z", "zset"), (b"st", "set"), (b"gone", "string"),
                          (b"h", "string"), (b"ttl", "string")])
    assert reads[0].raw == b"\xff\x00" and reads[0].pttl == -1 and reads[0].size == 2
    assert reads[1].raw == {b"a": b"1"} and reads[2].raw == [(b"m", 1.5), (b"n", 2.0)]
    assert sorted(reads[3].raw) == [b"x", b"y"] and reads[4].redis_type == "none"
    assert (reads[5].redis_type, reads[5].raw) == ("hash", {b"a": b"1"})  # refused as a string: read as what it is
    assert 0 < reads[6].pttl <= 60_000
    assert r.get("s") == b"\xff\x00"  # the pooled connection came back clean


def test_read_keys_without_the_ttl_tells_a_missing_string_from_an_empty_one(r):
    from migrator.core.source import NOT_ASKED, read_keys

    r.set("empty", b"")
    r.set("full", b"x", px=60_000)
    r.hset("h", mapping={"a": "1"})
    wanted = [(b"empty", "string"), (b"gone", "string"), (b"full", "string"), (b"h", "hash"), (b"gone", "hash")]
    reads = read_keys(r, wanted, ttl=[False, False, False, False, True])
    assert [x.redis_type for x in reads] == ["string", "none", "string", "hash", "none"]
    assert reads[0].raw == b"" and reads[2].raw == b"x" and [x.pttl for x in reads] == [NOT_ASKED] * 4 + [-2]
    assert 0 < read_keys(r, wanted[2:3])[0].pttl <= 60_000  # (asked by default)


def test_read_keys_marks_each_string_over_the_limit_with_its_true_length(r):
    """Strings read past `max_bytes`, as expected or found instead of another type, are marked
    truncated with their real size; those within it, empty or gone are not."""
    from migrator.core.source import read_keys

    r.set("long", b"x" * 100)
    r.set("edge", b"y" * 10)
    r.set("empty", b"")
    r.set("long_not_a_hash", b"z" * 50)
    r.hset("h", mapping={"a": "1"})
    wanted = [(b"long", "string"), (b"edge", "string"), (b"empty", "string"), (b"gone", "string"),
              (b"long_not_a_hash", "hash"), (b"h", "hash"), (b"long", "string")]
    for ttl in (None, [False] * len(wanted)):
        reads = read_keys(r, wanted, 10, ttl)
        assert [(x.redis_type, x.truncated, x.size) for x in reads] == [
            ("string", True, 100), ("string", False, 10), ("string", False, 0), ("none", False, 0),
            ("string", True, 50), ("hash", False, 2), ("string", True, 100)]
        assert [len(x.raw) for x in reads if x.redis_type == "string"] == [11, 10, 0, 11, 11]  # up to one byte past


def test_references_to_keys_are_asked_many_at_a_time_and_each_missing_one_is_still_found(tmp_path):
    import redis

    from migrator.core.references import EXISTS_GROUP, Checker
    from servers import redis_server

    keys = [f"record:{i}" for i in range(5 * EXISTS_GROUP)]
    gone = {3, 4, EXISTS_GROUP + 7, *range(3 * EXISTS_GROUP, 4 * EXISTS_GROUP)}  # one group wholly missing
    with redis_server(tmp_path) as port, redis.Redis(port=port) as client:
        client.mset({k: "1" for i, k in enumerate(keys) if i not in gone})
        named = [*keys, keys[0], keys[3]]  # a key named twice
        checker = Checker(client, THREADR)
        assert checker.exist(named) == [i not in gone for i in range(len(keys))] + [True, False]
        client.config_resetstat()
        assert checker.exist(keys[:4 * EXISTS_GROUP]) == [i not in gone for i in range(4 * EXISTS_GROUP)]
        # four calls for the first asking, then halves down to each missing key of the groups short of one
        calls = client.info("commandstats")["cmdstat_exists"]["calls"]
        assert 4 < calls < 4 * EXISTS_GROUP // 2


def test_report_says_where_the_time_went(settings, r, pg):
    seed_demo(r, 40)
    report = migrate(settings)
    stages = report["stage_seconds"]
    assert set(stages) == {"scan", "read", "transform", "write", "write_wait", "throttle"}
    assert all(stages[s] > 0 for s in ("scan", "read", "transform", "write")) and stages["throttle"] == 0
    assert report["figures"]["wall_clock_s"] > 0


def test_record_errors_returned_by_migrator_write_keep_their_class():
    import psycopg2.errors

    from migrator.core.writer import RECORD_ERRORS, _error_class

    assert _error_class("23514") is psycopg2.errors.CheckViolation
    # a code this psycopg2 does not know still lands in the right family, so it is bisected
    assert issubclass(_error_class("22ZZZ"), psycopg2.DataError) and issubclass(_error_class("23ZZZ"), psycopg2.IntegrityError)
    assert all(issubclass(_error_class(code), RECORD_ERRORS) for code in ("22P05", "23505", "54000", "54ZZZ"))


def test_keys_that_appear_after_a_priority_s_batches_fail_its_verification_and_the_run_rolls_back(settings, r, pg,
                                                                                                  monkeypatch):
    """With --scan-each-priority, critical's fresh count and its full verification come from its own
    SCAN, once its batches are in: grants that appear in between (keys its batches never saw) fail
    critical. (By default the verification reads the spool instead: tests/test_spool.py.)"""
    seed_demo(r, 60)
    grants_after_critical_batches(monkeypatch, r)
    report = migrate(settings, scan_each_priority=True)
    assert report["status"] == "rolled_back"
    with pg.cursor() as cur:
        cur.execute("SELECT priority, ok, checks FROM migration_validations WHERE run_id = %s ORDER BY created_at",
                    (report["run_id"],))
        rows = cur.fetchall()
        cur.execute("SELECT error FROM migration_runs WHERE id = %s", (report["run_id"],))
        error = cur.fetchone()[0]
    assert [(p, ok) for p, ok, _ in rows] == [("critical", False)]  # and nothing after it ran
    checks = {c["name"]: c for c in rows[0][2]}
    assert list(checks) == ["batches_done", "balance", "dead_letters", "references", "source_counts", "verification"]
    counted = checks["source_counts"]["data"]["differ"]["premium_ip"]
    assert counted["source_now"] - counted["scanned_not_expired"] == 30 and not checks["source_counts"]["ok"]
    assert not checks["verification"]["ok"] and checks["verification"]["data"]["differ"]["premium_ip"]["missing"] == 30
    assert error.startswith("priority critical did not validate: more keys in the source")


def test_an_undisturbed_run_verifies_every_priority_by_its_own_pass(settings, r, pg):
    """Each priority's keys read again and compared (--validation reread; the sealed default: tests/test_seal.py)."""
    seed_demo(r, 60)
    report = migrate(settings, validation="reread")
    assert report["status"] == "completed"
    with pg.cursor() as cur:
        cur.execute("SELECT priority, ok, checks FROM migration_validations WHERE run_id = %s ORDER BY created_at",
                    (report["run_id"],))
        rows = cur.fetchall()
        cur.execute("SELECT v.priorities, v.status, count(r.*), count(r.*) FILTER (WHERE r.status = 'done')"
                    " FROM migration_verifications v JOIN migration_verify_ranges r ON r.verification_id = v.id"
                    " WHERE v.run_id = %s GROUP BY v.id ORDER BY v.id", (report["run_id"],))
        verifications = cur.fetchall()
    assert [(p, ok) for p, ok, _ in rows] == [(p, True) for p in ("critical", "high", "medium", "low", "run")]
    assert [v[0] for v in verifications] == [["critical"], ["high"], ["medium"], ["low"]]
    assert all(status == "done" and ranges == done > 0 for _, status, ranges, done in verifications)
    patterns = by_pattern(report)
    for priority, ok, checks in rows[:4]:
        named = {c["name"]: c for c in checks}
        # what each priority's batches scanned, its verification pass counted again
        for name, p in patterns.items():
            if p["priority"] == priority:
                assert named["source_counts"]["data"]["fresh"].get(name, 0) == p["scanned"], name
        assert named["verification"]["ok"] and "every key's rows match PostgreSQL" in named["verification"]["detail"]


def test_fresh_count_fails_on_keys_the_scan_missed_not_on_keys_gone_since(settings, r, pg):
    seed_demo(r, 30)
    report = migrate(settings)
    assert report["status"] == "completed"
    users = [k for k in r.scan_iter(match="threadr:user:user_*", count=1000)][:10]
    r.delete(*users)  # gone since the scan: expired, or deleted by the app

    def source_check(priority: str) -> dict:
        result = validate(settings, report["run_id"])
        return next(c for c in result["priorities"][priority] if c["name"] == "source_counts")

    high = source_check("high")
    assert high["ok"] and high["data"]["gone_since_scan"]["user"] == 10
    for i in range(50):  # keys the batches never saw
        r.set(f"threadr:ratelimit:198.51.100.{i}", 1)
    low = source_check("low")
    assert not low["ok"] and "ratelimit" in low["data"]["differ"]


def test_the_writer_casts_each_positional_value_to_its_column_type(pg):
    """Rows travel as JSON arrays: every column type still gets the value populate_record gave it,
    a too-long value is an error, not a silent truncation, and a column added later is seen."""
    import psycopg2.errors

    from migrator.core.mapping import Mapping, Pattern, Priority, Row
    from migrator.core.merge import TableRule
    from migrator.core.source import KeyRead
    from migrator.core.writer import Prepared, Writer, column_types

    def rows(_rec) -> list[Row]:
        return []

    mapping = Mapping("types", (Pattern("t", "t:*", r"t:(?P<id>\w+)", "string", Priority.HIGH, "typed test",
                                        table="writer_types", transform=rows),),
                      rules=(TableRule("writer_types", coalesce=("label",)),))
    run_id = "6b0a8f5e-6f43-4d8e-9a57-3f1c2b7d9e10"
    with pg.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS writer_types")
        cur.execute("CREATE TABLE writer_types (id uuid PRIMARY KEY, label varchar(5), tags text[], scores numeric[],"
                    " data jsonb, raw bytea, n numeric, at timestamptz, day date, flag boolean,"
                    " migration_run uuid, source_key text, metadata jsonb, expires_at timestamptz, source_digest bigint,"
                    " row_seal bigint)")
    pg.commit()

    def record(key: str, **values) -> Prepared:
        return Prepared(key.encode(), key, mapping.patterns[0], [Row("writer_types", values)], None,
                        KeyRead(key.encode(), "string", -1, b"", 0), 7)

    full = {"id": "00000000-0000-5000-8000-000000000001", "label": "héllo", "tags": ["a", "b,c", 'd"e', None],
            "scores": [1.5, 2], "data": {"nested": {"x": "tab\there \\ \u00e9"}},
            "raw": "\\x00ff10", "n": "12345678901234567890.5", "at": "2026-11-28T10:00:00+01:00",
            "day": "2026-11-28", "flag": True}
    nulls = {"id": "00000000-0000-5000-8000-000000000002", "label": None, "tags": None, "scores": None,
             "data": None, "raw": None, "n": None, "at": None, "day": None, "flag": None}
    with pg.cursor() as cur:
        writer = Writer(cur, mapping, run_id)
        assert writer.upsert([record("t:1", **full), record("t:2", **nulls)]) == 2
        cur.execute("SELECT label, tags, scores, data, raw, n, at, day, flag, source_key, migration_run"
                    " FROM writer_types ORDER BY id")
        one, two = cur.fetchall()
        assert one[:3] == ("héllo", ["a", "b,c", 'd"e', None], [Decimal("1.5"), Decimal("2")])
        assert one[3] == {"nested": {"x": "tab\there \\ \u00e9"}}
        assert bytes(one[4]) == b"\x00\xff\x10" and one[5] == Decimal("12345678901234567890.5")
        assert one[6] == datetime(2026, 11, 28, 9, 0, tzinfo=timezone.utc) and one[7] == date(2026, 11, 28)
        assert one[8] is True and one[9:] == ("t:1", run_id)
        assert two[:9] == (None,) * 9
        cur.execute("SELECT count(*) FROM writer_types WHERE data IS NULL")  # SQL NULL, not JSON null
        assert cur.fetchone()[0] == 1
        # the verification casts the expected rows as the write did: every type compares equal,
        # and a value that differs is named, as "changed" when the key's value moved since
        columns = (*full, "source_key", "source_digest")
        statement = mapping.rule("writer_types").compare(
            columns, column_types(cur, mapping, "writer_types", columns),
            provenances=[mapping.patterns[0].provenance]).as_string(cur)

        def compared(*rows) -> tuple:
            cur.execute("SELECT * FROM migrator_compare(%s, %s)", ([statement], [orjson.dumps(list(rows)).decode()]))
            attributed, problems, state, _ = cur.fetchone()
            assert state is None
            return attributed[0], [(key, kind, columns) for _, key, kind, columns in problems[0]]

        assert compared([*full.values(), "t:1", 7], [*nulls.values(), "t:2", 7]) == (2, [])
        assert compared([*{**full, "tags": ["a"], "at": "2026-11-28T10:00:01+01:00"}.values(), "t:1", 7]) == \
            (1, [("t:1", "different", ["tags", "at"])])
        assert compared([*{**full, "n": "1"}.values(), "t:1", 8]) == (1, [("t:1", "changed", ["n"])])
        assert compared([*{**full, "id": "00000000-0000-5000-8000-000000000009"}.values(), "t:9", 7])[1][0][:2] == \
            ("t:9", "missing")
        # the same rows again change nothing; a label too long for varchar(5) is refused, not cut
        assert writer.upsert([record("t:1", **full)]) == 0
        with pytest.raises(psycopg2.errors.StringDataRightTruncation):
            writer.upsert([record("t:3", **{**nulls, "id": "00000000-0000-5000-8000-000000000003", "label": "toolong"})])
        cur.execute("ALTER TABLE writer_types ADD COLUMN extra integer")
        assert Writer(cur, mapping, run_id).upsert([record("t:4", id="00000000-0000-5000-8000-000000000004", extra="7")]) == 1
        cur.execute("SELECT extra FROM writer_types WHERE source_key = 't:4'")
        assert cur.fetchone() == (7,)
    pg.rollback()
    with pg.cursor() as cur:
        cur.execute("DROP TABLE writer_types")
    pg.commit()


def test_a_large_sub_batch_staged_by_copy_writes_what_its_json_document_writes(pg, monkeypatch):
    """A sub-batch of STAGED_MIN_RECORDS or more goes by COPY into a temporary table, a row's JSON a
    line (021_staged_writes.sql): hostile text (backslashes, COPY's own escapes, tabs, newlines,
    quotes, a lone `\\.`, a `\\N`, in values and in keys), floats (NaN, the infinities, 1e20, -0.0),
    numerics, datetimes, booleans, integers, an object and a float in a text column, JSON's "null"
    string, arrays and objects land as the JSON document lands them, with the same seals; a NUL and
    a value too long for its column are each one dead letter with the same error, the rest written;
    a retry after a failed call finds its stage emptied. A line put together as a large row's is
    (writer.LARGE_LINE_BYTES) writes the same."""
    from datetime import datetime, timedelta, timezone
    import psycopg2.errors

    from migrator.core import writer as writer_module
    from migrator.core.mapping import Mapping, Pattern, Priority, Row
    from migrator.core.merge import TableRule
    from migrator.core.source import KeyRead
    from migrator.core.writer import Prepared, Writer

    mapping = Mapping("staged", (Pattern("s", "s:*", r"s:(?P<id>\w+)", "string", Priority.HIGH, "staged test",
                                         table="writer_staged", transform=lambda _rec: []),),
                      rules=(TableRule("writer_staged", greatest=("n",)),))
    run_id = "6b0a8f5e-6f43-4d8e-9a57-3f1c2b7d9e12"
    hostile = ["back\\slash", "\\N", "\\.", "tab\there", "new\nline\r\n", 'quo"te', "\\x41\\101\\t", "é ☃ 𝄞", "", None]

    def records() -> list[Prepared]:
        made = []
        for i in range(60):
            key = f"s:{i}" if i % 10 != 5 else f"s:{i}\t\\n\n"
            text = hostile[i % len(hostile)]
            values = {"id": f"00000000-0000-5000-8000-{i:012d}", "label": text, "short": "ok",
                      "tags": None if text is None else [text, "b,c"],
                      "data": {3: "null", 4: float("nan")}.get(i % 10, {"v": text, "n": [i, 1.5, True]}),
                      "n": i, "at": "2026-11-28T10:00:00+01:00", "flag": i % 2 == 0,
                      "score": [0.1, 1e20, float("nan"), float("inf"), 3, None, -0.0, 5e-324][i % 8],
                      "amount": [1.5, 10**15, "2.50", None][i % 4],
                      "seen": datetime(2026, 11, 28, 10, tzinfo=timezone.utc) + timedelta(microseconds=i),
                      "note": {7: {"a": [1, "b"]}, 29: 2.5}.get(i, [7, True, "x\ty", None][i % 4])}
            if i == 13:
                values["label"] = "nul\x00here"  # PostgreSQL's text holds no NUL
            if i == 41:
                values["short"] = "toolong"  # varchar(5)
            made.append(Prepared(key.encode(), key, mapping.patterns[0], [Row("writer_staged", values)], None,
                                 KeyRead(key.encode(), "string", -1, b"", 0), i))
        return made

    def written(staged_from: int, large_from: int = writer_module.LARGE_LINE_BYTES) -> tuple[list, list, list]:
        monkeypatch.setattr(writer_module, "STAGED_MIN_RECORDS", staged_from)
        monkeypatch.setattr(writer_module, "LARGE_LINE_BYTES", large_from)
        with pg.cursor() as cur:
            cur.execute("TRUNCATE writer_staged")
            batch = records()
            count, dead = Writer(cur, mapping, run_id, fenced=True).write(batch)
            assert count == 58
            # (a jsonb null and SQL NULL both read as None: the JSON's text tells them apart)
            cur.execute("SELECT *, data::text FROM writer_staged ORDER BY id")
            rows = cur.fetchall()
            cur.execute("SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()"
                        " AND relname LIKE 'migrator_stage_%' AND relkind = 'r'")
            stages = cur.fetchone()[0]
        pg.rollback()
        seals = [rec.seals for rec in batch]
        return rows, [(rec.key_text, type(exc), str(exc)) for rec, exc in dead], [stages, seals]

    with pg.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS writer_staged")
        cur.execute("CREATE TABLE writer_staged (id uuid PRIMARY KEY, label text, short varchar(5), tags text[],"
                    " data jsonb, n bigint, at timestamptz, flag boolean, score double precision, amount numeric,"
                    " seen timestamptz, note text, migration_run uuid, source_key text,"
                    " metadata jsonb, expires_at timestamptz, source_digest bigint, synced_at timestamptz, row_seal bigint)")
    pg.commit()
    try:
        as_json = written(1 << 30)
        staged = written(1)
        # every line put together as a large row's is (in one copy): the same rows, errors and seals
        assert written(1 << 30, large_from=0) == as_json
        assert as_json[2][0] == 0 and staged[2][0] >= 1  # (the stages are there: the rows went by COPY)
        assert staged[0] == as_json[0] and len(staged[0]) == 58
        assert staged[2][1] == as_json[2][1]  # the same seals
        assert staged[1] == as_json[1] and [(key, kind) for key, kind, _ in staged[1]] == \
            [("s:13", psycopg2.errors.UntranslatableCharacter), ("s:41", psycopg2.errors.StringDataRightTruncation)]
        # (NaN and the infinities are JSON's null: NULL either way)
        assert {row[8] for row in staged[0]} >= {0.1, 1e20, 3.0, None}
        assert {row[11] for row in staged[0]} == {"7", "true", "x\ty", None, '{"a": [1, "b"]}', "2.5"}
        assert {row[13] for row in staged[0]} >= {"s:5\t\\n\n", "s:15\t\\n\n"}
        labels = {row[1] for row in staged[0]}
        assert {"back\\slash", "\\N", "\\.", "tab\there", "new\nline\r\n", 'quo"te', "\\x41\\101\\t", "é ☃ 𝄞", ""} <= labels
        assert None in labels
    finally:
        pg.rollback()
        with pg.cursor() as cur:
            cur.execute("DROP TABLE writer_staged")
        pg.commit()


def test_large_values_a_write_makes_are_compressed_by_lz4_unless_the_server_was_told_otherwise(settings):
    """022_toast_compression.sql: where default_toast_compression is the server's built-in default,
    migrator_write compresses by lz4 (a plain INSERT of the session still by pglz); once the database
    sets it, `init-db` leaves the write to that choice."""
    import psycopg2
    from psycopg2 import sql as q

    from migrator.core.mapping import Mapping, Pattern, Priority, Row
    from migrator.core.merge import TableRule
    from migrator.core.schema import database_url_for, ensure_database, init_db
    from migrator.core.source import KeyRead
    from migrator.core.writer import Prepared, Writer

    mapping = Mapping("toast", (Pattern("t", "t:*", r"t:(?P<id>\w+)", "string", Priority.HIGH, "toast test",
                                        table="writer_toast", transform=lambda _rec: []),),
                      rules=(TableRule("writer_toast"),))
    big = "a thread's worth of text, said again and again " * 2000  # ~94 kB, compressible

    def compressions(url: str, n: int) -> tuple[str, str]:
        """(the writer's, a plain INSERT's) compression of the big value, written as row n."""
        conn = psycopg2.connect(url)
        try:
            with conn, conn.cursor() as cur:
                key = f"t:{n}"
                row = Row("writer_toast", {"id": f"00000000-0000-5000-8000-{n:012d}", "body": big})
                record = Prepared(key.encode(), key, mapping.patterns[0], [row], None,
                                  KeyRead(key.encode(), "string", -1, b"", 0), n)
                assert Writer(cur, mapping, "6b0a8f5e-6f43-4d8e-9a57-3f1c2b7d9e13", fenced=True).write([record]) == (1, [])
                cur.execute("INSERT INTO writer_toast (id, body) VALUES (gen_random_uuid(), %s) RETURNING id", (big,))
                plain = cur.fetchone()[0]
                cur.execute("SELECT pg_column_compression(body) FROM writer_toast WHERE source_key = %s", (key,))
                written = cur.fetchone()[0]
                cur.execute("SELECT pg_column_compression(body) FROM writer_toast WHERE id = %s", (plain,))
                return written, cur.fetchone()[0]
        finally:
            conn.close()

    admin = psycopg2.connect(database_url_for(settings.database_url, "postgres"))
    admin.autocommit = True
    name = f"migrator_toast_{os.getpid()}"
    ensure_database(admin, name)
    url = database_url_for(settings.database_url, name)
    try:
        conn = psycopg2.connect(url)
        with conn.cursor() as cur:
            cur.execute("SELECT 'lz4' = ANY (enumvals) FROM pg_settings WHERE name = 'default_toast_compression'")
            if not cur.fetchone()[0]:
                pytest.skip("this PostgreSQL was built without lz4")
        init_db(conn, THREADR)
        with conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE writer_toast (id uuid PRIMARY KEY, body text, migration_run uuid, source_key text,"
                        " metadata jsonb, expires_at timestamptz, source_digest bigint, synced_at timestamptz, row_seal bigint)")
        conn.close()
        assert compressions(url, 1) == ("lz4", "pglz")
        with admin.cursor() as cur:
            cur.execute(q.SQL("ALTER DATABASE {} SET default_toast_compression = pglz").format(q.Identifier(name)))
        conn = psycopg2.connect(url)
        init_db(conn, THREADR)
        conn.close()
        assert compressions(url, 2) == ("pglz", "pglz")
    finally:
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            cur.execute(q.SQL("DROP DATABASE IF EXISTS {}").format(q.Identifier(name)))
        admin.close()


def test_each_upsert_is_planned_once_per_session_and_still_writes_fences_and_bisects(settings, pg):
    """migrator_write makes each statement a function of the session's own (019_write_plans.sql): a
    later sub-batch reuses it, with its own rows, the fence judged at its own time; a record error in
    one row is still that record's alone; a function made in a transaction that rolled back is made again."""
    import psycopg2.errors

    from migrator.core.mapping import Mapping, Pattern, Priority, Row
    from migrator.core.merge import TableRule
    from migrator.core.source import KeyRead
    from migrator.core.writer import Prepared, Writer

    mapping = Mapping("plans", (Pattern("p", "p:*", r"p:(?P<id>\w+)", "string", Priority.HIGH, "plan test",
                                        table="writer_plans", transform=lambda _rec: []),),
                      rules=(TableRule("writer_plans", greatest=("n",)),))
    run_id = "6b0a8f5e-6f43-4d8e-9a57-3f1c2b7d9e11"
    with pg.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS writer_plans")
        cur.execute("CREATE TABLE writer_plans (id uuid PRIMARY KEY, n bigint CHECK (n >= 0), migration_run uuid,"
                    " source_key text, metadata jsonb, expires_at timestamptz, source_digest bigint, synced_at timestamptz,"
                    " row_seal bigint)")
    pg.commit()

    def record(i: int, n: int) -> Prepared:
        key = f"p:{i}"
        return Prepared(key.encode(), key, mapping.patterns[0],
                        [Row("writer_plans", {"id": f"00000000-0000-5000-8000-00000000000{i}", "n": n})], None,
                        KeyRead(key.encode(), "string", -1, b"", 0), 7)

    def made(conn) -> int:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_proc WHERE pronamespace = pg_my_temp_schema()"
                        " AND proname LIKE 'migrator_write_%'")
            return cur.fetchone()[0]

    def counts(conn) -> dict[str, int]:
        with conn.cursor() as cur:
            cur.execute("SELECT source_key, n FROM writer_plans")
            return dict(cur.fetchall())

    try:
        with pg.cursor() as cur:
            writer = Writer(cur, mapping, run_id, fenced=True)
            assert writer.upsert([record(1, 1), record(2, 2)]) == 2 and made(pg) == 1
            assert writer.upsert([record(1, 5), record(3, 3)]) == 2 and made(pg) == 1  # the same function, new rows
            assert counts(pg) == {"p:1": 5, "p:2": 2, "p:3": 3}
            pg.commit()
            # follow read p:1 after this transaction began: the batch's write leaves it, in this transaction
            # and not in a later one (the fence's now() is the call's, not the plan's)
            cur.execute("UPDATE writer_plans SET synced_at = now() + interval '1 hour' WHERE source_key = 'p:1'")
            pg.commit()
            assert writer.upsert([record(1, 9)]) == 0
            cur.execute("UPDATE writer_plans SET synced_at = now() - interval '1 hour' WHERE source_key = 'p:1'")
            pg.commit()
            assert writer.upsert([record(1, 9)]) == 1
            written, dead = writer.write([record(4, 4), record(5, -1), record(6, 6)])
            assert written == 2 and [(rec.key_text, type(exc)) for rec, exc in dead] == \
                [("p:5", psycopg2.errors.CheckViolation)]
            assert counts(pg) == {"p:1": 9, "p:2": 2, "p:3": 3, "p:4": 4, "p:6": 6} and made(pg) == 1
            pg.commit()
        fresh = settings.postgres()
        try:
            with fresh.cursor() as cur:
                writer = Writer(cur, mapping, run_id, fenced=True)
                for _ in range(2):  # made in a transaction that rolls back, it goes with it and is made again
                    assert writer.upsert([record(7, 7)]) == 1 and made(fresh) == 1
                    fresh.rollback()
                    assert made(fresh) == 0
        finally:
            fresh.close()
    finally:
        pg.rollback()
        with pg.cursor() as cur:
            cur.execute("DROP TABLE writer_plans")
        pg.commit()


@pytest.mark.parametrize("conforming", ["on", "off"])
def test_a_document_sent_as_utf8_bytes_reaches_postgresql_exactly(pg, conforming):
    """The writer hands orjson's bytes to psycopg2 without decoding them: quotes, backslashes,
    escapes and multi-byte characters arrive as they were, whatever standard_conforming_strings."""
    import orjson

    from migrator.core.writer import Utf8Text

    texts = ["it's", "back\\slash \\' both", 'say "hi"', "naïve 𝄞 字", "tab\tnew\nline", "''", "\\"]
    document = orjson.dumps([texts, {"k": texts}])
    with pg.cursor() as cur:
        cur.execute(f"SET LOCAL standard_conforming_strings = {conforming}")
        cur.execute("SELECT %s::jsonb, %s, %s", (Utf8Text(document), [Utf8Text(document), Utf8Text(b"x'\\")], Utf8Text(b"")))
        parsed, array, empty = cur.fetchone()
    pg.rollback()
    assert parsed == [texts, {"k": texts}]
    assert array == [document.decode(), "x'\\"] and empty == ""


def test_local_jobs_run_batches_at_once_each_in_its_own_process_and_session_with_the_same_result(
        settings, r, pg, monkeypatch):
    import multiprocessing
    import threading

    import migrator.execution.runner
    from helpers import content_fingerprint

    seed_demo(r, 120)
    one_at_a_time = migrate(settings, ranges=4)
    expected = content_fingerprint(pg)
    real = migrator.execution.runner.migrate_batch
    fork = multiprocessing.get_context("fork")
    both_in = fork.Barrier(2, timeout=30)  # shared with the forked lanes; broken unless two batches overlap
    lanes = fork.SimpleQueue()

    def together(client, conn, mapping, batch_id, progress=None, **kwargs):
        lanes.put((os.getpid(), conn.get_backend_pid()))
        if not both_in.broken:
            try:
                both_in.wait()
            except threading.BrokenBarrierError:
                pass
        return real(client, conn, mapping, batch_id, progress, **kwargs)

    monkeypatch.setattr(migrator.execution.runner, "migrate_batch", together)  # the lanes fork after this
    at_once = migrate(settings, jobs=2, ranges=4)
    seen = set()
    while not lanes.empty():
        seen.add(lanes.get())
    assert not both_in.broken
    assert len({pid for pid, _ in seen}) == 2 and os.getpid() not in {pid for pid, _ in seen}
    assert len({session for _, session in seen}) == 2  # one session per lane, kept across its batches
    assert at_once["status"] == "completed" and at_once["balanced"]
    assert content_fingerprint(pg) == expected
    assert [(p["pattern"], p["migrated"]) for p in at_once["patterns"]] == \
        [(p["pattern"], p["migrated"]) for p in one_at_a_time["patterns"]]


def test_after_a_failed_batch_no_lane_starts_another(settings, r, pg, monkeypatch):
    import multiprocessing

    import migrator.execution.runner

    seed_demo(r, 60)
    started = multiprocessing.get_context("fork").SimpleQueue()

    def failing(client, conn, mapping, batch_id, progress=None, **kwargs):
        started.put(batch_id)
        raise RuntimeError("a bug in a transform")

    monkeypatch.setattr(migrator.execution.runner, "migrate_batch", failing)
    report = migrate(settings, jobs=2, ranges=8)
    assert report["status"] == "rolled_back"
    taken = []
    while not started.empty():
        taken.append(started.get())
    assert 1 <= len(taken) <= 2  # the failing batch, and at most the one the other lane had taken


def test_lanes_that_cannot_open_a_session_stop_the_run_before_any_batch_with_the_way_out(settings, r, pg):
    from migrator.core.options import RunOptions
    from migrator.execution.runner import LaneDied, execute_local, plan_run

    seed_demo(r, 10)
    parent = os.getpid()

    def connect():
        if os.getpid() != parent:
            raise ValueError("no session for a lane")
        return settings.postgres()

    run_id = plan_run(r, pg, THREADR, RunOptions(ranges=2), settings.redis_url)
    with pytest.raises(LaneDied, match="--jobs 1"):
        execute_local(r, connect, THREADR, run_id, RunOptions(ranges=2), jobs=2)
    with pg, pg.cursor() as cur:
        cur.execute("SELECT count(*) FROM migration_batches WHERE run_id = %s AND status <> 'pending'", (run_id,))
        assert cur.fetchone() == (0,)


def test_lanes_leave_the_broker_connections_of_the_process_they_fork_from_alone(settings, r, pg):
    """kombu registers after-fork hooks that close the pooled broker connections they find; run
    in a forked lane, they would close the parent's connection on the socket both share."""
    from workers.celery import app

    seed_demo(r, 30)
    app.control.ping(timeout=0.2)  # a pooled broker connection in this process (no worker answers)
    assert migrate(settings, jobs=2, ranges=2)["status"] == "completed"
    app.control.ping(timeout=0.2)  # connection reset by peer, had a lane closed it


def test_a_lane_process_killed_mid_batch_stops_the_run_for_resume_which_completes_it(settings, r, pg, monkeypatch):
    import signal

    import migrator.execution.runner
    from migrator.execution.runner import LaneDied, execute_local, resume_point

    seed_demo(r, 60)
    real = migrator.execution.runner.migrate_batch
    parent = os.getpid()

    def killed(client, conn, mapping, batch_id, progress=None, **kwargs):
        with conn.cursor() as cur:  # the first batch of the critical priority dies with its lane
            cur.execute("SELECT min(id) FROM migration_batches")
            if batch_id == cur.fetchone()[0] and os.getpid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(client, conn, mapping, batch_id, progress, **kwargs)

    monkeypatch.setattr(migrator.execution.runner, "migrate_batch", killed)
    with pytest.raises(LaneDied, match="migrator resume"):
        migrate(settings, jobs=2, ranges=4)
    monkeypatch.setattr(migrator.execution.runner, "migrate_batch", real)
    with pg, pg.cursor() as cur:
        cur.execute("SELECT id, status FROM migration_runs")
        (run_id, status), = cur.fetchall()
    assert status == "running"
    opts, start = resume_point(pg, run_id)
    client = settings.redis()
    try:
        assert execute_local(client, settings.postgres, THREADR, run_id, opts, start=start, jobs=2) == "completed"
    finally:
        client.close()


def test_a_sub_batch_ends_at_its_byte_limit_as_well_as_its_record_count(settings, r, pg, monkeypatch):
    import migrator.core.writer

    seed_demo(r, 60)
    monkeypatch.setattr(migrator.core.batch, "SUB_BATCH_BYTES", 1)  # every read chunk's values are over it
    sizes: list[int] = []
    real = migrator.core.writer.Writer.write

    def counted(self, records):
        sizes.append(len(records))
        return real(self, records)

    monkeypatch.setattr(migrator.core.writer.Writer, "write", counted)
    report = migrate(settings, ranges=1, batch_size=100_000, read_chunk=50)
    assert report["status"] == "completed" and report["balanced"]
    assert max(sizes) <= 50 and sum(sizes) == report["totals"]["migrated"]
    assert len(sizes) > 2 * report["batches"]["total"]  # by count alone: one sub-batch per batch
