"""The dual-write service against real Redis and PostgreSQL: strategies, parity, repairs, merge rules."""
from __future__ import annotations

import json
import subprocess
import time
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import psycopg2
import redis
import pytest

from migrator.apps.threadr.demo import seed_demo
from migrator.apps.threadr.dualwrite import ThreadrDualWrite
from migrator.cutover.dualwrite import REPAIR_QUEUE, WriteStrategy
from migrator.apps.threadr import THREADR

from helpers import migrate

HASH = "$2b$12$abcdefghijklmnopqrstuvABCDEFGHIJKLMNOPQRSTUVWXYZ01234"


@pytest.fixture
def service(settings, r, pg):
    svc = ThreadrDualWrite(r, lambda: psycopg2.connect(settings.database_url), THREADR)
    yield svc
    svc.close()
    r.delete(REPAIR_QUEUE)


def answers(svc: ThreadrDualWrite, strategy: WriteStrategy) -> list:
    svc.strategy = strategy
    return [svc.check_premium_access("203.0.113.9", "ip"), svc.check_premium_access("ann@x.io", "email"),
            svc.check_premium_access("nobody@x.io", "email"), svc.get_usage_stats("203.0.113.9", "ip"),
            svc.get_usage_stats("ann@x.io", "email")]


@pytest.mark.parametrize("strategy", [WriteStrategy.DUAL_WRITE, WriteStrategy.POSTGRES_PRIMARY])
def test_both_stores_answer_the_same_after_writes_in_each_dual_strategy(service, strategy):
    service.strategy = strategy
    service.create_user("ann@x.io", HASH)
    service.grant_premium_access("203.0.113.9", "ip", 30)
    service.grant_premium_access("ann@x.io", "email", 10)
    for _ in range(3):
        service.track_usage("203.0.113.9", email="ann@x.io")
    from_redis, from_postgres = answers(service, WriteStrategy.DUAL_WRITE), answers(service, WriteStrategy.POSTGRES_ONLY)
    assert from_redis[0]["has_premium"] and from_redis[1]["source"] == "email_grant" and not from_redis[2]["has_premium"]
    assert from_redis[3] == {"daily": 3, "monthly": 3}
    assert [a["has_premium"] for a in from_redis[:3]] == [a["has_premium"] for a in from_postgres[:3]]
    assert [a["expires_at"] for a in from_redis[:2]] == [a["expires_at"] for a in from_postgres[:2]]
    assert from_redis[3:] == from_postgres[3:]


def test_single_store_strategies_touch_only_their_store(service, r, pg):
    service.strategy = WriteStrategy.REDIS_ONLY
    service.create_user("bob@x.io", HASH)
    with pg.cursor() as cur:
        cur.execute("SELECT count(*) FROM users")
        assert cur.fetchone()[0] == 0
    pg.rollback()
    service.strategy = WriteStrategy.POSTGRES_ONLY
    before = r.dbsize()
    service.create_user("cy@x.io", HASH)
    service.track_usage("198.51.100.1")
    assert r.dbsize() == before
    assert service.get_usage_stats("198.51.100.1", "ip") == {"daily": 1, "monthly": 1}


def postgres_away(service: ThreadrDualWrite, settings) -> dict[str, bool]:
    """The service's new connections refused while the switch returned says "on"."""
    down = {"on": True}

    def connect():
        if down["on"]:
            raise psycopg2.OperationalError("connection refused (the test took PostgreSQL away)")
        return psycopg2.connect(settings.database_url)

    service._connect = connect
    return down


def test_a_failed_postgres_write_is_queued_not_counted_and_repaired(service, settings, r, pg):
    service.strategy = WriteStrategy.DUAL_WRITE
    down = postgres_away(service, settings)
    result = service.grant_premium_access("ann@x.io", "email", 5)[0]
    assert result.primary_ok and result.secondary_ok is False and r.llen(REPAIR_QUEUE) == 1
    assert json.loads(r.get("threadr:premium:email:ann@x.io"))["duration_days"] == 5  # Redis took it
    assert service.repair() == 0 and r.llen(REPAIR_QUEUE) == 1  # still down: kept, not lost
    down["on"] = False
    assert service.repair() == 1 and r.llen(REPAIR_QUEUE) == 0
    service.strategy = WriteStrategy.POSTGRES_ONLY
    assert service.check_premium_access("ann@x.io", "email")["has_premium"]


def test_a_backfill_beside_the_app_never_overwrites_newer_values(service, settings, r, pg):
    """The batch writer and the service share each table's merge rule."""
    service.strategy = WriteStrategy.DUAL_WRITE
    user_id = service.create_user("dee@x.io", HASH)
    for _ in range(5):
        service.track_usage("192.0.2.5")
    newer = json.loads(r.get(f"threadr:user:{user_id}"))
    # what a backfill read before the app's last writes: an older document, a smaller count
    stale = {**newer, "login_count": 99, "updated_at": "2020-01-01T00:00:00"}
    r.set(f"threadr:user:{user_id}", json.dumps(stale))
    daily = next(k for k in r.scan_iter("threadr:usage:ip:192.0.2.5:daily:*"))
    r.set(daily, 3)
    migrate(settings, priorities=("high",))
    with pg.cursor() as cur:
        cur.execute("SELECT login_count FROM users WHERE legacy_id = %s", (user_id,))
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT count FROM usage_counters WHERE subject = '192.0.2.5' AND period = 'daily'")
        assert cur.fetchone()[0] == 5


def test_a_bulk_batch_that_read_before_the_app_s_dual_write_leaves_the_row_the_app_wrote(service, settings, r, pg,
                                                                                          monkeypatch):
    """A subscription's status has no merge rule to keep the newer: the app's write through the service,
    between a batch's read and its write, is stamped as follow's are, and the batch leaves that row."""
    from test_fence import between_read_and_write  # (the batch's read and write, told apart)

    service.strategy = WriteStrategy.DUAL_WRITE
    service.create_subscription("cy@x.io", {"subscription_id": "sub_1", "plan_name": "threadr_pro", "status": "active",
                                            "current_period_start": "2026-11-01 00:00:00",
                                            "current_period_end": "2027-11-01 00:00:00"})
    key = b"threadr:subscription:user:cy@x.io"
    between_read_and_write(monkeypatch, key, lambda: service.cancel_subscription("cy@x.io"))
    run = migrate(settings, priorities=("critical",))
    assert run["status"] == "completed", run
    with pg.cursor() as cur:
        cur.execute("SELECT status_raw FROM subscriptions WHERE source_key = %s", (key.decode(),))
        assert cur.fetchall() == [(json.loads(r.get(key))["status"],)] != [("active",)]
    pg.rollback()


def test_a_service_following_the_setting_keeps_writing_while_postgresql_blips(settings, r, pg):
    """Told no strategy, the service reads the one `migrator cutover` set; PostgreSQL unreachable when it
    looks again, the app's writes go on by the one it last read, their PostgreSQL side queued for repair."""
    follower = ThreadrDualWrite(r, lambda: psycopg2.connect(settings.database_url), THREADR, None, follow_every_s=0)
    try:
        assert follower.strategy is WriteStrategy.DUAL_WRITE
        with pg.cursor() as cur:  # its connection cut, and no new one taken
            cur.execute("SELECT pg_terminate_backend(%s)", (follower._pg().get_backend_pid(),))
        pg.commit()
        down = postgres_away(follower, settings)
        result = follower.grant_premium_access("ann@x.io", "email", 5)[0]
        assert result.primary_ok and result.secondary_ok is False and r.llen(REPAIR_QUEUE) == 1
        down["on"] = False
        assert follower.repair() == 1 and follower.strategy is WriteStrategy.DUAL_WRITE
        assert follower.check_premium_access("ann@x.io", "email")["has_premium"]
    finally:
        follower.close()
        r.delete(REPAIR_QUEUE)


SUBSCRIPTION = {"subscription_id": "sub_1", "plan_name": "threadr_pro", "status": "active",
                "current_period_start": "2026-11-01 00:00:00", "current_period_end": "2027-11-01 00:00:00"}


def test_a_repair_gives_postgresql_what_redis_holds_now_not_a_write_a_later_one_replaced(service, settings, r, pg):
    """Under DUAL_WRITE a failed PostgreSQL write is queued; the app's later writes (a reactivation, a
    delete) reach both stores. The repair writes what Redis holds now: the queued bytes would cancel
    the subscription again and bring the deleted thread back."""
    service.strategy = WriteStrategy.DUAL_WRITE
    service.create_subscription("cy@x.io", SUBSCRIPTION)
    user_id = service.create_user("dee@x.io", HASH)
    thread = service.save_thread(user_id, "first", "text", [{"content": "a tweet", "order": 1, "character_count": 7}])
    down = postgres_away(service, settings)
    service._conn.close()  # (its connection gone with it)
    assert service.cancel_subscription("cy@x.io").secondary_ok is False
    assert service.update_thread(thread, title="edited").secondary_ok is False
    down["on"] = False
    assert service.update_subscription("cy@x.io", status="active").secondary_ok is True
    assert service.delete_thread(thread).secondary_ok is True
    assert service.repair() == 2 and r.llen(REPAIR_QUEUE) == 0
    with pg.cursor() as cur:
        cur.execute("SELECT status_raw FROM subscriptions WHERE source_key = 'threadr:subscription:user:cy@x.io'")
        assert cur.fetchall() == [("active",)]
        cur.execute("SELECT count(*) FROM threads WHERE source_key = %s", (f"threadr:thread:{thread}",))
        assert cur.fetchone()[0] == 0
        # the email index reached PostgreSQL as the user did
        cur.execute("SELECT count(*) FROM legacy_id_map WHERE legacy_id = 'dee@x.io'")
        assert cur.fetchone()[0] == 1
    pg.rollback()


def test_a_key_s_new_value_leaves_no_row_of_its_old_one_but_one_another_key_gives(service, r, pg):
    """A customer's new subscription under the key of the old gives a row of a new id: the old one is
    gone (Redis no longer holds it, and premium would be read from it), as a run's validation retires
    it. A grant's row, which its other key may give too, is left to that key."""
    service.strategy = WriteStrategy.DUAL_WRITE
    service.create_subscription("cy@x.io", SUBSCRIPTION)
    service.create_subscription("cy@x.io", {**SUBSCRIPTION, "subscription_id": "sub_2", "status": "canceled"})
    service.grant_premium_access("ann@x.io", "email", 5)
    service.grant_premium_access("ann@x.io", "email", 9)  # (a grant's row is of its whole value: a new row)
    with pg.cursor() as cur:
        cur.execute("SELECT stripe_subscription_id FROM subscriptions WHERE source_key = 'threadr:subscription:user:cy@x.io'")
        assert cur.fetchall() == [("sub_2",)]
        cur.execute("SELECT count(*) FROM subscriptions WHERE source_key = 'threadr:premium:email:ann@x.io'")
        assert cur.fetchone()[0] == 2
    pg.rollback()
    assert not service.check_premium_access("cy@x.io", "email")["has_premium"]


def test_under_postgres_primary_a_change_builds_on_postgresql_and_a_stale_redis_repair_is_not_replayed(service, r, pg):
    """PostgreSQL answers: a change is made on its document (Redis, the fallback, missed a write), and a
    queued Redis repair that a later write superseded is not put back over it."""
    service.strategy = WriteStrategy.POSTGRES_PRIMARY
    user_id = service.create_user("fay@x.io", HASH)
    service.create_subscription("fay@x.io", SUBSCRIPTION)
    working = service.redis
    service.redis = redis.Redis(port=1)  # Redis away: PostgreSQL takes the writes, Redis's sides are queued
    try:
        assert service.update_user(user_id, password_hash=HASH.replace("abc", "new")).secondary_ok is False
        assert service.cancel_subscription("fay@x.io").secondary_ok is False
    finally:
        service.redis = working
    assert service.update_user(user_id, login_count=1).secondary_ok is True  # on PostgreSQL's document
    assert service.update_subscription("fay@x.io", status="active").secondary_ok is True
    service.repair()
    with pg.cursor() as cur:
        cur.execute("SELECT password_hash, login_count FROM users WHERE legacy_id = %s", (user_id,))
        assert cur.fetchone() == (HASH.replace("abc", "new"), 1)
    pg.rollback()
    stored = json.loads(r.get(f"threadr:user:{user_id}"))
    assert (stored["password_hash"], stored["login_count"]) == (HASH.replace("abc", "new"), 1)
    assert json.loads(r.get("threadr:subscription:user:fay@x.io"))["status"] == "active"


def test_a_shadow_read_of_a_counter_counted_meanwhile_matches_and_one_postgresql_got_wrong_does_not(settings, r, pg):
    """PostgreSQL's shadow answer comes later than Redis's: a counter the app counted meanwhile (both
    stores) matches Redis asked again, not the answer the request got; a count PostgreSQL alone holds
    otherwise is still a mismatch."""
    import threading

    svc = ThreadrDualWrite(r, lambda: psycopg2.connect(settings.database_url), THREADR, WriteStrategy.DUAL_WRITE,
                           shadow_rate=1.0)
    try:
        svc.track_usage("198.51.100.7")
        for counted_meanwhile, damaged in ((True, False), (False, True)):
            held = threading.Event()
            svc._shadow.submit(held.wait)  # the comparison waits behind this, as behind a busy queue
            asked = svc.get_usage_stats("198.51.100.7", "ip")
            if counted_meanwhile:
                svc.track_usage("198.51.100.7")
            if damaged:
                with pg.cursor() as cur:
                    cur.execute("UPDATE usage_counters SET count = count + 5 WHERE subject = '198.51.100.7'")
                pg.commit()
            held.set()
            svc._shadow.shutdown(wait=True)
            svc._shadow = ThreadPoolExecutor(max_workers=1)
            with pg.cursor() as cur:
                cur.execute("SELECT matched FROM dual_write_shadow_reads ORDER BY id DESC LIMIT 1")
                assert cur.fetchone() == (counted_meanwhile,), (asked, counted_meanwhile)
            pg.rollback()
    finally:
        svc.close()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "migrator.cli.main", *args], capture_output=True, text=True, timeout=120)


def test_cutover_refuses_below_parity_then_switches_services_that_follow_it(service, settings, r, pg):
    urls = ["--redis-url", settings.redis_url, "--database-url", settings.database_url]
    refused = cli("cutover", "--to", "postgres-primary", *urls)
    assert refused.returncode == 1 and "no migration run yet" in refused.stdout
    seed_demo(r, 40)
    assert migrate(settings)["status"] == "completed"
    follower = ThreadrDualWrite(r, lambda: psycopg2.connect(settings.database_url), THREADR, None,
                                shadow_rate=1.0, follow_every_s=0)
    try:
        assert follower.strategy is WriteStrategy.DUAL_WRITE  # until a cutover says otherwise
        ips = [k.decode().split(":", 3)[3] for k in r.scan_iter("threadr:premium:ip:*")]
        for ip in ips:
            follower.check_premium_access(ip, "ip")
            follower.get_usage_stats(ip, "ip")
        follower._shadow.shutdown(wait=True)  # the comparisons are in
        follower._shadow = ThreadPoolExecutor(max_workers=1)
        with pg.cursor() as cur:  # one read PostgreSQL answered differently
            cur.execute("UPDATE dual_write_shadow_reads SET matched = false WHERE id = (SELECT min(id) FROM dual_write_shadow_reads)")
        pg.commit()
        low = cli("cutover", "--to", "postgres-primary", "--min-reads", "1", *urls)
        assert low.returncode == 1 and "parity" in low.stdout and "below" in low.stdout
        parity = json.loads(cli("parity", "--json", *urls).stdout)
        assert parity["check_premium_access"]["parity"] < 1.0 and parity["check_premium_access"]["mismatches"]
        with pg.cursor() as cur:
            cur.execute("UPDATE dual_write_shadow_reads SET matched = true")
        pg.commit()
        ok = cli("cutover", "--to", "postgres-primary", "--min-reads", "1", *urls)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert follower.strategy is WriteStrategy.POSTGRES_PRIMARY
        health = json.loads(cli("health", "--json", *urls).stdout)
        assert health["ok"] and health["strategy"] == "postgres_primary" and health["pending_repairs"] == 0
        assert cli("cutover", "--back", *urls).returncode == 0 and follower.strategy is WriteStrategy.DUAL_WRITE
        # from postgres_only, under which Redis is not written, back would answer from a Redis that missed writes
        assert cli("cutover", "--to", "postgres-only", "--min-reads", "1", *urls).returncode == 0
        back = cli("cutover", "--back", *urls)
        assert back.returncode == 1 and "under which Redis is not written" in back.stdout, back.stdout
        assert follower.strategy is WriteStrategy.POSTGRES_ONLY
    finally:
        follower.close()


@pytest.mark.parametrize("strategy", [WriteStrategy.DUAL_WRITE, WriteStrategy.POSTGRES_ONLY])
def test_the_apps_other_writes_keep_both_stores_in_step(service, r, pg, strategy):
    service.strategy = strategy
    user_id = service.create_user("eve@x.io", HASH)
    service.update_user(user_id, role="premium", login_count=4)
    thread_id = service.save_thread(user_id, "T", "body", [{"id": "1", "content": "Ünï 🚀", "order": 1, "character_count": 5}])
    service.update_thread(thread_id, title="T2", is_favorite=True)
    gone = service.save_thread(user_id, "bye", "x", [{"id": "2", "content": "bye", "order": 1, "character_count": 3}])
    service.delete_thread(gone)
    end = (datetime.now(timezone.utc) + timedelta(days=20)).replace(tzinfo=None).isoformat()
    service.create_subscription(user_id, {"subscription_id": "sub_live", "plan_name": "threadr_pro", "status": "active",
                                          "current_period_start": "2026-11-01T00:00:00", "current_period_end": end})
    service.grant_premium_access(user_id, "user_id", 3)  # by user id: the grant goes under the user's email
    readers = [WriteStrategy.POSTGRES_ONLY] + ([WriteStrategy.DUAL_WRITE] if strategy.writes_redis else [])
    for reader in readers:
        service.strategy = reader
        assert service.check_premium_access(user_id, "user_id")["source"] == "subscription"
        assert service.check_premium_access("eve@x.io", "email")["has_premium"]
    service.strategy = strategy
    service.cancel_subscription(user_id)
    for reader in readers:
        service.strategy = reader
        assert service.check_premium_access(user_id, "user_id")["has_premium"] is False
    with pg.cursor() as cur:
        cur.execute("SELECT role, login_count FROM users WHERE legacy_id = %s", (user_id,))
        assert cur.fetchone() == ("premium", 4)
        cur.execute("SELECT id::text, title, is_favorite, tweets FROM threads")
        assert cur.fetchall() == [(thread_id, "T2", True, [{"id": "1", "content": "Ünï 🚀", "order": 1, "character_count": 5}])]
        cur.execute("SELECT status, cancel_at_period_end FROM subscriptions WHERE kind = 'stripe'")
        assert cur.fetchone() == ("canceled", True)
    if strategy.writes_redis:
        assert json.loads(r.get(f"threadr:thread:{thread_id}"))["title"] == "T2" and not r.exists(f"threadr:thread:{gone}")
        assert json.loads(r.get(f"threadr:user:{user_id}"))["role"] == "premium"
    else:
        assert r.dbsize() == 0


def test_a_failed_redis_write_under_postgres_primary_is_queued_and_repaired(service, settings, r, pg):
    service.strategy = WriteStrategy.POSTGRES_PRIMARY
    working = service.redis
    service.redis = redis.Redis(port=1)  # Redis is away: PostgreSQL, the primary, still takes the write
    try:
        result = service.grant_premium_access("203.0.113.77", "ip", 9)[0]
    finally:
        service.redis = working
    assert result.primary_ok and result.secondary_ok is False and result.repair_id
    assert not r.exists("threadr:premium:ip:203.0.113.77")
    assert service.check_premium_access("203.0.113.77", "ip")["has_premium"]  # PostgreSQL answers now
    assert service.repair() == 1
    assert json.loads(r.get("threadr:premium:ip:203.0.113.77"))["duration_days"] == 9
    with pg.cursor() as cur:
        cur.execute("SELECT count(*) FROM dual_write_repairs WHERE repaired_at IS NULL")
        assert cur.fetchone()[0] == 0


# Redis keeps expiries in whole milliseconds of its own clock, and a TTL is sent in whole milliseconds:
# an expiry said twice may differ by a few (a late one, the fault these tests catch, by a TTL's start)
SLACK_MS = 5


def _expiries(pg, keys: list[str]) -> dict[str, int]:
    """Each key's row's expires_at in Unix ms, for the keys that have one."""
    with pg.cursor() as cur:
        cur.execute("SELECT source_key, (extract(epoch FROM expires_at) * 1000)::bigint FROM usage_counters"
                    " WHERE source_key = ANY(%s)", (keys,))
        found = dict(cur.fetchall())
    pg.rollback()
    return found


def test_a_repaired_write_to_postgres_expires_when_the_apps_write_said(service, settings, r, pg):
    """A failed secondary write keeps its key's expiry, not its TTL: repaired later, its row says when
    the key expires (not a TTL after the repair), and one whose key has expired by then is not made.
    A counter's row says the expiry its key has: its first count set it, as the app's does."""
    service.strategy = WriteStrategy.DUAL_WRITE
    down = postgres_away(service, settings)
    lasting, brief = "threadr:usage:ip:203.0.113.5:daily:2026-12-01", "threadr:usage:ip:203.0.113.6:daily:2026-12-01"
    assert service.put(lasting, "3", 600).secondary_ok is False and service.put(brief, "4", 1).secondary_ok is False
    due = r.pexpiretime(lasting)
    time.sleep(1.5)  # the brief key expires before the repair
    down["on"] = False
    assert not r.exists(brief) and service.repair() == 2
    found = _expiries(pg, [lasting, brief])
    assert brief not in found  # its time was up: not made again
    assert due - 1000 < found[lasting] <= due + SLACK_MS, (found, due)
    service.track_usage("203.0.113.8")
    time.sleep(1.1)
    service.track_usage("203.0.113.8")  # the second count leaves the key's TTL as the first set it
    counters = sorted(k.decode() for k in r.scan_iter("threadr:usage:ip:203.0.113.8:*"))
    found = _expiries(pg, counters)
    assert len(counters) == 2 and r.get(counters[0]) == b"2"
    for key in counters:
        assert r.pexpiretime(key) - 1000 < found[key] <= r.pexpiretime(key) + SLACK_MS, (key, found[key], r.pexpiretime(key))


def test_a_repaired_write_to_redis_expires_when_the_apps_write_said(service, r, pg):
    """Under PostgreSQL as the primary, a write Redis missed is made there on repair with the expiry
    the write gave its row, not a TTL from the repair; one whose time is up by then is not made."""
    service.strategy = WriteStrategy.POSTGRES_PRIMARY
    lasting, brief = "threadr:usage:ip:203.0.113.15:daily:2026-12-01", "threadr:usage:ip:203.0.113.16:daily:2026-12-01"
    working = service.redis
    service.redis = redis.Redis(port=1)  # Redis is away
    try:
        assert service.put(lasting, "3", 600).repair_id and service.put(brief, "4", 1).repair_id
    finally:
        service.redis = working
    time.sleep(1.5)
    assert service.repair() == 2
    row = _expiries(pg, [lasting])[lasting]
    assert not r.exists(brief) and r.get(lasting) == b"3"
    assert row - 1000 < r.pexpiretime(lasting) <= row + SLACK_MS, (r.pexpiretime(lasting), row)


def test_a_count_under_postgres_primary_expires_as_the_apps_count_in_redis_does(service, r, pg):
    """PostgreSQL counting keeps the app's INCR and EXPIRE NX: the first count sets the expiry, a later
    one keeps it (in its row and in the Redis key that mirrors it), and a count past it starts again."""
    service.strategy = WriteStrategy.POSTGRES_PRIMARY

    def rows() -> dict[str, int | None]:  # each period's row's expires_at in Unix ms (the app's rows: no source_key)
        with pg.cursor() as cur:
            cur.execute("SELECT period, (extract(epoch FROM expires_at) * 1000)::bigint FROM usage_counters"
                        " WHERE subject = '203.0.113.30'")
            found = dict(cur.fetchall())
        pg.rollback()
        return found

    service.track_usage("203.0.113.30")
    first = rows()
    time.sleep(1.1)
    service.track_usage("203.0.113.30")
    counters = {k.decode().split(":")[-2]: k.decode() for k in r.scan_iter("threadr:usage:ip:203.0.113.30:*")}
    assert rows() == first and sorted(first) == sorted(counters) == ["daily", "monthly"]
    for period, key in counters.items():
        assert r.get(key) == b"2" and first[period] is not None
        assert first[period] - SLACK_MS <= r.pexpiretime(key) <= first[period] + SLACK_MS, (key, first, r.pexpiretime(key))
    with pg.cursor() as cur:  # the daily counter's time is up
        cur.execute("UPDATE usage_counters SET expires_at = now() - interval '1 second'"
                    " WHERE subject = '203.0.113.30' AND period = 'daily'")
        assert cur.rowcount == 1
    pg.commit()
    service.track_usage("203.0.113.30")
    daily = counters["daily"]
    with pg.cursor() as cur:
        cur.execute("SELECT period, count, expires_at > now() + interval '23 hours' FROM usage_counters"
                    " WHERE subject = '203.0.113.30' ORDER BY period")
        assert cur.fetchall() == [("daily", 1, True), ("monthly", 3, True)]
    pg.rollback()
    assert r.get(daily) == b"1" and r.pttl(daily) > 23 * 3600 * 1000
