"""sql/roles/least_privilege.sql: a run works as migrator_run; migrator_report only reads, and never raw values."""
from __future__ import annotations

from pathlib import Path

import psycopg2
import pytest

from migrator.config import Settings
from migrator.demo import seed_demo
from migrator.report import build_report
from migrator.threadr import THREADR

from helpers import migrate, validate, verify

ROLES = Path(__file__).resolve().parent.parent / "sql" / "roles" / "least_privilege.sql"


@pytest.fixture
def roles(settings, pg):
    with pg.cursor() as cur:
        cur.execute(ROLES.read_text())
        cur.execute(ROLES.read_text())  # applying it twice changes nothing
    pg.commit()
    yield
    with pg.cursor() as cur:
        for role in ("migrator_run", "migrator_report"):
            cur.execute(f"DROP OWNED BY {role}")
            cur.execute(f"DROP ROLE {role}")
    pg.commit()


def as_role(url: str, role: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{role}@{rest.split('@', 1)[1]}"


def test_a_run_needs_no_more_than_migrator_run_and_reports_only_read(settings, r, pg, roles):
    seed_demo(r, 40, malformed=3)
    run_as = Settings(settings.redis_url, as_role(settings.database_url, "migrator_run"), settings.broker_url)
    report = migrate(run_as)
    assert report["status"] == "completed" and report["balanced"] and report["totals"]["dead"] == 3 + 1  # + a refused
    as_reader = Settings(settings.redis_url, as_role(settings.database_url, "migrator_report"), settings.broker_url)
    # the read-only role verifies and validates: it writes nothing but the verification's own record
    assert verify(as_reader, report["run_id"])["verdict"] == "clean"
    assert validate(as_reader, report["run_id"])["ok"]
    reader = psycopg2.connect(as_reader.database_url)
    try:
        assert build_report(reader, THREADR, report["run_id"])["patterns"] == report["patterns"]
        with reader.cursor() as cur:
            cur.execute("SELECT count(*), count(error) FROM migration_dead_letters")
            assert cur.fetchone() == (4, 4)
        reader.rollback()
        for statement in ("SELECT raw_value FROM migration_dead_letters", "DELETE FROM users",
                          "INSERT INTO usage_stats (id, stat_name, value) VALUES (gen_random_uuid(), 'x', 1)"):
            with pytest.raises(psycopg2.errors.InsufficientPrivilege), reader.cursor() as cur:
                cur.execute(statement)
            reader.rollback()
    finally:
        reader.close()
    with psycopg2.connect(run_as.database_url) as runner, runner.cursor() as cur:
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute("DROP TABLE users")
