"""sql/: loads inside one transaction and again on top of itself; no seed-schema faults."""
from __future__ import annotations

import subprocess
import uuid

import psycopg2
import pytest
from psycopg2 import sql

from migrator.schema import database_url_for, ensure_database, init_db, sql_files
from migrator.threadr import THREADR


@pytest.fixture
def fresh_database(settings):
    admin = psycopg2.connect(database_url_for(settings.database_url, "postgres"))
    name = f"migrator_schema_{uuid.uuid4().hex[:8]}"
    ensure_database(admin, name)
    yield database_url_for(settings.database_url, name)
    with admin.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
    admin.close()


def test_each_file_loads_in_one_transaction_with_psql_and_again_on_top_of_itself(fresh_database):
    for _ in range(2):
        for path in sql_files():
            done = subprocess.run(["psql", fresh_database, "--single-transaction", "-v", "ON_ERROR_STOP=1", "-q",
                                   "-f", str(path)], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
    conn = psycopg2.connect(fresh_database)
    try:
        assert {action for _, action in init_db(conn)} == {"applied"}  # psql does not record versions
        assert {action for _, action in init_db(conn)} == {"current"}
    finally:
        conn.close()


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
