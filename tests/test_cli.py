"""The `migrator` command as people run it: JSON report, exit codes, clear errors without tracebacks."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import redis

from migrator.demo import seed_demo


def migrator(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "migrator.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MIGRATOR_LOG_JSON": "1", **(env or {})})


def urls(settings) -> list[str]:
    return ["--redis-url", settings.redis_url, "--database-url", settings.database_url]


def test_run_prints_run_id_and_balanced_json_report_then_report_agrees(settings, r, pg):
    seed_demo(r, 50, malformed=5)
    done = migrator("run", "--local", "--json", *urls(settings))
    assert done.returncode == 0, done.stderr
    first_line, body = done.stdout.split("\n", 1)
    report = json.loads(body)
    assert first_line == f"run {report['run_id']}"
    assert report["status"] == "completed" and report["balanced"]
    for p in report["patterns"]:
        assert {"pattern", "scanned", "migrated", "skipped", "dead", "expired"} <= set(p)
    again = migrator("report", report["run_id"], "--json", "--database-url", settings.database_url)
    assert again.returncode == 0 and json.loads(again.stdout)["patterns"] == report["patterns"]
    # logs are JSON lines bound with the run, and carry no unmasked email
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert any(line.get("event") == "dead_letter" and line.get("run") == report["run_id"] for line in lines)
    assert "@example" not in done.stderr and "$2b$" not in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--redis-url", "redis://127.0.0.1:1/0"], "cannot reach Redis"),
    (["--redis-url", "http://nope"], "not a Redis URL"),
    (["--database-url", "postgresql://postgres:secret@127.0.0.1:1/x"], "cannot connect to PostgreSQL"),
    (["--database-url", "postgresql://postgres@127.0.0.1:5432/postgres"], "run `migrator init-db` first"),
])
def test_bad_settings_fail_clearly_without_traceback_or_secret(settings, r, args, message):
    done = migrator("run", "--local", "--redis-url", settings.redis_url, *args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr and "secret" not in done.stderr


@pytest.fixture
def redis_with_password(tmp_path):
    """A Redis of our own on a spare port that requires a password (the shared one has none)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass", "right-one",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, password="right-one")
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(10)


def test_redis_wrong_password_is_reported_as_such(settings, redis_with_password):
    done = migrator("run", "--local", "--redis-url", f"redis://:wrong-one@127.0.0.1:{redis_with_password}/0",
                    "--database-url", settings.database_url)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "wrong-one" not in done.stderr
    assert "refused the credentials" in done.stderr


def test_help_teaches_the_workflow():
    done = migrator("--help")
    assert done.returncode == 0 and "init-db" in done.stdout and "rollback" in done.stdout
    run_help = migrator("run", "--help").stdout
    for flag in ("--dry-run", "--priority", "--batch-size", "--table", "--pattern", "--continue-on-error", "--no-rollback"):
        assert flag in run_help
