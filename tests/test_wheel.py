"""The project as users install it: a wheel built from the repository, installed with
`pip install` alone (no extras) into a new virtualenv, its dependencies resolved from the
package index this machine's pip is configured with (as scripts/setup.sh installs), and run from
outside the checkout. It carries all `migrator init-db` needs (the engine's SQL and the mappings'
schemas are package data), and its workers run a migration on a Redis broker."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psycopg2
import pytest
from celery import Celery

from celeryconfig import PRIORITY_QUEUES  # this session's queue names (its MIGRATOR_QUEUE_PREFIX)

from migrator.core import ledger
from migrator.core.schema import missing_journals, require_schema, schema_versions, written_tables
from migrator.apps.threadr import THREADR

from helpers import ROOT, by_pattern, throwaway_database


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtualenv holding the wheel and what it declares, nothing else; its directory."""
    tmp = tmp_path_factory.mktemp("wheel")
    # built from a copy: a build writes build/ and *.egg-info next to its sources
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build",
                                                                ".pytest_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp / "dist").glob("*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    assert {"migrator/core/sql/001_ledger.sql", "migrator/apps/threadr/schema.sql", "celeryconfig.py"} <= packaged
    assert not any(name.startswith(("tests/", "sql/")) for name in packaged)

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # this pip installs into it, resolving the wheel's dependencies as `pip install .` does
    # (--no-cache-dir: nothing written outside the test's directory)
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                           "--no-cache-dir", str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return venv


@pytest.fixture
def outside(tmp_path) -> tuple[Path, dict[str, str]]:
    """A working directory away from the checkout, and an environment that does not reach it."""
    return tmp_path, {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_a_wheel_built_from_the_repo_runs_init_db_in_a_fresh_virtualenv(installed, settings, outside):
    cwd, env = outside
    python = installed / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    where = subprocess.run([python, "-c", "import migrator; print(migrator.__file__)"], capture_output=True,
                           text=True, cwd=cwd, env=env)
    assert where.stdout.startswith(site), where.stdout + where.stderr
    with throwaway_database(settings.database_url) as url:
        done = subprocess.run([installed / "bin" / "migrator", "init-db", "--database-url", url], capture_output=True,
                              text=True, cwd=cwd, env=env, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.splitlines() == [f"{version}: applied" for version in schema_versions(THREADR)]
        conn = psycopg2.connect(url)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT t FROM unnest(%s::text[]) t WHERE to_regclass(t) IS NULL",
                            ([*THREADR.table_names(), *ledger.TABLES],))
                assert cur.fetchall() == []
                assert missing_journals(cur, written_tables(THREADR)) == {}
            require_schema(conn, THREADR)
        finally:
            conn.close()


def test_the_installed_workers_migrate_on_a_redis_broker(installed, settings, r, spare_redis_url, outside):
    cwd, env = outside
    bin_ = installed / "bin"
    node = f"wheel-{os.getpid()}@localhost"
    with throwaway_database(settings.database_url) as url:
        # the spare database is the broker and holds the chords' results: not the source's
        env = {**env, "REDIS_URL": settings.redis_url, "DATABASE_URL": url, "CELERY_BROKER_URL": spare_redis_url,
               "CELERY_RESULT_BACKEND": spare_redis_url, "MIGRATOR_LOG_JSON": "1"}

        def migrator(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([bin_ / "migrator", *args], capture_output=True, text=True, cwd=cwd, env=env,
                                  timeout=300)

        for step in (("init-db",), ("seed-demo", "--users", "60")):
            done = migrator(*step)
            assert done.returncode == 0, done.stdout + done.stderr
        keys = r.dbsize()

        log = cwd / "worker.log"
        with open(log, "wb") as out:
            worker = subprocess.Popen([bin_ / "celery", "-A", "workers", "worker", "-Q", ",".join(PRIORITY_QUEUES.values()),
                                       "-c", "1", "-n", node, "--without-gossip", "--without-mingle"],
                                      cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        probe = Celery(broker=spare_redis_url)
        try:
            deadline = time.monotonic() + 60
            while not probe.control.ping(destination=[node], timeout=0.5):
                assert worker.poll() is None and time.monotonic() < deadline, "the worker did not start:\n" + log.read_text()
            done = migrator("run", "--json")
            assert done.returncode == 0, done.stdout + done.stderr + log.read_text()
            assert "no worker answers" not in done.stderr  # it ran on the worker, which answered
        finally:
            # a warm shutdown, as `kill -TERM` gives; its exit code says it ended cleanly
            worker.send_signal(signal.SIGTERM)
            try:
                ended = worker.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                raise
            probe.close()
        assert ended == 0, log.read_text()

        report = json.loads(done.stdout.split("\n", 1)[1])  # after the line naming the run
        assert (report["status"], report["balanced"]) == ("completed", True)
        assert sum(p["scanned"] for p in report["patterns"]) == keys
        conn = psycopg2.connect(url)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*), count(DISTINCT worker) FROM migration_batches WHERE status = 'done'")
                assert cur.fetchone() == (report["batches"]["done"], 1)  # all of them, on the one worker
                cur.execute("SELECT count(*) FROM users")
                (users,) = cur.fetchone()
        finally:
            conn.close()
        assert users == by_pattern(report)["user"]["migrated"] >= 60
