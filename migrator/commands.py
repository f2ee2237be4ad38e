"""What each `migrator` command does, as plain functions over the library (the CLI only parses).

Each returns a process exit code: 0 success, 1 the work ran but did not succeed (a run that
failed or did not balance), 2 it could not start (settings, connections, schema).
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from . import demo as demo_data
from . import report as report_mod
from .config import Settings
from .mapping import Mapping
from .options import RunOptions
from .rollback import rollback_run
from .runner import execute_local, plan_run
from .schema import database_url_for, ensure_database, init_db, require_schema

OK, FAILED, CANNOT_START = 0, 1, 2


def _dump(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2, default=str) + "\n")


def cmd_init_db(settings: Settings, out: TextIO = sys.stdout) -> int:
    conn = settings.postgres()
    try:
        for version, action in init_db(conn):
            out.write(f"{version}: {action}\n")
    finally:
        conn.close()
    return OK


def cmd_run(settings: Settings, mapping: Mapping, opts: RunOptions, *, as_json: bool = False,
            out: TextIO = sys.stdout) -> int:
    client, conn = settings.redis(), settings.postgres()
    try:
        require_schema(conn)
        run_id = plan_run(client, conn, mapping, opts, settings.redis_url)
        out.write(f"run {run_id}{' (dry run)' if opts.dry_run else ''}\n")
        out.flush()
        started = time.monotonic()
        outcome = execute_local(client, conn, mapping, run_id, opts)
        report = report_mod.build_report(conn, mapping, run_id)
        report["seconds"] = round(time.monotonic() - started, 3)
        if as_json:
            _dump(report, out)
        else:
            out.write(report_mod.render(report) + f"\n{report['seconds']} s\n")
        return OK if outcome.ok and report["balanced"] else FAILED
    finally:
        conn.close()
        client.close()


def cmd_report(settings: Settings, mapping: Mapping, run_id: str, *, as_json: bool = False,
               out: TextIO = sys.stdout) -> int:
    conn = settings.postgres()
    try:
        report = report_mod.build_report(conn, mapping, run_id)
    finally:
        conn.close()
    _dump(report, out) if as_json else out.write(report_mod.render(report) + "\n")
    return OK if report["balanced"] and report["status"] in ("completed", "dry_run") else FAILED


def cmd_rollback(settings: Settings, mapping: Mapping, run_id: str, out: TextIO = sys.stdout) -> int:
    conn = settings.postgres()
    try:
        summary = rollback_run(conn, mapping, run_id)
    finally:
        conn.close()
    for table, n in summary.items():
        if n["deleted"] or n["restored"]:
            out.write(f"{table}: {n['deleted']} inserted rows deleted, {n['restored']} changed rows restored\n")
    out.write(f"run {run_id} rolled back\n")
    return OK


def cmd_seed_demo(settings: Settings, users: int, *, fresh: bool, malformed: int = 0, out: TextIO = sys.stdout) -> int:
    client = settings.redis()
    try:
        if client.dbsize() and not fresh:
            out.write("the Redis database is not empty; pass --fresh to empty it first (it is flushed!) "
                      "or point --redis-url at an empty database\n")
            return CANNOT_START
        if fresh:
            client.flushdb()
        started = time.monotonic()
        counts = demo_data.seed_demo(client, users, malformed=malformed)
    finally:
        client.close()
    out.write(f"seeded {sum(counts.values()):,} keys for {users:,} users in {time.monotonic() - started:.1f} s\n")
    for name, n in sorted(counts.items()):
        out.write(f"  {name:22} {n:>9,}\n")
    return OK


def cmd_demo(settings: Settings, mapping: Mapping, users: int, database: str, opts: RunOptions,
             out: TextIO = sys.stdout) -> int:
    """Create the demo database, apply the schema, seed the demo keyspace, migrate, report."""
    admin = settings.postgres()
    try:
        if ensure_database(admin, database):
            out.write(f"created database {database}\n")
    finally:
        admin.close()
    demo = Settings(settings.redis_url, database_url_for(settings.database_url, database), settings.broker_url)
    for step in (lambda: cmd_init_db(demo, out),
                 lambda: cmd_seed_demo(demo, users, fresh=True, out=out),
                 lambda: cmd_run(demo, mapping, opts, out=out)):
        code = step()
        if code != OK:
            return code
    return OK
