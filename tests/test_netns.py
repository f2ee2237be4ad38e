"""A worker on another host, cut off mid-batch.

The worker runs in a network namespace of its own (a veth pair to this one, made and removed
here), reaching the run's Redis, PostgreSQL, broker and result backend only through this side's
address: it needs nothing but the three URLs. Its link is cut while it runs a batch; the broker
gives the batch to the other worker, which takes it over once its heartbeat has stopped (ending
the lost session, whose transaction then never commits), and the run ends with the reference
tables. When the link comes back, the cut-off worker finds its batch done.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import psycopg2
import pytest
import redis

from migrator.core.config import Settings
from migrator.apps.threadr.demo import seed_demo
from migrator.core.options import RunOptions
from migrator.core.schema import init_db
from migrator.apps.threadr import THREADR

from helpers import ROOT, Workers, content_fingerprint, migrate, start_on_workers, wait_for_end, worker_env
from servers import Forwarder, PostgresServer, network_namespace, redis_server, set_link

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2 for a network namespace")

BROKER_PORT, SHARED_REDIS_PORT = 5672, 6379


def test_a_worker_cut_off_mid_batch_loses_it_to_the_other_and_the_run_ends_with_the_reference_tables(
        settings, tmp_path):
    name = f"mig{os.getpid() % 100000}"
    with network_namespace(name, os.getpid() % 250 + 1) as (host, inside, link):
        server = PostgresServer(listen=("127.0.0.1", host), clients=(f"{inside}/32",))
        server.start()
        broker, results = Forwarder(host, BROKER_PORT), Forwarder(host, SHARED_REDIS_PORT)
        try:
            with redis_server(tmp_path, "--bind", "127.0.0.1", host, "--protected-mode", "no") as port:
                here = Settings(f"redis://127.0.0.1:{port}/0", server.url, settings.broker_url)
                there = Settings(f"redis://{host}:{port}/0", server.url_at(host),
                                 f"amqp://guest:guest@{host}:{broker.port}//")
                _cut_off_mid_batch(here, there, name, results, broker, link, tmp_path)
        finally:
            broker.close()
            results.close()
            server.stop()
            server.remove()


def _cut_off_mid_batch(here: Settings, there: Settings, namespace: str, results: Forwarder, broker: Forwarder,
                       link: str, logs) -> None:
    source = redis.Redis.from_url(here.redis_url)
    seed_demo(source, 1500)
    conn = psycopg2.connect(here.database_url)
    init_db(conn, THREADR)
    reference = migrate(here)
    assert reference["status"] == "completed"
    expected = content_fingerprint(conn)
    with conn, conn.cursor() as cur:
        cur.execute("TRUNCATE " + ", ".join(THREADR.table_names()) + ", migration_journal")

    backend_db = os.environ["CELERY_RESULT_BACKEND"].rsplit("/", 1)[1]
    remote = Workers({**worker_env(there), "CELERY_RESULT_BACKEND": f"redis://{results.server.getsockname()[0]}:"
                      f"{results.port}/{backend_db}"}, logs, prefix=["ip", "netns", "exec", namespace])
    local = Workers(worker_env(here), logs)
    remote.start("far")  # alone at first: the first batch is its
    try:
        client = redis.Redis.from_url(here.redis_url)
        # (throttled, so that its batches last seconds: the cut comes in the middle of one)
        run_id = start_on_workers(here, client, conn, THREADR, RunOptions(ranges=2, batch_size=50, priorities=("high",),
                                                                          max_keys_per_sec=2000))
        client.close()
        batch_id = _first_running(conn, run_id)
        time.sleep(1)  # inside the batch: sub-batches written, nothing committed
        set_link(link, up=False)  # the host is cut off: its packets go nowhere
        broker.cut()  # the broker sees its consumer go and requeues the unacknowledged batch
        results.cut()
        local.start("near")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with conn.cursor() as cur:
                cur.execute("SELECT status, attempts FROM migration_batches WHERE id = %s", (batch_id,))
                status, attempts = cur.fetchone()
            conn.rollback()
            if status == "done":
                break
            time.sleep(0.2)
        assert (status, attempts) == ("done", 2), "the cut-off worker's batch was not taken over"
        progress = wait_for_end(conn, run_id, timeout=240)
        assert progress["status"] == "completed", progress
        set_link(link, up=True)  # back: its session was ended, it finds the batch done
        broker.mend()
        results.mend()
        time.sleep(3)
        rest = migrate(here, priorities=("critical", "medium", "low"))
        assert rest["status"] == "completed"
        assert content_fingerprint(conn) == expected
        with conn.cursor() as cur:
            cur.execute("SELECT attempts, status FROM migration_batches WHERE id = %s", (batch_id,))
            assert cur.fetchone() == (2, "done")
        conn.rollback()
        assert '"event": "lost_session_ended"' in (logs / "near.log").read_text()
    finally:
        set_link(link, up=True)
        local.stop_all()
        remote.kill("far")
        conn.close()
        source.close()


def _first_running(conn, run_id: str) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with conn.cursor() as cur:
            cur.execute("SELECT id FROM migration_batches WHERE run_id = %s AND status = 'running' ORDER BY id LIMIT 1",
                        (run_id,))
            row = cur.fetchone()
        conn.rollback()
        if row:
            return row[0]
        time.sleep(0.02)
    raise AssertionError("no batch started on the namespaced worker")


def test_the_namespaced_worker_reaches_only_the_address_it_was_given(settings, tmp_path):
    """The namespace is a host of its own: the machine's services on loopback are out of reach."""
    name = f"mig{os.getpid() % 100000}b"
    with network_namespace(name, (os.getpid() + 1) % 250 + 1):
        probe = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c",
                                "import socket; socket.create_connection(('127.0.0.1', 5432), 2)"],
                               capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert probe.returncode != 0 and "Connection refused" in probe.stderr
