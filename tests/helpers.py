"""Shared test steps: run a migration through the library, fingerprint tables."""
from __future__ import annotations

import os
from typing import Any

from psycopg2 import sql

from migrator.config import Settings
from migrator.options import RunOptions
from migrator.report import build_report
from migrator.runner import execute_local, plan_run
from migrator.threadr import THREADR


def migrate(settings: Settings, **options: Any) -> dict[str, Any]:
    """A whole local run; returns its report."""
    opts = RunOptions(**options)
    client = settings.redis()
    try:
        conn = settings.postgres()
        try:
            run_id = plan_run(client, conn, THREADR, opts, settings.redis_url)
        finally:
            conn.close()
        execute_local(client, settings.postgres, THREADR, run_id, opts)
        conn = settings.postgres()  # a new one: a test may have restarted the server
        try:
            return build_report(conn, THREADR, run_id)
        finally:
            conn.close()
    finally:
        client.close()


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
PROVENANCE = ("migration_run", "source_key", "metadata", "expires_at")


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


def worker_env(database_url: str) -> dict[str, str]:
    """The environment of a worker process of this test session."""
    from conftest import REDIS_URL

    return {**os.environ, "REDIS_URL": REDIS_URL, "DATABASE_URL": database_url, "MIGRATOR_LOG_JSON": "1",
            "CELERY_BROKER_URL": os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")}
