"""The schema init-db applies: the engine's SQL, then the chosen mapping's DDL, then a journal trigger and
the provenance columns on every table the mapping writes; each part loads inside one transaction and
again on top of itself; no seed-schema faults; a table without its trigger is refused."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import psycopg2
import pytest

from migrator.core.config import ConfigError, Settings
from migrator.core.options import RunOptions
from migrator.core.rollback import RollbackFailed, rollback_run
from migrator.execution.runner import execute_local, plan_run
from migrator.core.schema import PROVENANCE, engine_sql, init_db, missing_journals, require_schema, schema_versions
from migrator.views.status import run_progress
from migrator.apps.threadr import THREADR
from migrator.core.values import stable_id

from helpers import GADGETS_DDL, fingerprint, gadgets, migrate, migrator, throwaway_database

ROOT = Path(__file__).resolve().parent.parent
# The last commit whose sql/ held Threadr's tables with hand-written triggers (002_threadr.sql).
OLD_LAYOUT = "a1fb04d"


@pytest.fixture
def fresh_database(settings):
    with throwaway_database(settings.database_url) as url:
        yield url


@pytest.fixture
def fresh(fresh_database):
    conn = psycopg2.connect(fresh_database)
    yield conn
    conn.close()


def columns(conn, table: str) -> list[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT column_name FROM information_schema.columns WHERE table_name = %s ORDER BY ordinal_position",
                    (table,))
        found = [c for (c,) in cur.fetchall()]
    conn.rollback()
    return found


def versions(conn) -> dict[str, str]:
    with conn.cursor() as cur:
        cur.execute("SELECT version, checksum FROM schema_migrations")
        found = dict(cur.fetchall())
    conn.rollback()
    return found


def test_each_part_loads_in_one_transaction_with_psql_and_again_on_top_of_itself(fresh_database):
    parts = [text for _, text in engine_sql()] + list(THREADR.schema)
    for _ in range(2):
        for text in parts:
            done = subprocess.run(["psql", fresh_database, "--single-transaction", "-v", "ON_ERROR_STOP=1", "-q",
                                   "-f", "-"], input=text, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
    conn = psycopg2.connect(fresh_database)
    try:
        assert {action for _, action in init_db(conn, THREADR)} == {"applied"}  # psql does not record versions
        assert {action for _, action in init_db(conn, THREADR)} == {"current"}
    finally:
        conn.close()


def test_init_db_applies_the_chosen_mapping_with_the_engine_s_columns_and_a_journal_trigger_on_each_table(fresh):
    mapping = gadgets()
    assert init_db(fresh, mapping) == [(v, "applied") for v in schema_versions(mapping)]
    assert schema_versions(mapping)[-1] == "mapping:gadgets"
    require_schema(fresh, mapping)
    assert columns(fresh, "gadgets") == ["id", "serial_no", "name", *PROVENANCE]
    assert columns(fresh, "users") == []  # Threadr's schema is Threadr's mapping's: not applied here
    with fresh.cursor() as cur:
        assert missing_journals(cur, ["gadgets", "legacy_id_map"]) == {}
        cur.execute("SELECT tgrelid::regclass::text FROM pg_trigger WHERE tgname LIKE '%_journal' ORDER BY 1")
        assert cur.fetchall() == [("gadgets",), ("legacy_id_map",)]
    fresh.rollback()
    with pytest.raises(ConfigError, match=r"lacks the current schema \(mapping:threadr not applied\)") as stale:
        require_schema(fresh, THREADR)
    # which database, for a URL left to its default
    assert f"the target database {fresh.info.dbname!r} on {fresh.info.host}:{fresh.info.port} " in str(stale.value)
    assert str(stale.value).endswith("or point --database-url (DATABASE_URL) at the database the migration writes")

    # a mapping whose DDL changed, or that writes one more table, leaves the database stale until init-db
    grown = gadgets(GADGETS_DDL, "ALTER TABLE gadgets ADD COLUMN IF NOT EXISTS colour text")
    with pytest.raises(ConfigError, match=r"\(mapping:gadgets not applied\); run `migrator init-db` first"):
        require_schema(fresh, grown)
    assert init_db(fresh, grown)[-1] == ("mapping:gadgets", "updated")
    assert "colour" in columns(fresh, "gadgets")

    # a table the mapping writes and its DDL does not create is refused, and nothing of it is applied
    before = versions(fresh)
    broken = gadgets(GADGETS_DDL, "CREATE TABLE gadget_parts (id uuid PRIMARY KEY)", tables=("gadgets", "gizmos"))
    with pytest.raises(ConfigError, match="the gadgets mapping writes gizmos, which its schema does not create; add a "
                                          "CREATE TABLE for each to the mapping's schema"):
        init_db(fresh, broken)
    assert columns(fresh, "gadget_parts") == [] and versions(fresh) == before


def test_a_disabled_or_dropped_journal_or_seal_trigger_is_refused_until_init_db_puts_it_back(fresh):
    mapping = gadgets()
    init_db(fresh, mapping)
    for damage in ("ALTER TABLE gadgets DISABLE TRIGGER gadgets_journal", "DROP TRIGGER gadgets_journal ON gadgets",
                   "ALTER TABLE gadgets DISABLE TRIGGER gadgets_unseal", "DROP TRIGGER gadgets_unseal ON gadgets"):
        with fresh.cursor() as cur:
            cur.execute(damage)
        fresh.commit()
        with pytest.raises(ConfigError) as refused:
            require_schema(fresh, mapping)
        assert str(refused.value) == (
            "the gadgets mapping writes gadgets without a journal or seal trigger: rows a run changes there are not "
            "journaled, so a rollback would delete the ones that existed before the run instead of restoring them, or "
            "a row changed there keeps a seal that no longer vouches for it; run `migrator init-db` (it creates them)")
        require_schema(fresh)  # the engine's own schema is whole: commands that only read the ledger go on
        assert init_db(fresh, mapping)[-1] == ("mapping:gadgets", "current")
        require_schema(fresh, mapping)


def test_a_mapping_of_its_own_migrates_and_rolls_back_exactly_on_the_schema_init_db_made(settings, r, fresh_database):
    mapping = gadgets()
    conn = psycopg2.connect(fresh_database)
    try:
        init_db(conn, mapping)
        with conn.cursor() as cur:  # a row the app wrote before the run, which the run will change
            cur.execute("INSERT INTO gadgets (id, name) VALUES (%s, 'old')", (stable_id("gadget", "g1"),))
        conn.commit()
        before = fingerprint(conn, ["gadgets"])
        r.set("gadget:g1", "new")
        r.set("gadget:g2", "two")
        target = Settings(settings.redis_url, fresh_database, settings.broker_url)
        client = target.redis()
        try:
            run_id = plan_run(client, conn, mapping, RunOptions(), target.redis_url)
            assert execute_local(client, target.postgres, mapping, run_id, RunOptions()) == "completed"
        finally:
            client.close()
        with conn.cursor() as cur:
            cur.execute("SELECT name, migration_run::text, source_digest IS NOT NULL FROM gadgets ORDER BY name")
            assert cur.fetchall() == [("new", run_id, True), ("two", run_id, True)]
        conn.rollback()
        summary = rollback_run(conn, mapping, run_id)
        assert summary["gadgets"] == {"deleted": 1, "restored": 1}
        assert fingerprint(conn, ["gadgets"]) == before
    finally:
        conn.close()


def test_a_rollback_gives_a_changed_row_back_exactly_json_nulls_json_text_generated_and_identity_columns_included(
        settings, r, fresh_database):
    """A prior image comes back as it was: a jsonb 'null' stays one (not SQL NULL), a json column keeps
    its text (spaces, key order, a key twice), a generated column is made again by PostgreSQL (it
    cannot be given) and an identity column keeps its value. (From the image's JSON alone, the first
    two came back changed and the third failed the rollback.)"""
    mapping = gadgets("CREATE TABLE IF NOT EXISTS gadgets (id uuid PRIMARY KEY, serial_no bigserial, name text NOT NULL,"
                      " tags jsonb, doc json, name_length int GENERATED ALWAYS AS (length(name)) STORED,"
                      " n bigint GENERATED ALWAYS AS IDENTITY)")
    conn = psycopg2.connect(fresh_database)
    try:
        init_db(conn, mapping)
        with conn.cursor() as cur:
            cur.execute("""INSERT INTO gadgets (id, name, tags, doc) VALUES (%s, 'old', 'null', '{"b": 1,   "a": 2, "a": 3}'),"""
                        " (%s, 'other', NULL, '[1, 2.50]')", (stable_id("gadget", "g1"), stable_id("gadget", "g3")))
        conn.commit()
        before = fingerprint(conn, ["gadgets"])
        for key, value in (("gadget:g1", "new"), ("gadget:g2", "two"), ("gadget:g3", "three")):
            r.set(key, value)
        target = Settings(settings.redis_url, fresh_database, settings.broker_url)
        client = target.redis()
        options = RunOptions(rollback_on_failure=False)  # (the rollback asked for below, whatever the validation says)
        try:
            run_id = plan_run(client, conn, mapping, options, target.redis_url)
            execute_local(client, target.postgres, mapping, run_id, options)
        finally:
            client.close()
        with conn.cursor() as cur:
            cur.execute("SELECT name, name_length FROM gadgets ORDER BY name")
            assert cur.fetchall() == [("new", 3), ("three", 5), ("two", 3)]
        conn.rollback()
        assert rollback_run(conn, mapping, run_id)["gadgets"] == {"deleted": 1, "restored": 2}
        assert fingerprint(conn, ["gadgets"]) == before
        with conn.cursor() as cur:
            cur.execute("SELECT tags IS NULL, tags::text, doc::text, name_length FROM gadgets ORDER BY name")
            assert cur.fetchall() == [(False, "null", '{"b": 1,   "a": 2, "a": 3}', 3), (True, None, "[1, 2.50]", 5)]
    finally:
        conn.close()


def test_a_table_without_its_journal_trigger_fails_check_and_no_run_or_rollback_deletes_its_rows(settings, r, pg):
    """A table re-created by hand has lost its trigger: a run's updates there go unjournaled, and a
    rollback would take the rows it updated for rows it inserted."""
    urls = ["--redis-url", settings.redis_url, "--database-url", settings.database_url]
    r.hset("threadr:usage:stats", mapping={"threads_created": 5})
    migrate(settings)
    with pg.cursor() as cur:
        cur.execute("UPDATE usage_stats SET migration_run = NULL")  # as if the app wrote it before any run
        cur.execute("DROP TRIGGER usage_stats_journal ON usage_stats")
    pg.commit()
    refusal = "the threadr mapping writes usage_stats without a journal or seal trigger"
    try:
        check = migrator("check", "--no-workers", "--json", *urls, "--broker-url", settings.broker_url)
        schema = next(c for c in json.loads(check.stdout) if c["name"] == "schema")
        assert check.returncode == 1 and schema["verdict"] == "fail" and schema["detail"].startswith(refusal)
        assert schema["fix"] == "run `migrator init-db` (it creates them)"
        refused = migrator("run", "--local", *urls)
        assert refused.returncode == 2 and refusal in refused.stderr
        with pg.cursor() as cur:
            cur.execute("SELECT count(*) FROM migration_runs")
            assert cur.fetchone() == (1,)  # nothing planned
        pg.rollback()

        # a run that went ahead anyway (the library does not ask): its rollback is refused, the row stays
        r.hset("threadr:usage:stats", "threads_created", 9)
        run_id = migrate(settings)["run_id"]
        with pg.cursor() as cur:
            cur.execute("SELECT value, migration_run::text FROM usage_stats")
            assert cur.fetchall() == [(9, run_id)]
        pg.rollback()
        undo = migrator("rollback", run_id, *urls)
        assert undo.returncode == 2 and refusal in undo.stderr and "Traceback" not in undo.stderr
        with pytest.raises(RollbackFailed, match=refusal):
            rollback_run(pg, THREADR, run_id)
        assert run_progress(pg, run_id)["status"] == "rollback_failed"
        with pg.cursor() as cur:
            cur.execute("SELECT value FROM usage_stats")
            assert cur.fetchall() == [(9,)]
        pg.rollback()
    finally:
        init_db(pg, THREADR)
    check = migrator("check", "--no-workers", "--json", *urls, "--broker-url", settings.broker_url)
    assert next(c for c in json.loads(check.stdout) if c["name"] == "schema")["verdict"] == "ok"


def test_a_database_init_db_made_before_the_mapping_brought_its_schema_is_brought_current(fresh_database, fresh):
    """The files of the old sql/ (Threadr's tables and their hand-written triggers in 002_threadr.sql),
    applied and recorded as init-db then did, with a row in them: init-db now leaves the same schema
    as on a new database, the row untouched."""
    listing = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{OLD_LAYOUT}:sql"],
                             capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip(f"not a git checkout holding {OLD_LAYOUT}: {listing.stderr.strip()}")
    with fresh, fresh.cursor() as cur:
        for name in sorted(n for n in listing.stdout.split() if n.endswith(".sql")):
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_LAYOUT}:sql/{name}"], capture_output=True,
                                  text=True, check=True).stdout
            cur.execute(text)
            cur.execute("INSERT INTO schema_migrations (version, checksum) VALUES (%s, 'old')", (name[:-4],))
        cur.execute("INSERT INTO usage_stats (id, stat_name, value) VALUES (gen_random_uuid(), 'kept', 7)")
    with pytest.raises(ConfigError, match="not applied"):
        require_schema(fresh, THREADR)
    actions = dict(init_db(fresh, THREADR))
    assert actions["mapping:threadr"] == "applied" and actions["002_threadr"] == "retired"
    require_schema(fresh, THREADR)
    assert set(versions(fresh)) == set(schema_versions(THREADR))
    with fresh.cursor() as cur:
        cur.execute("SELECT stat_name, value FROM usage_stats")
        assert cur.fetchall() == [("kept", 7)]
    fresh.rollback()

    with throwaway_database(fresh_database) as url:
        made = psycopg2.connect(url)
        try:
            init_db(made, THREADR)
            assert shape(made) == shape(fresh)
        finally:
            made.close()


def shape(conn) -> dict[str, list]:
    """Every column (in order, with its type, default and nullability), index, constraint and trigger."""
    queries = {
        "columns": "SELECT table_name, ordinal_position, column_name, data_type, column_default, is_nullable"
                   " FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2",
        "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1",
        "constraints": "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
                       " WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2",
        "triggers": "SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) FROM pg_trigger"
                    " WHERE NOT tgisinternal ORDER BY 1, 2",
    }
    found = {}
    with conn.cursor() as cur:
        for name, query in queries.items():
            cur.execute(query)
            found[name] = cur.fetchall()
    conn.rollback()
    return found


def test_no_naive_timestamps_and_no_generated_columns(pg):
    with pg.cursor() as cur:
        cur.execute("SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'"
                    " AND (data_type = 'timestamp without time zone' OR is_generated = 'ALWAYS')")
        assert cur.fetchall() == []


def test_any_status_the_app_writes_fits_and_unique_keys_hold_with_nulls(pg):
    """SubscriptionInfo has no enum on status: the table takes whatever Stripe or the app wrote."""
    with pg.cursor() as cur:
        for status in ("active", "cancelled", "canceled", "past_due", "something_new"):
            cur.execute("INSERT INTO subscriptions (id, kind, plan, status) VALUES (gen_random_uuid(), 'stripe', 'p', %s)",
                        (status,))
        cur.execute("INSERT INTO subscriptions (id, kind, plan, status, ip, email)"
                    " VALUES (gen_random_uuid(), 'premium_grant', 'premium', 'active', NULL, NULL)")  # no user, no ip
        with pytest.raises(psycopg2.errors.CheckViolation):
            cur.execute("INSERT INTO subscriptions (id, kind, plan, status) VALUES (gen_random_uuid(), 'bogus', 'p', 'x')")
    pg.rollback()
    with pg.cursor() as cur:
        row = "(gen_random_uuid(), 'ip', '1.2.3.4', 'daily', DATE '2026-11-27', 1)"
        cur.execute(f"INSERT INTO usage_counters (id, subject_type, subject, period, period_start, count) VALUES {row}")
        with pytest.raises(psycopg2.errors.UniqueViolation):
            cur.execute(f"INSERT INTO usage_counters (id, subject_type, subject, period, period_start, count) VALUES {row}")
    pg.rollback()
    assert set(THREADR.table_names()) >= {"users", "subscriptions", "usage_counters", "threads", "legacy_id_map"}
