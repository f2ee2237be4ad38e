"""Faults in the middle of a run on two workers, against a Redis and a PostgreSQL of this module's
own (spare ports), so they can be restarted and cut without touching the machine's services.

Each test compares the final tables (content, per table) with an undisturbed run over the same
keyspace, and the balance; the recovery, where one is needed, is the runbook's command.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import psycopg2
from psycopg2 import sql
import pytest
import redis

from helpers import ROOT, Workers, content_fingerprint, migrate, start_on_workers, wait_for_end, worker_env
from migrator.core.config import Settings
from migrator.apps.threadr.demo import seed_demo
from migrator.core.options import RunOptions
from migrator.views.report import build_report
from migrator.core.schema import init_db
from migrator.apps.threadr import THREADR
from servers import PostgresServer, redis_server

USERS = 600


@pytest.fixture(scope="module")
def stack(tmp_path_factory, settings):
    """Own Redis (persisting to its dir across restarts) and PostgreSQL, and two workers on them."""
    directory = tmp_path_factory.mktemp("faults")
    server = PostgresServer()
    server.start()
    with redis_server(directory, "--dbfilename", "dump.rdb") as port:
        conn = psycopg2.connect(server.url)
        init_db(conn, THREADR)
        conn.close()
        own = Settings(f"redis://127.0.0.1:{port}/0", server.url, settings.broker_url)
        env = worker_env(own)
        pool = Workers(env, directory)
        pool.start("f1")
        pool.start("f2")
        try:
            yield own, server, pool, directory / f"redis-{port}.conf"
        finally:
            pool.stop_all()
            from workers.celery import delete_queues

            delete_queues()
    server.stop()
    server.remove()


@pytest.fixture(scope="module")
def expected(stack):
    """The keyspace of every test here, and the tables an undisturbed run makes of it."""
    own, *_ = stack
    source = redis.Redis.from_url(own.redis_url)
    source.flushdb()
    seed_demo(source, USERS)
    source.save()
    _empty(own)
    report = migrate(own)
    assert report["status"] == "completed" and report["balanced"]
    with psycopg2.connect(own.database_url) as conn:
        return content_fingerprint(conn)


def _empty(own: Settings) -> None:
    conn = psycopg2.connect(own.database_url)
    with conn, conn.cursor() as cur:
        cur.execute("TRUNCATE " + ", ".join(THREADR.table_names())
                    + ", migration_runs, migration_batches, migration_journal CASCADE")
    conn.close()


def _start(own: Settings, **options) -> tuple[str, object]:
    _empty(own)
    client, conn = own.redis(), own.postgres()
    try:
        return start_on_workers(own, client, conn, THREADR, RunOptions(ranges=4, batch_size=50, **options)), conn
    finally:
        client.close()


def _until(conn, query: str | sql.Composable, params: tuple, what: str) -> None:
    """Poll until `query` returns a row."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with conn.cursor() as cur:
            cur.execute(query, params)
            found = cur.fetchone()
        conn.rollback()
        if found:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {what}")


def _when_a_batch_runs(conn, run_id: str, priority: str = "high") -> None:
    _until(conn, "SELECT 1 FROM migration_batches WHERE run_id = %s AND priority = %s AND status = 'running'",
           (run_id, priority), f"{priority} batch started")
    time.sleep(0.2)  # inside the batch: sub-batches written, nothing committed


def _finished_like_undisturbed(own: Settings, conn, run_id: str, expected) -> dict:
    progress = wait_for_end(conn, run_id, timeout=240)
    report = build_report(conn, THREADR, run_id)
    assert progress["status"] == "completed", (progress, report["error"])
    assert report["balanced"] and all(report["validated"].values())
    with psycopg2.connect(own.database_url) as check:
        assert content_fingerprint(check) == expected
    return report


def _attempts(conn, run_id: str) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT max(attempts) FROM migration_batches WHERE run_id = %s", (run_id,))
        n = cur.fetchone()[0]
    conn.rollback()
    return n


def test_a_worker_stopped_with_sigterm_finishes_its_batch_and_the_run_completes(stack, expected):
    own, _, pool, _ = stack
    run_id, conn = _start(own)
    try:
        _when_a_batch_runs(conn, run_id)
        pool.kill("f1", signal.SIGTERM)  # warm shutdown: the batch in hand is finished, then the worker exits
        _finished_like_undisturbed(own, conn, run_id, expected)
        assert _attempts(conn, run_id) == 1  # nothing had to run twice
    finally:
        conn.close()
        pool.start("f1")


def test_a_redis_restart_mid_run_restarts_the_affected_ranges(stack, expected):
    own, _, pool, conf = stack
    run_id, conn = _start(own)
    try:
        _when_a_batch_runs(conn, run_id)
        source = redis.Redis.from_url(own.redis_url)
        source.shutdown(save=True)  # the data survives, the cursors (hash seed) do not
        subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL)
        report = _finished_like_undisturbed(own, conn, run_id, expected)
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM migration_validations WHERE run_id = %s AND NOT ok"
                        " AND checks::text LIKE '%%source_restarted%%'", (run_id,))
            restarted = cur.fetchone()[0]
        conn.rollback()
        # the run says so: the priority that straddled the restart failed its validation as
        # source_restarted and was scanned again from the start of every range
        assert restarted >= 1, report
    finally:
        conn.close()


@pytest.mark.parametrize("down_s", [1, 20], ids=["restart", "down 20 s"])
def test_a_postgres_restart_mid_run_is_retried_by_the_workers(stack, expected, down_s):
    """Down for a restart, or for 20 s: the batches' retries (a minute or so) ride it out, and
    the chord callbacks' too."""
    own, server, _, _ = stack
    run_id, conn = _start(own)
    # a high batch held inside its transaction (its write waits on `users`), however fast
    # batches run: the restart is sure to cut one
    hold = psycopg2.connect(own.database_url)
    with hold.cursor() as cur:
        cur.execute("LOCK TABLE users IN EXCLUSIVE MODE")
    _when_waiting_on(conn, "users")
    conn.close()
    server.stop()  # ends the holder's session too
    hold.close()
    time.sleep(down_s)
    server.start()
    conn = psycopg2.connect(own.database_url)
    try:
        _finished_like_undisturbed(own, conn, run_id, expected)
        assert _attempts(conn, run_id) >= 2
    finally:
        conn.close()


STATEMENT = {"batch": "SELECT * FROM migrator_write_sealed(", "finalize": "UPDATE "}


def _waiting_on(table: str) -> str:
    """The migrator's sessions waiting, inside a transaction, for a lock on `table` itself (a
    row lock another batch holds, two keys upserting one subscription, is not one of them)."""
    return (sql.SQL("SELECT a.pid, a.query FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid"
                    " AND NOT l.granted AND l.relation = {}::regclass"
                    " WHERE a.application_name = 'migrator' AND a.xact_start IS NOT NULL")
            .format(sql.Literal(table)))


def _when_waiting_on(conn, table: str) -> None:
    _until(conn, _waiting_on(table), (), f"batch came to wait on {table}")


@pytest.mark.parametrize("table, caught", [("usage_events", "batch"), ("analytics_timeseries", "finalize")])
def test_connections_cut_mid_transaction_are_retried(stack, expected, table, caught):
    """A table held locked stops whoever writes it inside an open transaction, however fast the
    rest of the run goes: `usage_events` a low batch, `analytics_timeseries` the first priority's
    finalize (it links user ids there); that connection is cut, and the work is retried."""
    own, _, _, _ = stack
    run_id, conn = _start(own)
    hold, killer = psycopg2.connect(own.database_url), psycopg2.connect(own.database_url)
    killer.autocommit = True
    try:
        with hold.cursor() as cur:
            cur.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(sql.Identifier(table)))
        cut, deadline = [], time.monotonic() + 120
        with killer.cursor() as cur:
            while not cut and time.monotonic() < deadline:
                cur.execute(sql.SQL("WITH waiting AS MATERIALIZED ({}) SELECT query FROM waiting"
                                    " WHERE pg_terminate_backend(pid)").format(_waiting_on(table)))
                cut = [q for q, in cur.fetchall()]
                time.sleep(0.05)
        hold.commit()
        assert cut and all(q.startswith(STATEMENT[caught]) for q in cut), cut
        conn.close()
        conn = psycopg2.connect(own.database_url)
        _finished_like_undisturbed(own, conn, run_id, expected)
        if caught == "batch":
            assert _attempts(conn, run_id) >= 2
    finally:
        hold.close()
        killer.close()
        conn.close()


def _cli(own: Settings, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "migrator.cli.main", *args, "--redis-url", own.redis_url,
                             "--database-url", own.database_url, "--broker-url", own.broker_url],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _when_validated(conn, priority: str) -> str:
    """The run id, once `priority` of the latest run has validated."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with conn.cursor() as cur:
            cur.execute("SELECT v.run_id FROM migration_validations v JOIN migration_runs r ON r.id = v.run_id"
                        " WHERE v.priority = %s AND v.ok ORDER BY r.started_at DESC LIMIT 1", (priority,))
            row = cur.fetchone()
        conn.rollback()
        if row:
            return str(row[0])
        time.sleep(0.02)
    raise AssertionError(f"{priority} never validated")


@pytest.mark.parametrize("local", [False, True], ids=["on workers", "run --local"])
def test_the_coordinator_killed_between_priorities_and_resume_carries_on(stack, expected, tmp_path, local):
    own, *_ = stack
    _empty(own)
    coordinator = _cli(own, "run", *(["--local"] if local else []), "--ranges", "4", "--batch-size", "50",
                       "--output-dir", str(tmp_path))
    conn = psycopg2.connect(own.database_url)
    try:
        run_id = _when_validated(conn, "critical")
        coordinator.kill()  # between priorities: critical is in, high has not finished
        coordinator.communicate(timeout=30)
        resumed = _cli(own, "resume", run_id, *(["--local", "--output-dir", str(tmp_path)] if local else []))
        out, err = resumed.communicate(timeout=240)
        assert resumed.returncode == 0, err
        # on workers the chords had carried the run on without the coordinator; --local goes on here
        assert ("resuming run" in out) if local else ("resumed run" in out or "nothing left to do" in out), out
        _finished_like_undisturbed(own, conn, run_id, expected)
    finally:
        conn.close()


def test_a_postgres_restart_while_run_watches_is_ridden_out_and_the_run_s_outcome_reported(stack, expected, tmp_path):
    """`migrator run` sends the run to the workers and watches the ledger; PostgreSQL restarts under
    it: the watcher connects again and reports how the run really ended."""
    own, server, _, _ = stack
    _empty(own)
    # a batch held inside its transaction (its write waits on `users`) keeps the run going while
    # the server restarts, however fast batches run
    hold = psycopg2.connect(own.database_url)
    with hold.cursor() as cur:
        cur.execute("LOCK TABLE users IN EXCLUSIVE MODE")
    coordinator = _cli(own, "run", "--ranges", "4", "--batch-size", "50", "--output-dir", str(tmp_path))
    run_id = coordinator.stdout.readline().split()[1]  # "run <id>": planned and sent, now watching
    conn = psycopg2.connect(own.database_url)
    _when_waiting_on(conn, "users")
    conn.close()
    server.stop()  # ends every session: the holder's, the batch's and the watcher's
    hold.close()
    time.sleep(1)
    server.start()
    out, err = coordinator.communicate(timeout=300)
    assert coordinator.returncode == 0, err
    assert "migrator: lost the ledger (" in err and f"run {run_id}  completed" in err  # the watch's last view
    assert f"run {run_id}  status completed" in out  # the report
    conn = psycopg2.connect(own.database_url)
    try:
        _finished_like_undisturbed(own, conn, run_id, expected)
    finally:
        conn.close()
