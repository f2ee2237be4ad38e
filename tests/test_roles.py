"""sql/roles/least_privilege.sql: a run works as migrator_run; migrator_report only reads (validate and verify
included, which then record nothing), and never raw values; init-db grants them every table of its mapping."""
from __future__ import annotations

import json
from pathlib import Path

import psycopg2
import pytest

from migrator.core import ledger, writer
from migrator.core.config import Settings
from migrator.apps.threadr.demo import seed_demo
from migrator.views.preflight import check_privileges
from migrator.views.report import build_report
from migrator.core.schema import init_db
from migrator.apps.threadr import THREADR

from helpers import GADGETS_DDL, gadgets, migrate, migrator, throwaway_database

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
    pg.commit()
    for role in ("migrator_run", "migrator_report"):
        try:
            with pg.cursor() as cur:
                cur.execute(f"DROP ROLE {role}")
            pg.commit()
        except psycopg2.errors.DependentObjectsStillExist:
            # init-db granted it tables in a database of another test session, made while it existed: left
            # for that session (the next one to run these tests takes it as it is)
            pg.rollback()


def as_role(url: str, role: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{role}@{rest.split('@', 1)[1]}"


def test_a_run_needs_no_more_than_migrator_run_and_reports_only_read(settings, r, pg, roles, tmp_path, monkeypatch):
    seed_demo(r, 40, malformed=3)
    # sub-batches of this demo's size staged by COPY into temporary tables as large ones are
    # (migrator/core/writer.py): the role may make them
    monkeypatch.setattr(writer, "STAGED_MIN_RECORDS", 10)
    run_as = Settings(settings.redis_url, as_role(settings.database_url, "migrator_run"), settings.broker_url)
    report = migrate(run_as)
    assert report["status"] == "completed" and report["balanced"] and report["totals"]["dead"] == 3 + 1  # + a refused
    as_reader = Settings(settings.redis_url, as_role(settings.database_url, "migrator_report"), settings.broker_url)
    reader = psycopg2.connect(as_reader.database_url)
    try:
        assert build_report(reader, THREADR, report["run_id"])["patterns"] == report["patterns"]
        with reader.cursor() as cur:
            cur.execute("SELECT count(*), count(error) FROM migration_dead_letters")
            assert cur.fetchone() == (4, 4)
        reader.rollback()
        for statement in ("SELECT raw_value FROM migration_dead_letters", "DELETE FROM users",
                          "INSERT INTO usage_stats (id, stat_name, value) VALUES (gen_random_uuid(), 'x', 1)",
                          "INSERT INTO migration_verifications (run_id, priorities, compare) VALUES "
                          f"('{report['run_id']}', '{{high}}', true)"):
            with pytest.raises(psycopg2.errors.InsufficientPrivilege), reader.cursor() as cur:
                cur.execute(statement)
            reader.rollback()
    finally:
        reader.close()
    with psycopg2.connect(run_as.database_url) as runner, runner.cursor() as cur:
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute("DROP TABLE users")


def _ledger_rows(pg) -> dict[str, int]:
    counts = {}
    with pg.cursor() as cur:
        for table in ("migration_verifications", "migration_verify_ranges", "migration_validations", "migration_runs"):
            cur.execute(f"SELECT count(*) FROM {table}")
            counts[table] = cur.fetchone()[0]
    pg.rollback()
    return counts


NOT_RECORDED = "migrator: not recorded: role migrator_report cannot write the ledger (verifying here, in memory)\n"


def test_the_read_only_role_validates_and_verifies_without_writing_a_thing(settings, r, pg, roles, tmp_path):
    seed_demo(r, 40, malformed=3)
    run_id = migrate(settings)["run_id"]
    before = _ledger_rows(pg)
    reader = ["--redis-url", settings.redis_url, "--database-url", as_role(settings.database_url, "migrator_report"),
              "--broker-url", settings.broker_url]
    for command in (["verify", run_id], ["verify", "--local", "--jobs", "2"], ["validate", run_id], ["validate"]):
        done = migrator(*command, *reader, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert NOT_RECORDED in done.stderr and ("CLEAN" if command[0] == "verify" else "PASS") in done.stdout
    shown = migrator("verify", run_id, "--json", *reader, cwd=tmp_path)
    result = json.loads(shown.stdout)
    assert result["verification_id"] is None and result["verdict"] == "clean" and result["totals"]["compared"] > 100
    assert _ledger_rows(pg) == before  # nothing recorded
    assert migrator("status", run_id, *reader).returncode == 0

    # it compares for real: a row deleted behind the migrator's back is found, and still nothing is written
    with pg.cursor() as cur:
        cur.execute("DELETE FROM users WHERE id = (SELECT id FROM users ORDER BY legacy_id LIMIT 1)")
    pg.commit()
    found = migrator("verify", run_id, *reader, cwd=tmp_path)
    assert found.returncode == 1 and "verification (not recorded) DIFFERENCES" in found.stdout
    assert "missing 1, different 0" in found.stdout
    judged = migrator("validate", run_id, *reader, cwd=tmp_path)
    assert judged.returncode == 1 and "high     FAIL verification: PostgreSQL does not hold what Redis holds: " \
                                      "user: 1 missing" in judged.stdout
    assert _ledger_rows(pg) == before

    # what it may not do is refused in one line naming the server, and changes nothing
    refused = migrator("rollback", run_id, *reader)
    host, port = settings.database_url.split("@", 1)[1].split("/", 1)[0].split(":")
    assert refused.returncode == 1 and refused.stderr == (
        f"migrator: PostgreSQL at {host}:{port} refused (InsufficientPrivilege: permission denied for table "
        "migration_runs); grant the role what `migrator check` lists under privileges\n")
    with pg.cursor() as cur:
        cur.execute("SELECT status FROM migration_runs WHERE id = %s", (run_id,))
        assert cur.fetchone()[0] == "completed"
    pg.rollback()


def test_init_db_grants_the_roles_what_they_need_on_every_table_of_the_mapping_it_applies(settings, roles):
    """The roles exist before the database does: init-db grants them its mapping's tables (and their
    sequences) as it grants the ledger, and a table it starts writing later too."""
    mapping = gadgets()
    with throwaway_database(settings.database_url) as url:
        owner = psycopg2.connect(url)
        try:
            init_db(owner, mapping)
            runner = psycopg2.connect(as_role(url, "migrator_run"))
            try:
                assert check_privileges(runner, [*mapping.table_names(), *ledger.TABLES]).verdict == "ok"
                with runner.cursor() as cur:
                    cur.execute("INSERT INTO gadgets (id, name) VALUES (gen_random_uuid(), 'g') RETURNING serial_no")
                    cur.execute("UPDATE gadgets SET name = 'h'")
                    cur.execute("DELETE FROM gadgets")
                runner.rollback()
                init_db(owner, gadgets(GADGETS_DDL, "CREATE TABLE IF NOT EXISTS parts (id uuid PRIMARY KEY)",
                                       tables=("gadgets", "parts")))
                with runner.cursor() as cur:
                    cur.execute("INSERT INTO parts (id) VALUES (gen_random_uuid())")
                runner.rollback()
            finally:
                runner.close()
            reader = psycopg2.connect(as_role(url, "migrator_report"))
            try:
                with reader.cursor() as cur:
                    cur.execute("SELECT count(*) FROM gadgets")
                    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                        cur.execute("INSERT INTO gadgets (id, name) VALUES (gen_random_uuid(), 'g')")
            finally:
                reader.close()
        finally:
            owner.close()
