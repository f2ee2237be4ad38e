"""Figures an operator can trust: exact row counts."""
from __future__ import annotations

import json
from pathlib import Path

from psycopg2 import sql

from migrator.demo import seed_demo
from migrator.threadr import THREADR

from test_cli import migrator, urls


def run_local(settings, out_dir: Path, *flags: str) -> dict:
    done = migrator("run", "--local", "--json", "--output-dir", str(out_dir), *flags, *urls(settings))
    assert done.stdout, done.stderr
    return json.loads(done.stdout.split("\n", 1)[1])


def as_json(*args: str) -> dict:
    done = migrator(*args)
    assert done.returncode in (0, 1) and done.stdout, done.stderr
    return json.loads(done.stdout)


def exact_counts(pg) -> dict[str, int]:
    out = {}
    with pg.cursor() as cur:
        for table in THREADR.table_names():
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
            out[table] = cur.fetchone()[0]
    pg.rollback()
    return out


def test_report_counts_rows_exactly_right_after_the_writes(settings, r, pg, tmp_path):
    seed_demo(r, 80)
    run_id = run_local(settings, tmp_path)["run_id"]
    # A session that stays open, as a Celery worker's does, sends its statistics at most once a
    # second (else after 10 s idle): the second of two quick commits is not yet in
    # pg_stat_user_tables when the report is asked for, straight after.
    for table in ("usage_events", "sessions"):
        with pg.cursor() as cur:
            cur.execute(sql.SQL("DELETE FROM {t} WHERE id IN (SELECT id FROM {t} ORDER BY id LIMIT 5)")
                        .format(t=sql.Identifier(table)))
        pg.commit()
    report = as_json("report", run_id, "--json", "--output-dir", str(tmp_path), "--database-url", settings.database_url)
    exact = exact_counts(pg)
    tables = report["monitoring"]["tables"]
    assert {t["table"]: t["rows"] for t in tables} == exact
    assert exact["usage_events"] > 0 and exact["sessions"] > 0
    # PostgreSQL's cumulative statistics are kept apart, named for what they are
    assert all(set(t) == {"table", "rows", "bytes", "stats_may_lag"} for t in tables)
    text = migrator("report", run_id, "--output-dir", str(tmp_path), "--database-url", settings.database_url).stdout
    assert f"usage_events {exact['usage_events']:,} rows" in text and f"sessions {exact['sessions']:,} rows" in text
