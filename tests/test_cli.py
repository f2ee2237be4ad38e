"""The `migrator` command as people run it: JSON report, exit codes, clear errors without tracebacks."""
from __future__ import annotations

import json
import os

import pytest

from migrator.apps.threadr.demo import seed_demo
from helpers import migrator
from servers import redis_server


def urls(settings) -> list[str]:
    return ["--redis-url", settings.redis_url, "--database-url", settings.database_url]


def test_run_prints_run_id_and_balanced_json_report_then_report_agrees(settings, r, pg, tmp_path):
    seed_demo(r, 50, malformed=5)
    out_dir = tmp_path / "runs" / "today"  # not there yet: created, as asked
    done = migrator("run", "--local", "--json", "--output-dir", str(out_dir), *urls(settings))
    assert done.returncode == 0, done.stderr
    first_line, body = done.stdout.split("\n", 1)
    report = json.loads(body)
    assert first_line == f"run {report['run_id']}"
    assert report["status"] == "completed" and report["balanced"]
    for p in report["patterns"]:
        assert {"pattern", "scanned", "migrated", "skipped", "dead", "expired"} <= set(p)
    again = migrator("report", report["run_id"], "--json", "--database-url", settings.database_url)
    assert again.returncode == 0 and json.loads(again.stdout)["patterns"] == report["patterns"]
    assert {"seconds", "keys_per_s", "rows"} <= set(report["patterns"][0])
    # logs are JSON lines bound with the run, and carry no unmasked email
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert any(line.get("event") == "dead_letter" and line.get("run") == report["run_id"] for line in lines)
    assert "@example" not in done.stderr and "$2b$" not in done.stderr
    # the same lines in migration_<run>.log, and the report as migration_report_<run>.json
    logged = (out_dir / f"migration_{report['run_id']}.log").read_text()
    assert '"event": "batch_done"' in logged and "@example" not in logged and "$2b$" not in logged
    written = json.loads((out_dir / f"migration_report_{report['run_id']}.json").read_text())
    assert written["patterns"] == report["patterns"]
    figures = report["monitoring"]["figures"]
    assert figures["users_total"] == by_name(report)["user"]["migrated"] and figures["orphaned_subscriptions"] == 0
    assert {t["table"] for t in report["monitoring"]["tables"]} >= {"users", "subscriptions"}


def by_name(report: dict) -> dict:
    return {p["pattern"]: p for p in report["patterns"]}


def test_validate_passes_a_clean_run_and_fails_on_orphans_and_drift(settings, r, pg, tmp_path):
    seed_demo(r, 60)
    assert migrator("run", "--local", "--output-dir", str(tmp_path), *urls(settings)).returncode == 0
    ok = migrator("run", "--validate-only", "--local", "--json", *urls(settings))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    result = json.loads(ok.stdout)
    assert result["ok"] and set(result["priorities"]) == {"critical", "high", "medium", "low"}
    # an orphaned subscription and a user deleted behind the migrator's back
    with pg.cursor() as cur:
        cur.execute("UPDATE subscriptions SET user_id = gen_random_uuid() WHERE id = (SELECT id FROM subscriptions LIMIT 1)")
        cur.execute("DELETE FROM users WHERE id = (SELECT id FROM users ORDER BY legacy_id LIMIT 1)")
    pg.commit()
    bad = migrator("validate", result["run_id"], "--local", *urls(settings))
    assert bad.returncode == 1 and "FAIL" in bad.stdout
    # the orphan alone is within the budget of dangling references; the verification names both
    assert "ok   orphaned_subscriptions: 1 orphaned subscriptions" in bad.stdout
    assert "critical FAIL verification: PostgreSQL does not hold what Redis holds: " in bad.stdout
    assert "1 different (columns user_id)" in bad.stdout, bad.stdout
    assert "high     FAIL verification: PostgreSQL does not hold what Redis holds: user: 1 missing" in bad.stdout


def test_validate_without_any_run_says_what_to_do(settings, r, pg):
    done = migrator("validate", *urls(settings))
    assert done.returncode == 2 and "migrate first" in done.stderr and "Traceback" not in done.stderr

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
    with redis_server(tmp_path, password="right-one") as port:
        yield port


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


def test_operator_commands_from_the_command_line(settings, r, pg, tmp_path):
    """check, audit, mapping and backup as an operator runs them, in the guide's order."""
    users = seed_demo(r, 30)["user"]
    check = migrator("check", "--no-workers", *urls(settings), "--broker-url", settings.broker_url)
    assert check.returncode == 0 and "OK    schema" in check.stdout, check.stdout + check.stderr
    audit = migrator("audit", "--output-dir", str(tmp_path), "--redis-url", settings.redis_url)
    assert audit.returncode == 0 and "audit written to" in audit.stdout, audit.stderr
    assert "@example" not in audit.stdout and "@example" not in (next(tmp_path.glob("redis_audit_report_*.json"))).read_text()
    mapping = migrator("mapping", "--audit-dir", str(tmp_path), "--output-dir", str(tmp_path), "--json")
    doc = json.loads(mapping.stdout.rsplit("mapping document written", 1)[0])
    assert mapping.returncode == 0 and next(p for p in doc["patterns"] if p["name"] == "user")["volumes"]["keys"] == users
    with redis_server(tmp_path) as port:  # the shared server is too big to snapshot in a test
        backup = migrator("backup", "--dir", str(tmp_path), "--redis-url", f"redis://127.0.0.1:{port}/0",
                          "--database-url", settings.database_url)
    assert backup.returncode == 0, backup.stderr
    assert list(tmp_path.glob("threadr_pre_migration_*.sql")) and list(tmp_path.glob("redis_backup_*.rdb"))
    assert "pg_restore" in backup.stdout or "psql" in backup.stdout


@pytest.fixture
def empty_database(settings):
    """A database without the schema."""
    from psycopg2 import connect
    from psycopg2 import sql as q

    from migrator.core.schema import database_url_for, ensure_database

    admin_url = database_url_for(settings.database_url, "postgres")
    name = f"migrator_empty_{os.getpid()}"
    admin = connect(admin_url)
    ensure_database(admin, name)
    yield database_url_for(settings.database_url, name)
    with admin.cursor() as cur:
        cur.execute(q.SQL("DROP DATABASE IF EXISTS {}").format(q.Identifier(name)))
    admin.close()


RUN_ID = "00000000-0000-4000-8000-000000000000"


@pytest.mark.parametrize("command", [
    ["run", "--local"], ["run", "--validate-only"], ["validate", RUN_ID], ["report", RUN_ID], ["status", RUN_ID],
    ["batches", RUN_ID], ["rollback", RUN_ID], ["requeue", RUN_ID, "--failed"], ["resume", RUN_ID],
])
def test_every_command_on_a_database_without_the_schema_says_run_init_db(settings, r, empty_database, command):
    done = migrator(*command, "--redis-url", settings.redis_url, "--database-url", empty_database)
    assert done.returncode == 2 and "migrator init-db" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [["run", "--local"], ["audit"], ["validate"], ["backup", "--dir", "/tmp"],
                                     ["seed-demo", "--users", "1"]])
def test_every_command_with_redis_down_fails_clearly(settings, command):
    done = migrator(*command, "--redis-url", "redis://127.0.0.1:1/0", "--database-url", settings.database_url)
    assert done.returncode == 2 and "cannot reach Redis" in done.stderr and "Traceback" not in done.stderr


# ---- operator mistakes: refused before anything is planned or touched, the valid choices named ----

def _runs(pg) -> list[tuple]:
    with pg.cursor() as cur:
        cur.execute("SELECT id, status, finished_at FROM migration_runs ORDER BY created_at")
        rows = cur.fetchall()
        cur.execute("SELECT count(*) FROM migration_batches")
        rows.append(cur.fetchone())
    pg.rollback()
    return rows


@pytest.fixture
def a_run(settings, r, pg) -> str:
    """A run in the ledger (planned, not executed): the one the messages should name."""
    from migrator.core.options import RunOptions
    from migrator.execution.runner import plan_run
    from migrator.apps.threadr import THREADR

    seed_demo(r, 3)
    client = settings.redis()
    try:
        return plan_run(client, pg, THREADR, RunOptions(priorities=("critical",)), settings.redis_url)
    finally:
        client.close()


UNKNOWN = "11111111-2222-4333-8444-555555555555"


@pytest.mark.parametrize("command", [
    ["status"], ["status", "--watch"], ["batches"], ["report"], ["requeue", "--failed"], ["requeue", "--batch", "1"],
    ["resume"], ["resume", "--local"], ["rollback"], ["cancel"], ["cancel", "--rollback"], ["validate", "--local"],
    ["verify", "--local"], ["verify"],
], ids=lambda c: " ".join(c))
def test_every_command_taking_a_run_id_refuses_an_unknown_or_malformed_one_naming_the_runs(
        settings, pg, a_run, tmp_path, command):
    before = _runs(pg)
    for run_id, said in ((UNKNOWN, f"no run {UNKNOWN} in the ledger"),
                         ("not-a-uuid", "'not-a-uuid' is not a run id (a UUID, as `migrator run` prints it)")):
        done = migrator(command[0], run_id, *command[1:], *urls(settings), "--broker-url", settings.broker_url,
                        cwd=tmp_path)
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.startswith(f"migrator: {said}") and f"latest runs: {a_run} (running, " in done.stderr
        assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr and not done.stdout
    assert _runs(pg) == before  # nothing planned, rolled back or requeued


def test_rollback_of_an_unknown_run_says_so_and_leaves_the_ledger_alone(settings, pg):
    done = migrator("rollback", UNKNOWN, *urls(settings))
    assert done.returncode == 2 and "rolled back" not in done.stdout
    assert done.stderr == (f"migrator: no run {UNKNOWN} in the ledger; the ledger holds no run yet (`migrator run` "
                           "starts one); is DATABASE_URL the run's database?\n")
    assert _runs(pg) == [(0,)]


@pytest.mark.parametrize("args, said", [
    (["--pattern", "typo*"], "--pattern 'typo*' names no pattern of the threadr mapping; its patterns: premium_ip, "
                             "premium_email, subscription, "),
    (["--pattern", "user", "--pattern", "nope"], "--pattern 'nope' names no pattern"),
    (["--table", "userz"], "--table 'userz' is no table of the threadr mapping; its tables: analytics_timeseries, "),
    (["--priority", "critical", "--pattern", "user"], "nothing to migrate: the patterns chosen (user) are of priority "
                                                      "high, not of --priority critical"),
], ids=["glob matching nothing", "one unknown of two", "unknown table", "pattern outside the priority"])
@pytest.mark.parametrize("where", [["--local"], []], ids=["local", "on workers"])
def test_a_run_of_unknown_patterns_or_tables_is_refused_before_it_is_planned(settings, r, pg, tmp_path, args, said,
                                                                              where):
    seed_demo(r, 3)
    keys = r.dbsize()
    done = migrator("run", *where, *args, *urls(settings), "--broker-url", settings.broker_url, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith(f"migrator: {said}"), done.stderr
    assert len(done.stderr.splitlines()) == 1 and not done.stdout
    assert _runs(pg) == [(0,)] and r.dbsize() == keys and not list(tmp_path.iterdir())


def test_unknown_priorities_are_refused_naming_the_choices(settings, pg, a_run):
    bad = migrator("run", "--local", "--priority", "urgent", *urls(settings))
    assert bad.returncode == 2 and "invalid choice: 'urgent' (choose from 'critical', 'high', 'medium', 'low')" in bad.stderr
    for command in ("verify", "validate"):  # a priority the run did not migrate
        done = migrator(command, a_run, "--priority", "high", "--local", *urls(settings))
        assert done.returncode == 2 and not done.stdout
        assert done.stderr == (f"migrator: run {a_run} did not migrate priority high; choose --priority from: "
                               "critical\n")
    assert len(_runs(pg)) == 2  # the run, and its batches: no verification was planned
    with pg.cursor() as cur:
        cur.execute("SELECT count(*) FROM migration_verifications")
        assert cur.fetchone()[0] == 0
    pg.rollback()


# ---- connection failures: one line, the service, its host and port, the reason, the fix ----

@pytest.fixture
def closed_port() -> int:
    from servers import spare_port

    return spare_port()


@pytest.mark.parametrize("command, service", [
    *((command, service) for command in (["run", "--local"], ["run"], ["validate"]) for service in ("redis", "postgres")),
    *((command, service) for command in (["run"], ["requeue", UNKNOWN, "--failed"], ["resume", UNKNOWN])
      for service in ("broker down", "broker password")),
], ids=lambda x: x if isinstance(x, str) else " ".join(x).replace(UNKNOWN, "RUN"))
def test_a_connection_failure_is_one_line_naming_the_service_its_host_and_port_and_the_fix(
        settings, r, pg, tmp_path, closed_port, service, command):
    given = {"redis": settings.redis_url, "database": settings.database_url, "broker": settings.broker_url}
    if service == "redis":
        given["redis"] = f"redis://:s3cret@127.0.0.1:{closed_port}/0"
        said = f"migrator: cannot reach Redis at 127.0.0.1:{closed_port} (ConnectionError: Error 111 connecting to "
        fix = "; is it running, and is REDIS_URL right?"
    elif service == "postgres":
        given["database"] = f"postgresql://postgres:s3cret@127.0.0.1:{closed_port}/x"
        said = (f"migrator: cannot connect to PostgreSQL at 127.0.0.1:{closed_port} with postgresql://postgres:***@"
                f"127.0.0.1:{closed_port}/x (OperationalError: Connection refused)")
        fix = "; check DATABASE_URL and that the server is up"
    elif service == "broker down":
        given["broker"] = f"amqp://guest:s3cret@127.0.0.1:{closed_port}//"
        said = (f"migrator: cannot reach the Celery broker at 127.0.0.1:{closed_port} (OperationalError: [Errno 111] "
                "Connection refused)")
        fix = "; is the broker running, and is CELERY_BROKER_URL right (scheme, host, port)?"
    else:
        given["broker"] = settings.broker_url.replace("guest:guest@", "guest:s3cret@")
        said = "migrator: the Celery broker at 127.0.0.1:5672 refused the login (AccessRefused: (0, 0): (403) ACCESS_REFUSED"
        fix = "; check the user, password and vhost in CELERY_BROKER_URL"
    done = migrator(*command, "--redis-url", given["redis"], "--database-url", given["database"], "--broker-url",
                    given["broker"], cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith(said), done.stderr
    assert done.stderr.endswith(fix + "\n") and len(done.stderr.splitlines()) == 1
    assert "s3cret" not in done.stderr and "x.x" not in done.stderr and not done.stdout
    assert _runs(pg) == [(0,)]


def test_verify_with_the_broker_down_says_why_and_verifies_here(settings, r, pg, tmp_path, closed_port):
    seed_demo(r, 5)
    assert migrator("run", "--local", *urls(settings), cwd=tmp_path).returncode == 0
    done = migrator("verify", *urls(settings), "--broker-url", f"amqp://guest:s3cret@127.0.0.1:{closed_port}//")
    assert done.returncode == 0 and "CLEAN" in done.stdout, done.stderr
    assert (f"migrator: verifying here (--local): cannot reach the Celery broker at 127.0.0.1:{closed_port} "
            "(OperationalError: [Errno 111] Connection refused)") in done.stderr and "s3cret" not in done.stderr


# ---- hints name this installation's queues ----

def test_the_no_worker_hint_names_the_queue_prefix_the_worker_needs(settings, r, pg, tmp_path):
    from celeryconfig import PRIORITY_QUEUES, QUEUE_PREFIX
    from workers.celery import delete_queues

    seed_demo(r, 3)
    try:
        done = migrator("run", "--detach", *urls(settings), "--broker-url", settings.broker_url, cwd=tmp_path)
    finally:
        delete_queues()  # the batches it sent: no worker of this test takes them
    assert done.returncode == 0, done.stderr
    assert QUEUE_PREFIX and (f"until one starts: MIGRATOR_QUEUE_PREFIX={QUEUE_PREFIX} celery -A workers worker -Q "
                             f"{','.join(PRIORITY_QUEUES.values())}\n") in done.stderr


def test_version_is_the_installed_package_s():
    from importlib import metadata

    from migrator import version
    done = migrator("--version")
    assert done.returncode == 0 and done.stdout == f"migrator {metadata.version('redis-pg-migrator')}\n"
    # a checkout that was never installed says the version its pyproject.toml gives
    assert version("no-such-distribution") == f"{metadata.version('redis-pg-migrator')} (not installed)"
