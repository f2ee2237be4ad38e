"""`migrator follow`: the app's changes reach PostgreSQL from the keyspace notifications, with no
change to the app; what the notifications miss (a cut connection) is found and repaired; a follow
session rolls back exactly. Real Redis, PostgreSQL and `migrator follow` processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

import orjson
import pytest
import redis

from migrator.core import ledger
from migrator.core import notifications
from migrator.cutover import switch
from migrator.apps.threadr import THREADR
from migrator.apps.threadr.demo import seed_demo
from migrator.core.mapping import SHAPE_ERRORS, SourceRecord
from migrator.core.source import decode, read_keys
from helpers import ROOT, cli, content_fingerprint, fingerprint, free_port, migrate, scrape, throwaway_database, verify
from migrator.core.config import Settings
from servers import redis_server


@pytest.fixture(scope="module")
def settings(database_url: str, tmp_path_factory) -> Settings:
    """A Redis server of this module's own: follow needs a server-wide setting (notify-keyspace-events),
    which a test of another session on the shared server could change under it, or it under them."""
    with redis_server(tmp_path_factory.mktemp("follow-redis")) as port:
        yield Settings(f"redis://127.0.0.1:{port}/0", database_url,
                       os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"))


@pytest.fixture
def notify(r: redis.Redis):
    """The server's notify-keyspace-events as follow needs it, put back after."""
    before = notifications.current(r)
    r.config_set(notifications.SETTING, notifications.wanted(before))
    yield r
    r.config_set(notifications.SETTING, before)


def wait_for(what: Callable[[], Any], timeout: float = 60, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s: {what.__doc__ or what}")


class Following:
    """A `migrator follow` process, as an operator starts it, and its session in the ledger."""

    def __init__(self, settings, tmp_path, *args: str) -> None:
        self.settings = settings
        self.out = open(tmp_path / "follow.out", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "migrator.cli.main", "follow", *args, "--redis-url", settings.redis_url,
             "--database-url", settings.database_url, "--broker-url", settings.broker_url],
            cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT, env={**os.environ, "MIGRATOR_LOG_JSON": "1"})
        self.run_id = wait_for(self._session, 60)
        self.reconciled(1)

    def _session(self) -> str | None:
        """the session's id, printed"""
        if self.proc.poll() is not None:
            raise AssertionError(f"follow ended: {self.output()}")
        self.out.seek(0)
        for line in self.out:
            if line.startswith("follow session "):
                return line.split()[2].rstrip(":")
        return None

    def output(self) -> str:
        self.out.seek(0)
        return self.out.read()

    def row(self, pg) -> dict[str, Any]:
        with pg, pg.cursor() as cur:
            cur.execute("SELECT to_jsonb(f) FROM migration_follow f WHERE run_id = %s", (self.run_id,))
            return cur.fetchone()[0]

    def reconciliations(self, pg=None) -> list[dict[str, Any]]:
        conn = pg or self.settings.postgres()
        try:
            with conn, conn.cursor() as cur:
                cur.execute("SELECT to_jsonb(r) FROM migration_reconciliations r WHERE run_id = %s AND finished_at IS"
                            " NOT NULL ORDER BY id", (self.run_id,))
                return [row[0] for row in cur.fetchall()]
        finally:
            if pg is None:
                conn.close()

    def reconciled(self, n: int) -> list[dict[str, Any]]:
        return wait_for(lambda: len(found := self.reconciliations()) >= n and found, 120)

    def caught_up(self, pg, events: int = 0) -> dict[str, Any]:
        """Lag 0: nothing pending in a figure written after the call, with at least `events` received."""
        asked = datetime.now(timezone.utc)

        def done() -> dict[str, Any] | None:
            row = self.row(pg)
            beat = datetime.fromisoformat(row["heartbeat_at"])
            return row if beat > asked and row["pending"] == 0 and row["events"] >= events else None

        return wait_for(done, 60)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(90)
        self.out.close()
        return code


def rows(pg, query: str, *args: Any) -> list[tuple]:
    with pg, pg.cursor() as cur:
        cur.execute(query, args)
        return cur.fetchall()


def cut_subscriber(r: redis.Redis) -> int:
    """CLIENT KILL of the pub/sub connections on our database (the server is shared: another's, such
    as a Celery result backend's, are left alone); how many."""
    db = r.connection_pool.connection_kwargs.get("db", 0)
    ours = [c["id"] for c in r.client_list(_type="pubsub") if int(c["db"]) == db]
    for client_id in ours:
        r.client_kill_filter(_id=client_id)
    return len(ours)


def changed_user(r: redis.Redis, key: bytes, **changes: Any) -> None:
    """The app updating a user record (its updated_at moves, as the app's does)."""
    doc = orjson.loads(r.get(key))
    doc.update(changes, updated_at=datetime.now(timezone.utc).replace(tzinfo=None).isoformat())
    r.set(key, orjson.dumps(doc), keepttl=True)


def test_changes_reach_postgres_by_each_tables_rule(settings, r, pg, notify, tmp_path):
    seed_demo(r, 12)
    run = migrate(settings)
    assert run["status"] == "completed"
    follow = Following(settings, tmp_path, "--local")
    first = follow.reconciliations(pg)[0]
    assert first["reason"] == "connect" and first["clean"], first  # the bulk load left nothing to repair

    counter = b"threadr:usage:ip:203.0.113.77:daily:2026-12-06"
    user = next(r.scan_iter(b"threadr:user:user_*"))
    thread = next(r.scan_iter(b"threadr:thread:*"))
    session = b"threadr:session:" + user.split(b":")[-1]
    applied_before = follow.row(pg)["keys_applied"]
    for _ in range(200):  # a burst on one key
        r.incr(counter)
    changed_user(r, user, role="premium")
    r.delete(thread)
    r.set(session, orjson.dumps({"user_id": user.split(b":")[-1].decode(), "email": "a@example.org", "role": "user",
                                 "status": "active", "login_timestamp": "2026-12-06T09:18:19",
                                 "client_ip": "203.0.113.5", "last_activity": "2026-12-06T09:18:19",
                                 "access_token_hash": 12345}), px=300)
    time.sleep(0.5)  # the session expires in Redis
    assert not r.exists(session)
    figures = follow.caught_up(pg, events=203)

    assert rows(pg, "SELECT count FROM usage_counters WHERE source_key = %s", counter.decode()) == [(200,)]
    # 200 INCRs, a user, a thread, a session set and expired: far fewer keys read than events
    assert figures["keys_applied"] - applied_before < 40, figures
    r.decrby(counter, 150)  # the app lowers it: follow's read is the key's latest, GREATEST does not keep 200
    figures = follow.caught_up(pg, events=figures["events"] + 1)
    assert rows(pg, "SELECT count FROM usage_counters WHERE source_key = %s", counter.decode()) == [(50,)]
    assert rows(pg, "SELECT role FROM users WHERE source_key = %s", user.decode()) == [("premium",)]
    assert rows(pg, "SELECT count(*) FROM threads WHERE source_key = %s", thread.decode()) == [(0,)]  # on_delete delete
    marked = rows(pg, "SELECT deleted_at IS NOT NULL, migration_run::text FROM sessions WHERE source_key = %s",
                  session.decode())
    assert marked == [(True, follow.run_id)]  # on_delete mark: kept, marked
    # the session comes back: its row is live again
    r.set(session, orjson.dumps({"user_id": user.split(b":")[-1].decode(), "email": "a@example.org", "role": "user",
                                 "status": "active", "login_timestamp": "2026-12-06T10:00:00",
                                 "client_ip": "203.0.113.5", "last_activity": "2026-12-06T10:00:00",
                                 "access_token_hash": 12345}))
    follow.caught_up(pg, events=figures["events"] + 1)
    assert rows(pg, "SELECT deleted_at FROM sessions WHERE source_key = %s", session.decode()) == [(None,)]
    assert verify(settings, run["run_id"])["verdict"] == "clean"

    status = cli(settings, "status", follow.run_id)
    assert "lag" in status.stdout and "reconciliations" in status.stdout, status.stdout + status.stderr
    assert follow.stop() == 0, follow.output()
    assert rows(pg, "SELECT status FROM migration_runs WHERE id = %s", follow.run_id) == [("completed",)]


def test_a_reconciliation_under_steady_writes_is_clean_when_no_event_was_missed(settings, r, pg, notify, tmp_path):
    """A counter the app counts all the while differs from its row at every comparison, by the
    increments in flight: each came with its event and is applied as it comes, so it is no miss, and
    the reconciliations stay clean (a cutover waits for a clean one)."""
    seed_demo(r, 4)
    migrate(settings)
    follow = Following(settings, tmp_path, "--local", "--reconcile-every", "1")
    counter = b"threadr:usage:ip:203.0.113.90:daily:2026-12-06"
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            r.incr(counter)
            time.sleep(0.002)

    counting = threading.Thread(target=count)
    counting.start()
    try:
        found = follow.reconciled(4)
    finally:
        stop.set()
        counting.join()
    under = found[1:4]  # (after the connect one)
    assert all(x["clean"] and x["keys_reapplied"] == 0 for x in under), under
    follow.caught_up(pg)
    assert rows(pg, "SELECT count FROM usage_counters WHERE source_key = %s", counter.decode()) == \
        [(int(r.get(counter)),)]
    assert follow.stop() == 0, follow.output()


def test_a_cut_connection_is_repaired_by_the_reconciliation(settings, r, pg, notify, tmp_path):
    seed_demo(r, 8)
    run = migrate(settings)
    follow = Following(settings, tmp_path, "--local")
    user = next(r.scan_iter(b"threadr:user:user_*"))
    thread = next(r.scan_iter(b"threadr:thread:*"))
    # changes whose events are lost (published to nobody, as while the subscriber is away), then
    # the subscriber's connection cut: it connects again on its own
    r.config_set(notifications.SETTING, "")
    changed_user(r, user, role="premium")
    r.delete(thread)
    cut_subscriber(r)
    r.config_set(notifications.SETTING, "KA")
    # (the first after the connect one: a cut may be followed by a second, clean by then)
    after = follow.reconciled(2)[1]
    assert after["reason"] == "reconnect" and not after["clean"], after
    # the one key whose change was missed applied again, not every key of its range
    assert after["keys_reapplied"] == 1 and after["keys_gone"] == 1, after
    follow.caught_up(pg)
    assert rows(pg, "SELECT role FROM users WHERE source_key = %s", user.decode()) == [("premium",)]
    assert rows(pg, "SELECT count(*) FROM threads WHERE source_key = %s", thread.decode()) == [(0,)]
    assert follow.row(pg)["reconnects"] >= 1
    assert verify(settings, run["run_id"])["verdict"] == "clean"
    assert follow.stop() == 0, follow.output()


def test_broken_json_written_live_is_a_dead_letter_then_retried(settings, r, pg, notify, tmp_path):
    seed_demo(r, 4)
    migrate(settings)
    follow = Following(settings, tmp_path, "--local")
    key = next(r.scan_iter(b"threadr:thread:*"))
    good = r.get(key)
    r.set(key, b'{"id": "broken')
    wait_for(lambda: rows(pg, "SELECT error FROM migration_dead_letters WHERE run_id = %s AND key_text = %s",
                          follow.run_id, key.decode()))
    (reason,), = rows(pg, "SELECT error FROM migration_dead_letters WHERE run_id = %s", follow.run_id)
    assert "not valid JSON" in reason
    assert rows(pg, "SELECT count(*) FROM threads WHERE source_key = %s", key.decode()) == [(1,)]  # its last good row
    # a row left as it was, its key's change not applied: no cutover on it
    refused = cli(settings, "cutover", "--to", "postgres-primary", "--max-lag", "5", timeout=60)
    assert refused.returncode == 1 and "holds 1 dead letter(s)" in refused.stdout, refused.stdout + refused.stderr
    r.set(key, good)  # fixed by the app: applied, and no longer a dead letter
    wait_for(lambda: not rows(pg, "SELECT 1 FROM migration_dead_letters WHERE run_id = %s", follow.run_id))
    allowed = cli(settings, "cutover", "--to", "postgres-primary", "--max-lag", "5", timeout=60)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert follow.stop() == 0, follow.output()


def test_rollback_of_a_follow_session_is_exact(settings, r, pg, notify, tmp_path):
    seed_demo(r, 8)
    migrate(settings)
    before = content_fingerprint(pg)
    follow = Following(settings, tmp_path, "--local")
    user = next(r.scan_iter(b"threadr:user:user_*"))
    threads = list(r.scan_iter(b"threadr:thread:*"))
    changed_user(r, user, role="premium")
    r.delete(threads[0])
    r.incrby(b"threadr:usage:ip:203.0.113.9:daily:2026-12-06", 3)
    r.set(b"threadr:session:" + user.split(b":")[-1], orjson.dumps(
        {"user_id": user.split(b":")[-1].decode(), "email": "b@example.org", "role": "user", "status": "active",
         "login_timestamp": "2026-12-06T09:00:00", "client_ip": "203.0.113.6", "last_activity": "2026-12-06T09:00:00",
         "access_token_hash": 1}), px=200)
    time.sleep(0.4)
    follow.caught_up(pg, events=5)
    assert content_fingerprint(pg) != before
    assert cli(settings, "rollback", follow.run_id).returncode == 2  # refused while it runs
    assert follow.stop() == 0, follow.output()
    undone = cli(settings, "rollback", follow.run_id)
    assert undone.returncode == 0, undone.stdout + undone.stderr
    assert content_fingerprint(pg) == before


def test_every_row_of_the_demo_goes_to_a_table_its_pattern_names(r):
    """follow looks for the rows a changed key no longer gives only in its pattern's tables
    (Pattern.tables): every row a key of the demo gives is in one of them."""
    seed_demo(r, 12)
    now, seen = datetime.now(timezone.utc), set()
    keys = [(k, *THREADR.classify(k.decode())) for k in r.scan_iter(count=1000)]
    keys = [(k, p, f) for k, p, f in keys if p is not None and p.migrated]
    for (key, pattern, fields), read in zip(keys, read_keys(r, [(k, p.redis_type) for k, p, _ in keys], None)):
        try:
            rows = pattern.transform(SourceRecord(key.decode(), fields, decode(read.raw, pattern.value_format), None,
                                                  now, timezone.utc))
        except SHAPE_ERRORS:
            continue  # (the demo's malformed values: dead letters, no rows)
        assert {row.table for row in rows} <= set(pattern.tables), (pattern.name, {row.table for row in rows})
        seen.add(pattern.name)
    assert seen == {p.name for p in THREADR.patterns if p.migrated}


def _grant(client_ip: str | None, email: str, granted_at: str) -> bytes:
    """A premium grant's value as Threadr's grant_premium_access writes it under both of its keys."""
    return json.dumps({"granted_at": granted_at, "expires_at": "2099-01-01T00:00:00", "plan": "premium",
                       "duration_days": 30, "client_ip": client_ip, "email": email, "payment_info": {}}).encode()


def test_a_row_two_keys_give_stays_while_one_of_them_lives(settings, r, pg, notify, tmp_path):
    """One grant, one row, under its ip key and its email key: the key that wrote the row last goes
    (deleted, or its TTL runs out), the other still gives the row: it stays, and names the other."""
    seed_demo(r, 4)
    # a Stripe webhook grant (no client ip: its ip key says None) and an admin's (the email as typed)
    webhook = (b"threadr:premium:ip:None", b"threadr:premium:email:Ann.Lee@Example.ORG")
    admin = (b"threadr:premium:ip:203.0.113.61", b"threadr:premium:email:Bob.Mixed@Example.ORG")
    values = {webhook: _grant(None, "Ann.Lee@Example.ORG", "2026-12-01T10:00:00"),
              admin: _grant("203.0.113.61", "Bob.Mixed@Example.ORG", "2026-12-02T11:00:00")}
    r.set(webhook[0], values[webhook])  # the run sees one key of each grant ...
    r.set(admin[1], values[admin])
    run = migrate(settings)
    before = fingerprint(pg)
    follow = Following(settings, tmp_path, "--local")
    r.set(webhook[1], values[webhook])  # ... follow the other: the row's source is now that one
    r.set(admin[0], values[admin], px=1500)
    follow.caught_up(pg, events=2)

    def grant_row(email: str) -> list[tuple]:
        return rows(pg, "SELECT source_key, migration_run::text FROM subscriptions WHERE grant_email = %s", email)

    assert grant_row("Ann.Lee@Example.ORG") == [(webhook[1].decode(), follow.run_id)]
    assert grant_row("Bob.Mixed@Example.ORG") == [(admin[0].decode(), follow.run_id)]
    r.delete(webhook[1])
    time.sleep(1.7)  # the admin grant's ip key expires
    assert not r.exists(admin[0])
    follow.caught_up(pg, events=4)
    assert grant_row("Ann.Lee@Example.ORG") == [(webhook[0].decode(), follow.run_id)]  # kept: ip:None gives it
    assert grant_row("Bob.Mixed@Example.ORG") == [(admin[1].decode(), follow.run_id)]  # the email as written
    assert verify(settings, run["run_id"])["verdict"] == "clean"

    r.delete(webhook[0], admin[1])  # no key gives them now
    follow.caught_up(pg, events=6)
    assert grant_row("Ann.Lee@Example.ORG") == [] and grant_row("Bob.Mixed@Example.ORG") == []
    assert verify(settings, run["run_id"])["verdict"] == "clean"
    assert follow.stop() == 0, follow.output()
    undone = cli(settings, "rollback", follow.run_id)
    assert undone.returncode == 0, undone.stdout + undone.stderr
    assert fingerprint(pg) == before


def test_check_names_the_setting_and_configure_sets_it(settings, r, pg, notify, tmp_path):
    r.config_set(notifications.SETTING, "Ex")
    checked = cli(settings, "check", "--no-workers")
    line = next(x for x in checked.stdout.splitlines() if "keyspace events" in x)
    assert line.startswith("WARN") and "without K" in line and "CONFIG SET notify-keyspace-events 'KEA'" in line, line
    assert "ElastiCache" in line and "Memorystore" in line and "Azure" in line
    refused = cli(settings, "follow", "--local")
    assert refused.returncode == 2 and "CONFIG SET notify-keyspace-events 'KEA'" in refused.stderr, refused.stderr
    follow = Following(settings, tmp_path, "--local", "--configure")
    assert notifications.missing(notifications.current(r)) == "" and "E" in notifications.current(r)
    assert follow.stop() == 0
    checked = cli(settings, "check", "--no-workers")
    assert next(x for x in checked.stdout.splitlines() if "keyspace events" in x).startswith("OK")


def test_cutover_waits_for_follow(settings, r, pg, notify, tmp_path):
    seed_demo(r, 4)
    migrate(settings)
    follow = Following(settings, tmp_path, "--local")
    allowed = cli(settings, "cutover", "--to", "postgres-primary", "--max-lag", "5")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr  # no shadow reads: follow is the sync path
    # the server's keyspace events turned off since follow subscribed: it hears of no change, lag 0 or not
    r.config_set(notifications.SETTING, "")
    try:
        refused = cli(settings, "cutover", "--to", "postgres-primary", "--max-lag", "5")
        assert refused.returncode == 1 and "notify-keyspace-events is '', without K" in refused.stdout, refused.stdout
    finally:
        r.config_set(notifications.SETTING, notifications.wanted(""))
    with pg, pg.cursor() as cur:  # its last reconciliation repaired something
        cur.execute("UPDATE migration_reconciliations SET clean = false WHERE run_id = %s", (follow.run_id,))
    refused = cli(settings, "cutover", "--to", "postgres-primary", "--max-lag", "5")
    assert refused.returncode == 1 and "reconciliation" in refused.stdout, refused.stdout
    assert follow.stop() == 0


def test_cutover_refused_while_follow_lags(settings, r, pg, notify, tmp_path):
    """The lag made real: a transaction holds usage_counters locked, so the applier that must write a
    changed counter waits; the change stays unapplied, its age grows past --max-lag."""
    seed_demo(r, 4)
    migrate(settings)
    follow = Following(settings, tmp_path, "--local")
    counter = b"threadr:usage:ip:203.0.113.79:daily:2026-12-06"
    blocker = settings.postgres()
    try:
        with blocker.cursor() as cur:
            cur.execute("LOCK TABLE usage_counters IN ACCESS EXCLUSIVE MODE")
        r.incr(counter)
        lagging = wait_for(lambda: (row := follow.row(pg))["lag_s"] > 2 and row)
        assert lagging["pending"] == 1, lagging
        refused = cli(settings, "cutover", "--to", "postgres-primary", "--max-lag", "1", timeout=60)
        assert refused.returncode == 1 and "over --max-lag 1 s" in refused.stdout, refused.stdout + refused.stderr
        status = cli(settings, "status", follow.run_id, timeout=60)
        assert "1 keys pending" in status.stdout, status.stdout
    finally:
        blocker.rollback()  # the lock goes: the applier writes
        blocker.close()
    follow.caught_up(pg)
    assert rows(pg, "SELECT count FROM usage_counters WHERE source_key = %s", counter.decode()) == [(1,)]
    allowed = cli(settings, "cutover", "--to", "postgres-primary", "--max-lag", "1", timeout=60)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert follow.stop() == 0, follow.output()


def test_a_killed_follow_shows_no_heartbeat_and_refuses_cutover(settings, r, pg, notify, tmp_path):
    seed_demo(r, 4)
    migrate(settings)
    follow = Following(settings, tmp_path, "--local")
    alive = cli(settings, "status", follow.run_id, timeout=60)
    assert "running" in alive.stdout and "NO HEARTBEAT" not in alive.stdout, alive.stdout
    follow.proc.kill()  # SIGKILL: no drain, no last figures, the session left running in the ledger
    follow.proc.wait(30)
    follow.out.close()

    def quiet() -> bool:
        """the session silent for longer than a live one is between its figures"""
        with pg, pg.cursor() as cur:
            return ledger.follow_progress(cur, follow.run_id)["silent_s"] > switch.CUTOVER_SILENCE_S

    wait_for(quiet, switch.CUTOVER_SILENCE_S + 30, every=0.5)  # (long before status calls it gone)
    refused = cli(settings, "cutover", "--to", "postgres-primary", "--max-lag", "5", timeout=60)
    assert refused.returncode == 1 and "has not reported" in refused.stdout, refused.stdout + refused.stderr

    def silent() -> bool:
        """the session silent for longer than a live one ever is"""
        with pg, pg.cursor() as cur:
            return ledger.follow_progress(cur, follow.run_id)["silent_s"] > ledger.FOLLOW_STALE_S

    wait_for(silent, ledger.FOLLOW_STALE_S + 30, every=1)
    status = cli(settings, "status", follow.run_id, timeout=60)
    assert "running" in status.stdout and "NO HEARTBEAT for" in status.stdout, status.stdout
    refused = cli(settings, "cutover", "--to", "postgres-primary", "--max-lag", "5", timeout=60)
    assert refused.returncode == 1 and "has not reported" in refused.stdout, refused.stdout + refused.stderr


def test_follow_serves_its_metrics(settings, r, pg, notify, tmp_path):
    seed_demo(r, 4)
    migrate(settings)
    port = free_port()
    follow = Following(settings, tmp_path, "--local", "--metrics-port", str(port))

    def sample(name: str, **labels: str) -> float:
        return scrape(port).get((name, tuple(sorted(labels.items()))), 0.0)

    # the connect reconciliation: the bulk load left nothing to repair
    wait_for(lambda: sample("migrator_follow_reconciliations_total", outcome="clean") == 1)
    served = scrape(port)
    assert ("migrator_follow_lag_seconds", ()) in served and ("migrator_follow_pending_keys", ()) in served, served
    events, applied = sample("migrator_follow_events_total"), sample("migrator_follow_keys_applied_total")

    counter = b"threadr:usage:ip:203.0.113.80:daily:2026-12-06"
    for _ in range(20):
        r.incr(counter)
    changed_user(r, next(r.scan_iter(b"threadr:user:user_*")), role="premium")
    follow.caught_up(pg, events=21)
    wait_for(lambda: sample("migrator_follow_events_total") >= events + 21
             and sample("migrator_follow_keys_applied_total") >= applied + 2)
    assert sample("migrator_follow_reconnects_total") == 0

    # one cut is one reconnect and one reconnect reconciliation, though redis-py connects the
    # subscription again on its own and then gives the cut read's error up all the same; two are two
    for cuts in (1, 2):
        assert cut_subscriber(r) == 1
        reconnected = wait_for(lambda: len(found := [x for x in follow.reconciliations(pg)
                                                     if x["reason"] == "reconnect"]) >= cuts and found)
        time.sleep(1)  # (a second count of the same cut would come within 0.1 s)
        assert follow.caught_up(pg)["reconnects"] == cuts, follow.output()
        assert sample("migrator_follow_reconnects_total") == cuts
        assert f"reconnects {cuts};" in cli(settings, "status", follow.run_id).stdout
        assert len(reconnected) == cuts and follow.reconciliations(pg)[-1]["reason"] == "reconnect"
    assert sample("migrator_follow_reconciliations_total", outcome="failed") == 0
    assert follow.stop() == 0, follow.output()

# An app-like writer: creates and increments counters, updates users, deletes counters, and logs
# sessions in with TTLs of a second or so, ~200 operations a second until SIGTERM.
WRITER = r"""
import datetime, random, signal, sys, time, orjson, redis
r = redis.Redis.from_url(sys.argv[1])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
rng = random.Random(7)
users = sorted(r.scan_iter(b"threadr:user:user_*"))
counters = [f"threadr:usage:ip:198.51.100.{i}:daily:2026-12-06" for i in range(40)]
ops = 0
while not stop:
    op = rng.random()
    if op < 0.5:
        key = rng.choice(counters)
        r.incr(key)
        r.expire(key, 86400, nx=True)
    elif op < 0.7:
        key = rng.choice(users)
        doc = orjson.loads(r.get(key))
        doc["role"] = rng.choice(["user", "premium"])
        doc["updated_at"] = datetime.datetime.utcnow().isoformat()
        r.set(key, orjson.dumps(doc), keepttl=True)
    elif op < 0.8:
        r.delete(rng.choice(counters))
    else:
        user = rng.choice(users).split(b":")[-1].decode()
        r.set(f"threadr:session:{user}", orjson.dumps({"user_id": user, "email": "c@example.org", "role": "user",
              "status": "active", "login_timestamp": "2026-12-06T09:00:00", "client_ip": "203.0.113.7",
              "last_activity": datetime.datetime.utcnow().isoformat(), "access_token_hash": ops}),
              px=rng.randint(300, 1500))
    ops += 1
    time.sleep(0.005)
print(ops)
"""


def test_traffic_during_a_run_then_follow_loses_no_update(settings, r, pg, notify, tmp_path):
    seed_demo(r, 30)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, settings.redis_url], stdout=subprocess.PIPE, text=True)
    try:
        # follow from before the bulk load: a run started while it is live needs no second pass
        follow = Following(settings, tmp_path, "--local", "--reconcile-every", "5")
        run = migrate(settings, count_tolerance=0.2)
        assert run["status"] == "completed", run["status"]
        time.sleep(1)
        assert cut_subscriber(r) == 1  # mid-stream
        time.sleep(2)
    finally:
        writer.send_signal(signal.SIGTERM)
        ops = int(writer.communicate(timeout=30)[0])
    assert ops > 200
    follow.caught_up(pg)
    reconnected = wait_for(lambda: [x for x in follow.reconciliations(pg) if x["reason"] == "reconnect"])
    assert reconnected
    # a reconciliation that began once the writer had stopped: what it found is what was lost
    stopped = datetime.now(timezone.utc)
    later = wait_for(lambda: [x for x in follow.reconciliations(pg)
                              if datetime.fromisoformat(x["started_at"]) > stopped], 120)[0]
    follow.caught_up(pg)
    result = verify(settings, run["run_id"])
    assert result["verdict"] == "clean" and result["changed_since_run"] == 0, ([(p["pattern"], p["examples"]) for p in result["patterns"] if p["examples"]], later)
    assert follow.stop() == 0, follow.output()


def test_on_celery_workers(settings, r, pg, notify, workers, tmp_path):
    """Without --local: the subscriber in `migrator follow`, each batch of changed keys applied by a
    `migrator.apply_keys` task on a worker."""
    seed_demo(r, 4)
    migrate(settings)
    follow = Following(settings, tmp_path)
    user = next(r.scan_iter(b"threadr:user:user_*"))
    thread = next(r.scan_iter(b"threadr:thread:*"))
    changed_user(r, user, role="premium")
    r.delete(thread)
    wait_for(lambda: rows(pg, "SELECT role FROM users WHERE source_key = %s", user.decode()) == [("premium",)])
    wait_for(lambda: rows(pg, "SELECT count(*) FROM threads WHERE source_key = %s", thread.decode()) == [(0,)])
    assert follow.caught_up(pg)["keys_applied"] >= 2
    assert rows(pg, "SELECT mode FROM migration_follow WHERE run_id = %s", follow.run_id) == [("celery",)]
    assert follow.stop() == 0, follow.output()


def test_a_mapping_file_table_that_marks_its_rows(settings, r, notify, tmp_path):
    """A file mapping's table declares on_delete = "mark": init-db gives it deleted_at, follow sets it."""
    path = tmp_path / "notes.toml"
    path.write_text('[mapping]\nname = "notes"\n\n[[pattern]]\nname = "note"\nkey = "note:{id}"\ntype = "string"\n'
                    'priority = "high"\ntable = "notes"\n[pattern.columns]\nnote_id = "key.id"\n'
                    'body = "value"\n\n[tables.notes]\nkey = ["note_id"]\non_delete = "mark"\n'
                    '[tables.notes.columns]\nnote_id = "text"\nbody = "text"\n')
    with throwaway_database(settings.database_url) as url:
        here = Settings(settings.redis_url, url, settings.broker_url)
        made = cli(here, "init-db", "--mapping", str(path))
        assert made.returncode == 0, made.stdout + made.stderr
        r.set("note:1", "first")
        follow = Following(here, tmp_path, "--local", "--mapping", str(path))
        conn = here.postgres()
        try:
            wait_for(lambda: rows(conn, "SELECT body FROM notes") == [("first",)])  # the connect reconciliation
            r.set("note:1", "second")
            r.set("note:2", "other", px=200)
            wait_for(lambda: rows(conn, "SELECT body, deleted_at IS NOT NULL FROM notes ORDER BY body")
                     == [("other", True), ("second", False)])
        finally:
            conn.close()
        assert follow.stop() == 0, follow.output()


GRANTS_FILE = """[mapping]
name = "grants"

[[pattern]]
name = "by_ip"
key = "app:grant:ip:{ip:.+}"
type = "string"
format = "json"
priority = "high"
table = "grants"
[pattern.columns]
ip = "key.ip"
email = "json.email"
granted = "json.granted"

[[pattern]]
name = "by_email"
key = "app:grant:email:{email}"
type = "string"
format = "json"
priority = "high"
table = "grants"
[pattern.columns]
ip = "json.ip"
email = "key.email"
granted = "json.granted"

[tables.grants]
key = ["granted"]
[tables.grants.columns]
ip = "text"
email = "text"
granted = "text"
"""


def test_a_mapping_file_row_two_keys_give_stays_while_one_lives(settings, r, notify, tmp_path):
    """The same with a mapping file: each pattern's key, spelled from the row by its key grammar."""
    path = tmp_path / "grants.toml"
    path.write_text(GRANTS_FILE)
    keys = ["app:grant:ip:2001:db8::7", "app:grant:email:Ann@X.io"]
    with throwaway_database(settings.database_url) as url:
        here = Settings(settings.redis_url, url, settings.broker_url)
        made = cli(here, "init-db", "--mapping", str(path))
        assert made.returncode == 0, made.stdout + made.stderr
        value = json.dumps({"ip": "2001:db8::7", "email": "Ann@X.io", "granted": "2026-12-01T10:00:00"})
        for key in keys:
            r.set(key, value)
        follow = Following(here, tmp_path, "--local", "--mapping", str(path))
        conn = here.postgres()
        try:
            (writer,), = wait_for(lambda: rows(conn, "SELECT source_key FROM grants"))  # the connect reconciliation
            other = next(k for k in keys if k != writer)
            r.delete(writer)
            wait_for(lambda: rows(conn, "SELECT source_key FROM grants") == [(other,)])
            r.delete(other)
            wait_for(lambda: rows(conn, "SELECT count(*) FROM grants") == [(0,)])
        finally:
            conn.close()
        assert follow.stop() == 0, follow.output()
