"""Shared test steps: run a migration through the library, fingerprint tables."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import psycopg2
from psycopg2 import sql

from migrator.core import ledger
from migrator.core.runstate import TERMINAL
from migrator.core.config import Settings
from migrator.execution.executor import load
from migrator.core.mapping import Mapping, Pattern, Priority, Row, SourceRecord
from migrator.core.merge import TableRule
from migrator.core.options import RunOptions
from migrator.views.report import build_report
from migrator.execution.runner import execute_local, plan_run, verify_local
from migrator.core.schema import database_url_for, ensure_database
from migrator.core.validate import validate_run
from migrator.views.status import run_progress
from migrator.apps.threadr import THREADR
from migrator.core.values import stable_id


def migrate(settings: Settings, jobs: int = 1, mapping: Mapping = THREADR, **options: Any) -> dict[str, Any]:
    """A whole local run of `mapping`, `jobs` batches at once; returns its report."""
    opts = RunOptions(**options)
    client = settings.redis()
    try:
        conn = settings.postgres()
        try:
            run_id = plan_run(client, conn, mapping, opts, settings.redis_url)
        finally:
            conn.close()
        execute_local(client, settings.postgres, mapping, run_id, opts, jobs=jobs)
        conn = settings.postgres()  # a new one: a test may have restarted the server
        try:
            return build_report(conn, mapping, run_id)
        finally:
            conn.close()
    finally:
        client.close()


def start_on_workers(settings: Settings, client: Any, conn: Any, mapping: Mapping, opts: RunOptions) -> str:
    """`migrator run` without its watching: the run planned, and its first priority sent to the
    workers (on the broker this session's Celery app is configured with)."""
    run_id = plan_run(client, conn, mapping, opts, settings.redis_url)
    load("celery", settings).carry_on(mapping, run_id, opts, opts.priority_order()[0])
    return run_id


def validate(settings: Settings, run_id: str, priorities: list | None = None) -> dict[str, Any]:
    """`migrator validate RUN --local`, through the library."""
    client, conn = settings.redis(), settings.postgres()
    try:
        return validate_run(conn, THREADR, run_id, priorities,
                            lambda chosen: verify_local(client, settings.postgres, THREADR, run_id, chosen))
    finally:
        conn.close()
        client.close()


def verify(settings: Settings, run_id: str, priorities: list | None = None, mapping: Mapping = THREADR) -> dict[str, Any]:
    """`migrator verify RUN --local`, through the library."""
    client, conn = settings.redis(), settings.postgres()
    try:
        with conn, conn.cursor() as cur:
            chosen = priorities or RunOptions.from_json(ledger.require_run(cur, run_id)["options"]).priority_order()
        return verify_local(client, settings.postgres, mapping, run_id, chosen)
    finally:
        conn.close()
        client.close()


def grants_after_critical_batches(monkeypatch: Any, r: Any, value: Any = lambda i: {}) -> None:
    """30 premium grants appear once critical's batches are in, before its verification (keys its
    batches never saw); `value(i)`: more fields of grant i."""
    import orjson

    import migrator.execution.finalize

    real_link = migrator.execution.finalize.link_rows
    calls = []

    def link_then_grants_appear(conn: Any, mapping: Mapping, run_id: str) -> Any:
        calls.append(run_id)
        if len(calls) == 1:
            for i in range(30):
                r.set(f"threadr:premium:ip:203.0.113.{i}", orjson.dumps({"expires_at": "2030-01-01T00:00:00", **value(i)}))
        return real_link(conn, mapping, run_id)

    monkeypatch.setattr(migrator.execution.finalize, "link_rows", link_then_grants_appear)


def migrator(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The `migrator` command as people run it, in a process of its own."""
    return subprocess.run([sys.executable, "-m", "migrator.cli.main", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MIGRATOR_LOG_JSON": "1", **(env or {})}, cwd=cwd)


def fingerprint(conn: Any, tables: list[str] | None = None) -> dict[str, tuple[int, str]]:
    """Per table: row count and an md5 over every column of every row, in id order."""
    out = {}
    with conn.cursor() as cur:
        for table in tables or THREADR.table_names():
            cur.execute(sql.SQL("SELECT count(*), md5(COALESCE(string_agg(t::text, '|' ORDER BY t.id), '')) FROM {} t")
                        .format(sql.Identifier(table)))
            out[table] = cur.fetchone()
    conn.rollback()
    return out


# Columns that say which run wrote a row and when its key expires: they differ between two
# runs over the same data, the content does not.
PROVENANCE = ("migration_run", "source_key", "metadata", "expires_at", "synced_at")


def content_fingerprint(conn: Any) -> dict[str, tuple[int, str]]:
    """Like `fingerprint`, over every column but the provenance ones."""
    out = {}
    with conn.cursor() as cur:
        for table in THREADR.table_names():
            cur.execute(sql.SQL("SELECT count(*), md5(COALESCE(string_agg((to_jsonb(t) - %s::text[])::text, '|'"
                                " ORDER BY t.id), '')) FROM {} t").format(sql.Identifier(table)), (list(PROVENANCE),))
            out[table] = cur.fetchone()
    conn.rollback()
    return out


def by_pattern(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["pattern"]: p for p in report["patterns"]}


def cli(settings: Settings, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`migrator ARGS` as an operator runs it, against this session's services."""
    return subprocess.run([sys.executable, "-m", "migrator.cli.main", *args, "--redis-url", settings.redis_url,
                           "--database-url", settings.database_url, "--broker-url", settings.broker_url],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment of a worker process of this test session."""
    return {**os.environ, "REDIS_URL": settings.redis_url, "DATABASE_URL": settings.database_url, "MIGRATOR_LOG_JSON": "1",
            "CELERY_BROKER_URL": settings.broker_url}


ROOT = Path(__file__).resolve().parent.parent


class Workers:
    """Worker processes of this test session; each in its own process group so it can be killed whole."""

    def __init__(self, env: dict[str, str], logdir: Path, prefix: Sequence[str] = ()) -> None:
        """`prefix`: what the worker command runs under (e.g. `ip netns exec NS`, another host)."""
        self.env, self.logdir, self.prefix, self.procs = env, logdir, list(prefix), {}
        from celeryconfig import PRIORITY_QUEUES

        self.queues = ",".join(PRIORITY_QUEUES.values())

    def start(self, name: str) -> None:
        log = open(self.logdir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", self.queues, "-c", "1", "-n",
             f"{name}-{os.getpid()}@%h", "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        from workers.celery import app

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(f"{name}-{os.getpid()}@" in n for reply in (app.control.ping(timeout=0.5) or []) for n in reply):
                return
        raise RuntimeError(f"worker {name} did not start; see {self.logdir / name}.log")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """SIGKILL ends the whole process group at once; SIGTERM goes to the main process only,
        as `kill -TERM <pid>` or systemd's KillMode=mixed does: a warm shutdown, in which the
        pool child finishes the batch in hand (SIGTERM to the child itself would end it mid-batch)."""
        proc = self.procs.pop(name)
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:  # a warm shutdown that hangs: end it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)


def wait_for_end(conn, run_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = run_progress(conn, run_id)
        if progress["status"] in TERMINAL:
            return progress
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} did not end in {timeout} s: {run_progress(conn, run_id)}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample a metrics endpoint serves, by name and labels."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class Flower:
    """A real Flower process on this session's broker; its HTTP API answers as operators see it."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.port = free_port()
        self.log = open(logdir / "flower.log", "ab")
        # the HTTP API answers without --basic-auth only when told to (for this local test)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers", "flower", f"--port={self.port}", "--address=127.0.0.1"],
            cwd=ROOT, env={**env, "FLOWER_UNAUTHENTICATED_API": "true"}, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.get("/api/workers?refresh=1")
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"Flower did not start; see {logdir / 'flower.log'}")

    def get(self, path: str) -> Any:
        import json
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as reply:
            return json.loads(reply.read())

    def tasks(self, name: str) -> dict[str, dict[str, Any]]:
        """Every task of that name Flower has seen, by id, with its state, kwargs, result and exception."""
        return self.get(f"/api/tasks?taskname={name}")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()


@contextmanager
def throwaway_database(url: str) -> Iterator[str]:
    """A new database on the server of `url`, dropped afterwards; its URL."""
    admin = psycopg2.connect(database_url_for(url, "postgres"))
    name = f"migrator_throwaway_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    ensure_database(admin, name)
    try:
        yield database_url_for(url, name)
    finally:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


def gadget(rec: SourceRecord) -> list[Row]:
    return [Row("gadgets", {"id": stable_id("gadget", rec.fields["id"]), "name": rec.value})]


# A mapping of another app, whose DDL declares none of the engine's columns; a serial column takes a sequence.
GADGETS_DDL = "CREATE TABLE IF NOT EXISTS gadgets (id uuid PRIMARY KEY, serial_no bigserial, name text NOT NULL)"


def gadgets(*schema: str, tables: tuple[str, ...] = ("gadgets",)) -> Mapping:
    """One pattern (gadget:<id>, a text value) into the table gadgets, by default with GADGETS_DDL."""
    return Mapping("gadgets", (Pattern("gadget", "gadget:*", r"gadget:(?P<id>\w+)", "string", Priority.HIGH, "a gadget",
                                       value_format="text", table="gadgets", transform=gadget),),
                   rules=tuple(TableRule(t) for t in tables), schema=schema or (GADGETS_DDL,))
