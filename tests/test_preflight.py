"""`migrator check` against the real services: each verdict, each fix, and never a password in the output."""
from __future__ import annotations

import os
import uuid

import psycopg2
import pytest
from psycopg2 import sql

from celeryconfig import PRIORITY_QUEUES, QUEUE_PREFIX
from migrator.core.config import DEFAULT_BROKER_URL, Settings
from migrator.apps.threadr.demo import seed_demo
from migrator.views.preflight import (CheckResult, check_redis, check_result_backend, exit_code, judge_postgres,
                                judge_workers, render_checks, run_checks)
from migrator.core.schema import database_url_for, ensure_database

from conftest import ADMIN_URL
from helpers import migrate
from migrator.core.schema import schema_versions
from migrator.apps.threadr import THREADR
from servers import redis_server, spare_port, with_password

NAMES = ["env", "redis", "keyspace events", "postgres", "schema", "privileges", "init-db", "broker", "workers", "result backend"]
# No worker of this session answers on the broker, so waiting longer than this shows nothing more.
TIMEOUT = 0.5
VERSIONS = ", ".join(schema_versions(THREADR))


def verdicts(results: list[CheckResult]) -> dict[str, str]:
    return {r.name: r.verdict for r in results}


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


@pytest.fixture
def admin():
    conn = psycopg2.connect(ADMIN_URL)
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def empty_database(admin) -> str:
    name = f"migrator_check_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    ensure_database(admin, name)
    yield database_url_for(ADMIN_URL, name)
    with admin.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def unprivileged_role(settings, admin) -> str:
    """A LOGIN role with no grant at all, on the session database (trust auth: no password)."""
    role = f"migrator_check_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    yield role
    owner = psycopg2.connect(settings.database_url)
    owner.autocommit = True
    with owner.cursor() as cur:  # its grants live in the session database
        cur.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    owner.close()
    with admin.cursor() as cur:
        cur.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_healthy_local_services_pass_with_warnings_only(settings, r):
    results = run_checks(settings, timeout=TIMEOUT)
    assert [x.name for x in results] == NAMES
    checks = by_name(results)
    # (keyspace events: the shared server's own setting, which tests/test_follow.py proves both ways)
    assert {n: v for n, v in verdicts(results).items() if n not in ("env", "keyspace events")} == {
        "redis": "ok", "postgres": "warn", "schema": "ok", "privileges": "ok", "init-db": "ok", "broker": "ok",
        "workers": "warn", "result backend": "ok"}
    assert "master, standalone" in checks["redis"].detail and "Redis 7" in checks["redis"].detail
    # the default postgres user is a superuser
    assert "superuser" in checks["postgres"].detail
    assert checks["postgres"].fix.startswith("runs as a superuser: use a role with only the privileges a run needs")
    assert checks["schema"].detail == f"current ({VERSIONS}), every table of the threadr mapping journaled"
    # no worker runs here: a warning with the command that starts one, not a failure
    # with this installation's queue prefix, which the worker needs too
    assert checks["workers"].fix.endswith(f": MIGRATOR_QUEUE_PREFIX={QUEUE_PREFIX} celery -A workers worker -Q "
                                          f"{','.join(PRIORITY_QUEUES.values())}")
    assert exit_code(results) == 0
    lines = render_checks(results).splitlines()
    assert len(lines) == len(NAMES)
    assert lines[1].split()[:2] == ["OK", "redis"] and "-> fix:" not in lines[1]
    assert lines[3].startswith("WARN  postgres") and "-> fix: runs as a superuser" in lines[3]


def test_env_warns_about_each_default_and_names_it(monkeypatch):
    for var in ("REDIS_URL", "DATABASE_URL", "CELERY_BROKER_URL"):
        monkeypatch.delenv(var, raising=False)
    result = by_name(run_checks(Settings.from_env(), need_workers=False, timeout=TIMEOUT))["env"]
    assert result.verdict == "warn"
    assert "REDIS_URL is not set: using the default redis://127.0.0.1:6379/0" in result.detail
    assert "CELERY_BROKER_URL is not set: using the default amqp://guest:***@127.0.0.1:5672//" in result.detail
    assert result.fix.startswith("export REDIS_URL, DATABASE_URL, CELERY_BROKER_URL")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    monkeypatch.setenv("CELERY_BROKER_URL", DEFAULT_BROKER_URL)
    assert by_name(run_checks(Settings.from_env(), need_workers=False, timeout=TIMEOUT))["env"].verdict == "ok"


def test_unreachable_redis_fails_and_the_other_checks_still_run(settings):
    port = spare_port()
    closed = Settings(f"redis://127.0.0.1:{port}/0", settings.database_url, settings.broker_url)
    results = run_checks(closed, need_workers=False, timeout=TIMEOUT)
    redis_check = by_name(results)["redis"]
    # the server it tried, unmasked: a server's address is not personal data
    assert redis_check.verdict == "fail" and redis_check.detail.startswith(f"cannot reach Redis at 127.0.0.1:{port} (")
    assert redis_check.fix == "is it running, and is REDIS_URL right?"
    assert verdicts(results)["schema"] == verdicts(results)["broker"] == "ok"
    assert exit_code(results) == 1


def test_wrong_password_fails_with_its_fix_and_no_password_is_ever_printed(settings, tmp_path, monkeypatch):
    secrets = ["right-one-s3cret", "wrong-one-s3cret", "pg-s3cret", "broker-s3cret"]
    with redis_server(tmp_path, password="right-one-s3cret") as port:
        wrong = Settings(f"redis://:wrong-one-s3cret@127.0.0.1:{port}/0", with_password(settings.database_url, "pg-s3cret"),
                         "amqp://guest:broker-s3cret@127.0.0.1:1//")
        # the environment holds them too: the env check must not echo it
        monkeypatch.setenv("REDIS_URL", wrong.redis_url)
        monkeypatch.setenv("DATABASE_URL", wrong.database_url)
        monkeypatch.setenv("CELERY_BROKER_URL", wrong.broker_url)
        failed = run_checks(wrong, timeout=TIMEOUT)
        right = run_checks(Settings(f"redis://:right-one-s3cret@127.0.0.1:{port}/0", wrong.database_url,
                                    settings.broker_url), need_workers=False, timeout=TIMEOUT)
    checks = by_name(failed)
    assert checks["redis"].verdict == "fail" and "refused the credentials" in checks["redis"].detail
    assert checks["redis"].fix == "check the password in REDIS_URL"
    assert checks["postgres"].verdict == "warn" and checks["schema"].verdict == "ok"  # the password was ignored
    assert checks["broker"].verdict == "fail" and checks["workers"].detail == "skipped because broker failed"
    assert by_name(right)["redis"].verdict == "ok" and f"redis://:***@127.0.0.1:{port}/0" in by_name(right)["redis"].detail
    for shown in (render_checks(failed), repr(failed), render_checks(right), repr(right)):
        assert not [s for s in secrets if s in shown]


def test_bad_urls_become_fail_lines_without_their_passwords():
    bad = Settings("redis//:s3cret-r@127.0.0.1:6379/0", "postgresql://postgres:s3cret-p@127.0.0.1:notaport/x",
                   "nosuch://guest:s3cret-b@127.0.0.1//")
    results = run_checks(bad, timeout=TIMEOUT)
    assert [x.name for x in results] == NAMES
    assert verdicts(results)["redis"] == verdicts(results)["postgres"] == verdicts(results)["broker"] == "fail"
    shown = render_checks(results)
    assert "s3cret" not in shown and "redis//:***@127.0.0.1:6379/0" in shown
    assert "postgresql://postgres:***@127.0.0.1:notaport/x" in shown
    assert "CELERY_BROKER_URL 'nosuch://guest:***@127.0.0.1//' is not a broker URL" in shown


def test_replica_warns_to_scan_the_master(settings, tmp_path):
    (tmp_path / "master").mkdir()
    (tmp_path / "replica").mkdir()
    with redis_server(tmp_path / "master") as master, \
            redis_server(tmp_path / "replica", "--replicaof", "127.0.0.1", str(master)) as replica:
        result = check_redis(Settings(f"redis://127.0.0.1:{replica}/0", settings.database_url, settings.broker_url))
    assert result.verdict == "warn" and ", slave, standalone" in result.detail
    assert result.fix == f"scan the master, not a replica: point REDIS_URL at 127.0.0.1:{master}"


def test_database_without_schema_fails_with_init_db(settings, empty_database):
    results = run_checks(Settings(settings.redis_url, empty_database, settings.broker_url),
                         need_workers=False, timeout=TIMEOUT)
    checks = by_name(results)
    assert checks["schema"].verdict == "fail"
    assert f"lacks the current schema ({VERSIONS} not applied)" in checks["schema"].detail
    assert checks["schema"].fix == ("run `migrator init-db` first, or point --database-url (DATABASE_URL) at the database "
                                    "the migration writes")
    assert checks["privileges"].verdict == "warn" and "do not exist yet" in checks["privileges"].detail
    assert exit_code(results) == 1


def test_unreachable_broker_fails_and_workers_are_skipped(settings):
    results = run_checks(Settings(settings.redis_url, settings.database_url, "amqp://guest:guest@127.0.0.1:1//"),
                         timeout=TIMEOUT)
    checks = by_name(results)
    assert checks["broker"].verdict == "fail" and "Connection refused" in checks["broker"].detail
    assert (checks["workers"].verdict, checks["workers"].detail) == ("warn", "skipped because broker failed")
    assert checks["redis"].verdict == checks["schema"].verdict == "ok"
    assert exit_code(results) == 1


def test_role_without_privileges_fails_and_its_grant_is_enough_for_a_run(settings, unprivileged_role, r, pg):
    as_role = Settings(settings.redis_url, database_url_for(f"postgresql://{unprivileged_role}@127.0.0.1:5432/x",
                                                            settings.database_url.rsplit("/", 1)[1]),
                       settings.broker_url)
    checks = by_name(run_checks(as_role, need_workers=False, timeout=TIMEOUT))
    assert checks["postgres"].verdict == "ok" and "superuser" not in checks["postgres"].detail
    assert checks["schema"].verdict == "fail"
    privileges = checks["privileges"]
    assert privileges.verdict == "fail" and privileges.detail.startswith(
        f"{unprivileged_role} lacks SELECT, INSERT, UPDATE, DELETE on subscriptions, users, ")
    grant = "GRANT SELECT, INSERT, UPDATE, DELETE ON subscriptions, users, legacy_id_map"
    assert grant in privileges.fix and f"GRANT SELECT ON schema_migrations TO {unprivileged_role};" in privileges.fix
    assert ("GRANT USAGE ON SEQUENCE migration_batches_id_seq, migration_dead_letters_id_seq, "
            "migration_reconciliations_id_seq, "
            f"migration_verifications_id_seq, migration_verify_ranges_id_seq TO {unprivileged_role};") in privileges.fix
    assert checks["init-db"].verdict == "warn" and "no CREATE on schema public" in checks["init-db"].detail

    # the printed fix, run by the owner, is all a run needs
    with pg.cursor() as cur:
        cur.execute(privileges.fix.split("run: ", 1)[1])
    pg.commit()
    checks = by_name(run_checks(as_role, need_workers=False, timeout=TIMEOUT))
    assert checks["privileges"].verdict == checks["schema"].verdict == "ok"
    seed_demo(r, 20)
    report = migrate(as_role)
    assert report["status"] == "completed" and report["balanced"]


def test_postgres_before_15_fails():
    result = judge_postgres("postgresql://migrator@db/threadr", 140011, "14.11", "migrator", False)
    assert result.verdict == "fail" and "UNIQUE NULLS NOT DISTINCT and CREATE OR REPLACE TRIGGER" in result.fix


def test_result_backend_in_the_source_database_fails_and_a_dead_one_warns(settings):
    same = check_result_backend(settings.redis_url, settings.redis_url, TIMEOUT)
    assert same.verdict == "fail" and "is the Redis database being migrated" in same.detail
    dead = check_result_backend(settings.redis_url, f"redis://:s3cret@127.0.0.1:{spare_port()}/14", TIMEOUT)
    assert dead.verdict == "warn" and dead.detail.startswith("cannot reach redis://:***@127.0.0.1:")


def test_workers_warn_names_only_the_queues_nobody_consumes():
    from workers.coordinator import worker_command

    replies = {"a@host": ["critical", "high"], "b@host": ["critical"]}
    result = judge_workers(replies, ["critical", "high", "medium"], TIMEOUT, worker_command)
    assert result.verdict == "warn" and result.detail == "critical: 2 workers, high: 1 worker, medium: 0 workers"
    assert result.fix.endswith(f": MIGRATOR_QUEUE_PREFIX={QUEUE_PREFIX} celery -A workers worker -Q medium")
    assert judge_workers(replies, ["critical", "high"], TIMEOUT, worker_command).verdict == "ok"
