"""Runs through real Celery worker processes on the local RabbitMQ broker.

Workers are separate `celery -A workers worker` processes (two of them for the distribution
tests), started and stopped here; queues carry this session's MIGRATOR_QUEUE_PREFIX.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import multiprocessing
import time

import pytest
import redis

from migrator.apps.threadr.demo import DANGLING, seed_demo
from migrator.core.options import RunOptions
from migrator.views.report import build_report
from migrator.views.status import run_progress
from migrator.apps.threadr import THREADR

from helpers import ROOT, Flower, by_pattern, content_fingerprint, migrate, start_on_workers, wait_for_end, worker_env



def run_distributed(settings, timeout: float = 240, **options) -> dict:
    opts = RunOptions(**options)
    client, conn = settings.redis(), settings.postgres()
    try:
        run_id = start_on_workers(settings, client, conn, THREADR, opts)
        wait_for_end(conn, run_id, timeout)
        return build_report(conn, THREADR, run_id)
    finally:
        conn.close()
        client.close()


def app_traffic(redis_url: str, doomed: list[bytes], stop) -> None:
    live = redis.Redis.from_url(redis_url)
    rnd = random.Random(7)
    for i in range(400):
        if stop.is_set():
            return
        live.set(f"threadr:usage:ip:198.51.100.{i % 250}:daily:2026-11-{1 + i % 28:02d}", rnd.randint(1, 9), ex=86400)
        if doomed:
            live.delete(doomed.pop())
        time.sleep(0.005)


def test_two_workers_migrate_every_key_once_while_the_app_writes_and_deletes(settings, r, pg, workers):
    seed_demo(r, 1500)
    before = {k for k in r.scan_iter("threadr:user:user_*", count=1000)}
    doomed = sorted(r.scan_iter("threadr:usage:log:*", count=1000))[:150]
    stop = multiprocessing.Event()
    writer = multiprocessing.get_context("fork").Process(target=app_traffic, args=(settings.redis_url, doomed, stop))
    writer.start()  # another process: the app, writing and deleting keys during the scan
    try:
        report = run_distributed(settings, ranges=16, count_tolerance=0.2)  # the app adds keys meanwhile
    finally:
        stop.set()
        writer.join(30)
    assert report["status"] == "completed", report["error"]
    assert report["balanced"] and report["batches"]["failed"] == 0
    with pg.cursor() as cur:
        cur.execute("SELECT source_key FROM users")
        in_pg = {row[0].encode() for row in cur.fetchall()}
        cur.execute("SELECT count(*), count(DISTINCT source_key) FROM usage_counters")
        rows, distinct = cur.fetchone()
    assert before <= in_pg  # every key present throughout arrived
    assert rows == distinct  # each counter once
    user = by_pattern(report)["user"]
    assert user["migrated"] == len(in_pg)  # counted once too: no key scanned by two ranges


@pytest.fixture
def flower(settings, tmp_path):
    watcher = Flower(worker_env(settings), tmp_path)
    yield watcher
    watcher.stop()


def test_a_failing_batch_shows_as_failure_in_flower_and_requeue_after_the_fix_completes(settings, r, pg, workers,
                                                                                        flower):
    seed_demo(r, 200)
    with pg.cursor() as cur:
        cur.execute("ALTER TABLE usage_counters RENAME TO usage_counters_away")  # every high batch now fails
    pg.commit()
    try:
        report = run_distributed(settings, ranges=4, rollback_on_failure=False)
        assert report["status"] == "failed" and "high" in report["error"]
        with pg.cursor() as cur:
            cur.execute("SELECT count(*), min(error) FROM migration_batches WHERE run_id = %s AND status = 'failed'",
                        (report["run_id"],))
            failed, error = cur.fetchone()
            cur.execute("SELECT count(*) FROM migration_batches WHERE run_id = %s AND priority IN ('medium', 'low')"
                        " AND status <> 'pending'", (report["run_id"],))
            assert cur.fetchone()[0] == 0  # later priorities never started
        pg.rollback()
        assert failed == 4 and "usage_counters" in error
        # Flower shows the failed batches as failures, with their error, priority and range; the
        # chord's callback still ran and decided (the run failed on the ledger's word)
        shown = {}
        # (this run's tasks: Flower sees every task on the broker, another session's too)
        mine = lambda name: {k: t for k, t in flower.tasks(name).items() if report["run_id"] in t["kwargs"]}  # noqa: E731
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # Flower's events arrive a moment after the ledger's rows
            shown = mine("migrator.migrate_batch")
            if sum(t["state"] == "FAILURE" for t in shown.values()) == 4:
                break
            time.sleep(0.5)
        high = [t for t in shown.values() if "'priority': 'high'" in t["kwargs"]]
        assert len(high) == 4 and all(t["state"] == "FAILURE" for t in high), shown
        assert all("UnitFailed" in t["exception"] and "usage_counters" in t["exception"] for t in high)
        assert {eval(t["kwargs"])["range"] for t in high} == {"1/4", "2/4", "3/4", "4/4"}
        assert all(t["state"] == "SUCCESS" for t in shown.values() if t not in high)
        judged = mine("migrator.judge_priority")
        assert any(t["state"] == "SUCCESS" and "'priority': 'high'" in t["kwargs"] for t in judged.values()), judged
    finally:
        with pg.cursor() as cur:
            cur.execute("ALTER TABLE IF EXISTS usage_counters_away RENAME TO usage_counters")
        pg.commit()
    done = subprocess.run([sys.executable, "-m", "migrator.cli.main", "requeue", report["run_id"], "--failed",
                           "--database-url", settings.database_url, "--broker-url", settings.broker_url],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0 and "requeued 4 batch(es)" in done.stdout, done.stderr
    wait_for_end(pg, report["run_id"])
    final = build_report(pg, THREADR, report["run_id"])
    assert final["status"] == "completed" and final["balanced"] and final["batches"]["failed"] == 0
    counters = by_pattern(final)["usage_counter"]
    assert counters["migrated"] == counters["scanned"] > 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the requeued batches, in Flower too
        states = [t["state"] for t in mine("migrator.migrate_batch").values() if "'priority': 'high'" in t["kwargs"]]
        if states.count("SUCCESS") == 4:
            break
        time.sleep(0.5)
    assert states.count("SUCCESS") == 4 and states.count("FAILURE") == 4, states


def test_worker_killed_mid_batch_ends_with_the_same_tables_as_an_undisturbed_run(settings, r, pg, workers):
    seed_demo(r, 2500)
    reference = migrate(settings)  # undisturbed, in-process
    assert reference["status"] == "completed"
    expected = content_fingerprint(pg)
    with pg.cursor() as cur:
        cur.execute("TRUNCATE " + ", ".join(THREADR.table_names()))
    pg.commit()

    workers.kill("w2")  # one worker takes the batch, and is killed while it runs
    client = settings.redis()
    run_id = start_on_workers(settings, client, pg, THREADR, RunOptions(ranges=2, batch_size=50, priorities=("high",)))
    client.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with pg.cursor() as cur:
            cur.execute("SELECT count(*) FROM migration_batches WHERE run_id = %s AND status = 'running'", (run_id,))
            running = cur.fetchone()[0]
        pg.rollback()
        if running:
            break
        time.sleep(0.05)
    assert running, "no batch started"
    time.sleep(0.3)  # well inside the batch: it has written sub-batches, not committed
    workers.kill("w1", signal.SIGKILL)
    workers.start("w2")  # the redelivered batch goes here
    progress = wait_for_end(pg, run_id)
    assert progress["status"] == "completed", progress
    with pg.cursor() as cur:
        cur.execute("SELECT max(attempts) FROM migration_batches WHERE run_id = %s", (run_id,))
        assert cur.fetchone()[0] >= 2  # the killed batch ran again
    pg.rollback()
    # the rest of the priorities, undisturbed, to compare whole tables
    rest = migrate(settings, priorities=("critical", "medium", "low"))
    assert rest["status"] == "completed"
    assert content_fingerprint(pg) == expected
    workers.start("w1")


def test_a_command_finds_a_worker_of_its_own_queues_and_not_one_of_others(settings, workers):
    """`run` and `follow` ask whether a worker takes their queues (else they say how to start one):
    this session's workers answer, and none consumes another installation's queues."""
    from workers.executor import CeleryExecutor

    assert CeleryExecutor(settings).answering()
    elsewhere = CeleryExecutor(settings)
    elsewhere.queues = ("another-installation.critical",)
    assert not elsewhere.answering(timeout=0.4)


def test_priority_flag_runs_one_priority_through_its_queue(settings, r, pg, workers):
    seed_demo(r, 100)
    report = run_distributed(settings, priorities=("critical",))
    assert report["status"] == "completed"
    assert {p["priority"] for p in report["patterns"]} == {"critical"}
    with pg.cursor() as cur:
        cur.execute("SELECT count(*) FROM users")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT priority, ok, checks FROM migration_validations WHERE run_id = %s ORDER BY created_at",
                    (report["run_id"],))
        rows = cur.fetchall()
    assert [(p, ok) for p, ok, _ in rows] == [("critical", True), ("run", True)]
    assert [c["name"] for c in rows[0][2]] == ["batches_done", "balance", "dead_letters", "references", "source_counts",
                                                "verification"]


def test_validation_fails_and_rolls_back_when_postgres_disagrees_with_redis(settings, r, pg, workers):
    """A corrupted target row is caught by the verification; the run is rolled back exactly."""
    seed_demo(r, 100)
    before = content_fingerprint(pg)
    # a trigger that silently alters each row once inserted stands in for a faulty target
    with pg.cursor() as cur:
        cur.execute("CREATE FUNCTION corrupt() RETURNS trigger LANGUAGE plpgsql AS $$"
                    " BEGIN UPDATE subscriptions SET plan = 'tampered' WHERE id = NEW.id; RETURN NULL; END $$")
        cur.execute("CREATE TRIGGER corrupt AFTER INSERT ON subscriptions FOR EACH ROW EXECUTE FUNCTION corrupt()")
    pg.commit()
    try:
        report = run_distributed(settings, priorities=("critical",))
    finally:
        with pg.cursor() as cur:
            cur.execute("DROP TRIGGER corrupt ON subscriptions")
            cur.execute("DROP FUNCTION corrupt()")
        pg.commit()
    assert report["status"] == "rolled_back"
    assert "PostgreSQL does not hold what Redis holds: " in report["error"] and "different (columns plan)" in report["error"]
    assert content_fingerprint(pg) == before


def test_resume_carries_on_a_run_whose_coordinator_died_after_planning(settings, r, pg, workers):
    from migrator.execution.runner import plan_run

    seed_demo(r, 100)
    client = settings.redis()
    run_id = plan_run(client, pg, THREADR, RunOptions(ranges=2), settings.redis_url)  # ...and nothing was sent
    client.close()
    done = subprocess.run([sys.executable, "-m", "migrator.cli.main", "resume", run_id, "--database-url", settings.database_url],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0 and "at priority critical" in done.stdout, done.stderr
    assert wait_for_end(pg, run_id)["status"] == "completed"
    again = subprocess.run([sys.executable, "-m", "migrator.cli.main", "resume", run_id, "--database-url", settings.database_url],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert again.returncode == 0 and "nothing left to do" in again.stdout
    assert build_report(pg, THREADR, run_id)["balanced"]


def app_with_dual_writes(redis_url: str, database_url: str, ips: list[str], emails: list[str], stop) -> None:
    """The app during the migration: registrations, purchases and generations through the service."""
    import psycopg2

    from migrator.apps.threadr.dualwrite import ThreadrDualWrite
    from migrator.cutover.dualwrite import WriteStrategy

    service = ThreadrDualWrite(redis.Redis.from_url(redis_url), lambda: psycopg2.connect(database_url), THREADR,
                               WriteStrategy.DUAL_WRITE, shadow_rate=0.5)
    for i in range(10_000):
        if stop.is_set():
            break
        ip, email = ips[i % len(ips)], emails[i % len(emails)]
        service.check_premium_access(email, "email")  # what each request asks first
        service.get_usage_stats(ip, "ip")
        service.track_usage(ip, email=email)
        if i % 7 == 0:
            service.grant_premium_access(ip if i % 2 else email, "ip" if i % 2 else "email", 1 + i % 30)
        if i % 11 == 0:
            service.create_user(f"live{i}@example.org", "$2b$12$" + "x" * 53)
        time.sleep(0.002)
    service.repair()
    service.close()


def test_live_traffic_through_the_dual_write_service_during_a_run_loses_no_update(settings, r, pg, workers):
    import psycopg2

    from migrator.apps.threadr.dualwrite import ThreadrDualWrite
    from migrator.cutover.switch import judge_cutover
    from migrator.cutover.dualwrite import WriteStrategy

    seed_demo(r, 600)
    ips = [f"198.51.100.{i}" for i in range(20)] + [k.decode().split(":", 3)[3] for k in
                                                    sorted(r.scan_iter("threadr:premium:ip:*", count=1000))[:10]]
    emails = [f"live{i}@example.net" for i in range(20)] + [k.decode().split(":", 3)[3] for k in
                                                            sorted(r.scan_iter("threadr:premium:email:*", count=1000))[:10]]
    stop = multiprocessing.Event()
    app = multiprocessing.get_context("fork").Process(target=app_with_dual_writes,
                                                      args=(settings.redis_url, settings.database_url, ips, emails, stop))
    app.start()
    try:
        time.sleep(0.5)
        report = run_distributed(settings, ranges=8, count_tolerance=0.5)  # the app adds keys all along
    finally:
        stop.set()
        app.join(60)
    assert report["status"] == "completed", report["error"]
    service = ThreadrDualWrite(r, lambda: psycopg2.connect(settings.database_url), THREADR)
    try:
        for identifier, kind in [*((ip, "ip") for ip in ips), *((e, "email") for e in emails)]:
            service.strategy = WriteStrategy.DUAL_WRITE
            from_redis = (service.check_premium_access(identifier, kind), service.get_usage_stats(identifier, kind))
            service.strategy = WriteStrategy.POSTGRES_ONLY
            from_postgres = (service.check_premium_access(identifier, kind), service.get_usage_stats(identifier, kind))
            assert from_redis == from_postgres, (kind, from_redis, from_postgres)  # zero lost updates
        with pg.cursor() as cur:
            cur.execute("SELECT count(*) FROM users WHERE email LIKE 'live%%@example.org'")
            created = cur.fetchone()[0]
            cur.execute("SELECT count(*), count(*) FILTER (WHERE matched) FROM dual_write_shadow_reads")
            shadow_reads, matched = cur.fetchone()
        pg.rollback()
        assert created == len(list(r.scan_iter("threadr:user:email:live*@example.org"))) > 0
        # shadow reads before the backfill reached a key disagree: parity below the bar refuses the cutover
        assert shadow_reads > 0
        decision = judge_cutover(r, pg, THREADR.hooks.parity_reads, min_parity=1.0, min_reads=1, hours=1)
        assert decision.allowed == (matched == shadow_reads)
    finally:
        service.close()


def test_a_flushed_broker_loses_queued_batches_and_resume_sends_exactly_the_unfinished_ones(settings, r, pg, workers):
    from workers.celery import app
    seed_demo(r, 150)
    workers.kill("w1", signal.SIGTERM)
    workers.kill("w2", signal.SIGTERM)  # nobody consumes: the first chord waits in its queue
    client = settings.redis()
    run_id = start_on_workers(settings, client, pg, THREADR, RunOptions(ranges=4))
    client.close()
    with app.connection_for_write() as conn:  # the broker loses everything queued
        purged = conn.default_channel.queue_purge(os.environ["MIGRATOR_QUEUE_PREFIX"] + "critical")
    assert purged == 4
    workers.start("w1")
    workers.start("w2")
    time.sleep(1.0)
    assert run_progress(pg, run_id)["status"] == "running"  # stuck: no batch left to run
    with pg.cursor() as cur:
        cur.execute("SELECT count(*) FROM migration_batches WHERE run_id = %s AND status = 'pending'", (run_id,))
        assert cur.fetchone()[0] == 16
    pg.rollback()
    done = subprocess.run([sys.executable, "-m", "migrator.cli.main", "resume", run_id, "--database-url", settings.database_url],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0 and "at priority critical" in done.stdout, done.stderr
    assert wait_for_end(pg, run_id)["status"] == "completed"
    with pg.cursor() as cur:
        cur.execute("SELECT max(attempts) FROM migration_batches WHERE run_id = %s", (run_id,))
        assert cur.fetchone()[0] == 1  # each batch ran once
    pg.rollback()
    assert build_report(pg, THREADR, run_id)["balanced"]


def test_a_worker_keeps_one_database_session_across_batches_and_replaces_one_that_ended(settings, r, pg, workers):
    """Each worker process holds one PostgreSQL session for all its tasks; one the server ended
    while it idled (a restart, an idle timeout) is replaced before the next batch, which then
    runs at its first attempt."""
    seed_demo(r, 100)
    pg.autocommit = True

    def sessions() -> int:
        with pg.cursor() as cur:
            cur.execute("SELECT pg_stat_clear_snapshot()")
            cur.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
            return cur.fetchone()[0]

    before = sessions()
    first = run_distributed(settings, ranges=4)
    assert first["status"] == "completed" and first["batches"]["total"] == 16
    # two workers, the coordinator and the test's own: far fewer than one per batch
    assert sessions() - before < first["batches"]["total"]
    with pg.cursor() as cur:
        cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = 'migrator' AND datname = current_database() AND pid <> pg_backend_pid()"
                    " AND state = 'idle'")  # (this session's database only: others' sessions are theirs)
        assert cur.fetchone()[0] >= 2  # the workers' held sessions, idle between runs
    logs = {name: (workers.logdir / f"{name}.log") for name in workers.procs}
    seen = {name: path.stat().st_size for name, path in logs.items()}
    second = run_distributed(settings, ranges=4)
    assert second["status"] == "completed"
    with pg.cursor() as cur:
        cur.execute("SELECT max(attempts) FROM migration_batches WHERE run_id = %s", (second["run_id"],))
        assert cur.fetchone()[0] == 1
    pg.autocommit = False
    for name, path in logs.items():  # no task failed on the ended session and waited for a retry
        with path.open("rb") as log:
            log.seek(seen[name])
            since = log.read()
        assert b"batch_retry" not in since and b"finalize_retry" not in since, name


def verdicts(conn, run_id: str) -> dict[str, list[tuple[str, bool]]]:
    """Per priority (and the run as a whole): the checks of its latest verdict, by name."""
    with conn.cursor() as cur:
        cur.execute("SELECT DISTINCT ON (priority) priority, checks FROM migration_validations WHERE run_id = %s"
                    " ORDER BY priority, created_at DESC", (run_id,))
        found = {label: [(c["name"], c["ok"]) for c in checks] for label, checks in cur.fetchall()}
    conn.rollback()
    return found


def orphans(checks: list[dict]) -> dict[str, int]:
    return {c["name"]: c["data"]["count"] for c in checks if "count" in c.get("data", {})}


def test_the_chord_callbacks_run_local_and_validate_judge_alike(settings, r, pg, workers):
    """The same checks on the same data agree, wherever they run, orphans included."""
    from helpers import validate

    seed_demo(r, 150, malformed=3)
    # dangling references the app left: a subscription and usage of a user that is not there
    r.set("threadr:subscription:user:user_gone", '{"subscription_id": "sub_gone", "status": "active",'
          ' "current_period_end": "2030-01-01T00:00:00"}')
    r.set("threadr:usage:user:user_gone:daily:2026-12-01", 3)
    on_workers = run_distributed(settings, ranges=4)
    here = migrate(settings, ranges=4)  # the same data again, in this process
    again = validate(settings, on_workers["run_id"])
    assert on_workers["status"] == here["status"] == "completed" and again["ok"]
    judged = verdicts(pg, on_workers["run_id"])
    assert judged == verdicts(pg, here["run_id"])
    assert judged == {**{p: [(c["name"], c["ok"]) for c in cs] for p, cs in again["priorities"].items()},
                      "run": [(c["name"], c["ok"]) for c in again["run"]]}
    assert [name for name, _ in judged["high"]] == ["batches_done", "balance", "dead_letters", "references",
                                                    "source_counts", "verification"]
    with pg.cursor() as cur:
        cur.execute("SELECT run_id, checks FROM migration_validations WHERE priority = 'run'")
        figures = {str(run): orphans(checks) for run, checks in cur.fetchall()}
    pg.rollback()
    expected = {"orphaned_subscriptions": 1, "usage_without_users": 1}
    assert figures[on_workers["run_id"]] == figures[here["run_id"]] == orphans(again["run"]) == expected


def test_verify_runs_its_ranges_on_the_workers(settings, r, pg, workers):
    import json

    seed_demo(r, 100)
    report = run_distributed(settings, ranges=4)
    assert report["status"] == "completed"

    def verify_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "migrator.cli.main", "verify", report["run_id"], "--json", *args,
                               "--redis-url", settings.redis_url, "--database-url", settings.database_url,
                               "--broker-url", settings.broker_url], capture_output=True, text=True, timeout=120, cwd=ROOT)

    clean = verify_cli()
    assert clean.returncode == 0 and "verifying here" not in clean.stderr, clean.stderr
    result = json.loads(clean.stdout)
    assert result["verdict"] == "clean" and result["ranges"] == {"total": 4, "failed": 0}
    with pg.cursor() as cur:
        cur.execute("UPDATE users SET email = 'x' || email WHERE id = (SELECT id FROM users ORDER BY id LIMIT 1)")
    pg.commit()
    damaged = verify_cli()
    assert damaged.returncode == 1, damaged.stderr
    assert {p["pattern"]: p["columns"] for p in json.loads(damaged.stdout)["patterns"] if p["different"]} == \
        {"user": {"email": 1}}
    ranges_done = [line for name in workers.procs for line in (workers.logdir / f"{name}.log").read_text().splitlines()
                   if '"verify_range_done"' in line and str(result["verification_id"]) in line]
    assert ranges_done  # the workers ran the ranges, not this process


TEST_USER = {"password_hash": "$2b$12$" + "a" * 53, "role": "user", "status": "active",
             "created_at": "2026-01-01T00:00:00", "updated_at": "2026-01-02 00:00:00", "metadata": {}}

# Key names no property of which may fail a batch: a NUL byte, bytes that are not UTF-8, control
# characters, half a megabyte.
HOSTILE_NAMES = [b"nul\x00x", b"bad\xff\xfeutf8", b"ctl\x1b[31m\r\n\tx", b"long" + b"x" * 512 * 1024]


def test_hostile_key_names_of_every_type_are_migrated_or_dead_lettered_each_on_its_own(settings, r, pg, workers):
    seed_demo(r, 200)
    member = json.dumps({"timestamp": "2026-11-01T00:00:00", "value": 1.0, "period": "day"})
    hostile: list[bytes] = []
    for name in HOSTILE_NAMES:
        keys = {
            b"threadr:user:user_" + name: lambda k: r.set(k, json.dumps(
                {**TEST_USER, "user_id": "user_" + name.decode("utf-8", "replace"), "email": "h@x.io"})),
            b"threadr:email:" + name: lambda k: r.set(k, json.dumps({"email": name.decode("utf-8", "replace")})),
            b"threadr:session:" + name: lambda k: r.hset(k, "a", "1"),  # a hash where a string is expected
            b"threadr:failed_login:" + name: lambda k: r.rpush(k, "1"),  # a list
            b"analytics:" + name + b":timeseries:views:day": lambda k: r.zadd(k, {member: 1}),
            b"threadr:subscription:user:" + name: lambda k: r.sadd(k, "1"),  # a set
            b"legacy:" + name: lambda k: r.set(k, "1"),  # unmapped
        }
        for key, write in keys.items():
            write(key)
            hostile.append(key)
    utf8 = [n for n in HOSTILE_NAMES if n != HOSTILE_NAMES[1]]
    r.sadd("threadr:subscriptions:active", *[b"gone_" + n for n in utf8])  # index members naming nothing: dangling
    r.sadd("threadr:emails:list", HOSTILE_NAMES[1])  # a member no app could write: the index is a dead letter
    report = run_distributed(settings, ranges=4)
    assert report["status"] == "completed", report["error"]
    assert report["balanced"] and report["batches"]["failed"] == 0 and all(report["validated"].values())
    assert report["totals"]["scanned"] == r.dbsize()
    with pg.cursor() as cur:
        cur.execute("SELECT redis_key FROM migration_dead_letters WHERE run_id = %s", (report["run_id"],))
        dead = {bytes(row[0]) for row in cur.fetchall()}
        cur.execute(" UNION ".join(f"SELECT source_key FROM {t}" for t in THREADR.table_names()))
        migrated = {row[0].encode() for row in cur.fetchall() if row[0]}
    mapped = [k for k in hostile if not k.startswith(b"legacy:")]
    assert all((k in dead) != (k in migrated) for k in mapped), [k[:40] for k in mapped if (k in dead) == (k in migrated)]
    assert b"threadr:user:user_" + HOSTILE_NAMES[1] in dead  # not UTF-8: named as such
    assert by_pattern(report)["unmapped"]["skipped"] >= len(HOSTILE_NAMES)
    assert by_pattern(report)["subscriptions_active"]["dangling"] == DANGLING["subscriptions_active"] + len(utf8)
    assert b"threadr:emails:list" in dead
