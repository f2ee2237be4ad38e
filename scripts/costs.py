"""CPU per key by process for the bench (scripts/bench.py), measured so that other work on a shared
machine does not count: a Redis server of the bench's own, PostgreSQL's backends of the bench's own
database only, and the same-work floor for PostgreSQL (the rows a run wrote, written again into
the same indexed tables as plainly as PostgreSQL allows, with and without each part of the cost).
"""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg2
import redis
from psycopg2 import sql

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _own_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) of one process so far; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class PrivateRedis:
    """A redis-server of the bench's own on a free port: its CPU (INFO cpu) and command counts are the
    bench's alone, where the shared server's also carry every test suite running beside it."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--databases", "16"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.url = f"redis://127.0.0.1:{self.port}/5"
        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit("bench: its own redis-server did not start")
                time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def redis_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the server started (INFO commandstats), e.g. {'scan': 120, 'type': 4000}."""
    return {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in client.info("commandstats").items()}


def redis_cpu(client: redis.Redis) -> float:
    """CPU seconds the Redis server has used so far (INFO cpu: system and user)."""
    info = client.info("cpu")
    return info["used_cpu_sys"] + info["used_cpu_user"]


def quietly(*argv: str) -> None:
    """`migrator ARGV` in this process, its report left out (the commands hold the real stdout:
    its file descriptor is the one pointed elsewhere). The migrator is the one first on sys.path
    when called (scripts/against.py runs an earlier commit's so)."""
    from migrator.cli.main import main as migrator

    sys.stdout.flush()
    kept = os.dup(1)
    try:
        with open(os.devnull, "w") as quiet:
            os.dup2(quiet.fileno(), 1)
            migrator(["--log-level", "WARNING", *argv])
            sys.stdout.flush()
    finally:
        os.dup2(kept, 1)
        os.close(kept)


class BackendCpu:
    """CPU seconds of the PostgreSQL backends connected to one database, sampled from /proc while they
    live (a backend's time moves to the postmaster, mixed with every other database's, once it
    exits). A backend's last slice before it exits (under one sampling interval) is missed."""

    EVERY_S = 0.1

    def __init__(self, database_url: str) -> None:
        self.conn = psycopg2.connect(database_url)
        self.conn.autocommit = True
        self.seen: dict[tuple[int, Any], float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        with self.conn.cursor() as cur:
            cur.execute("SELECT pid, backend_start FROM pg_stat_activity WHERE datname = current_database()"
                        " AND pid <> pg_backend_pid()")
            backends = cur.fetchall()
        for pid, started in backends:  # (a pid with its start: a reused pid is another backend)
            cpu = _own_cpu(pid)
            if cpu is not None:
                with self.lock:
                    self.seen[(pid, started)] = cpu

    def _loop(self) -> None:
        while not self.stop.wait(self.EVERY_S):
            self._sample()

    def total(self) -> float:
        """CPU seconds so far of every backend seen (sampled now first)."""
        self._sample()
        with self.lock:
            return sum(self.seen.values())

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.conn.close()


# --- the same-work floor for PostgreSQL ---------------------------------------------------

def snapshot(conn: Any, tables: list[str]) -> dict[str, bytes]:
    """The rows of `tables` as COPY text, to be written again."""
    rows = {}
    with conn, conn.cursor() as cur:
        for table in tables:
            buf = io.BytesIO()
            cur.copy_expert(sql.SQL("COPY {} TO STDOUT").format(sql.Identifier(table)).as_string(cur), buf)
            rows[table] = buf.getvalue()
    return rows


# Where PostgreSQL's time goes: the floor, then the floor with or without one part. A trigger is
# enabled alone, by the function it runs (`init-db` puts both on every table a run writes).
VARIANTS = {
    "same-work floor (COPY to unlogged staging, INSERT ... ON CONFLICT per table)": {},
    "+ journal trigger": {"triggers": ("migrator_journal()",)},
    "+ seal trigger": {"triggers": ("migrator_unseal()",)},
    "plain INSERT, no upsert": {"insert": True},
    "without secondary indexes": {"bare": True},
    "unlogged tables (no WAL)": {"unlogged": True},
}


def _primary_key(cur: Any, table: str) -> list[str]:
    cur.execute("SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
                " WHERE i.indrelid = to_regclass(%s) AND i.indisprimary", (table,))
    return [name for (name,) in cur.fetchall()]


def _columns(cur: Any, table: str) -> list[str]:
    cur.execute("SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped"
                " ORDER BY attnum", (table,))
    return [name for (name,) in cur.fetchall()]


def _secondary_indexes(cur: Any, table: str) -> list[tuple[str, str]]:
    """(name, definition) of the indexes of `table` that back no constraint."""
    cur.execute("SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE i.indrelid = to_regclass(%s) AND NOT EXISTS (SELECT FROM pg_constraint k WHERE k.conindid = i.indexrelid)",
                (table,))
    return cur.fetchall()


# Every write goes in a session as a run's bulk batch is (migrator/core/sql/001_ledger.sql, 018_row_seal.sql),
# so that a trigger costs what it costs a run: the journal trigger keeps the prior image of what a session
# naming its run changes; the seal trigger leaves alone the rows of a write that vouches for them (in any
# other session it would fire on every row, taking its seal away, which no run's write makes it do).
RUN_SESSION = ("SELECT set_config('migrator.run_id', gen_random_uuid()::text, false),"
               " set_config('migrator.sealing', 'on', false)")


def prepare(cur: Any, tables: list[str], variant: dict[str, Any]) -> list[str]:
    """Make `tables` as `variant` writes into them: only its triggers enabled, unlogged, or without their
    secondary indexes; returns the definitions of the indexes dropped (restore puts them back)."""
    dropped = []
    for table in tables:
        ident = sql.Identifier(table)
        cur.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(ident))
        cur.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND tgfoid = ANY(%s::regprocedure[])",
                    (table, list(variant.get("triggers", ()))))
        for (trigger,) in cur.fetchall():
            cur.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER {}").format(ident, sql.Identifier(trigger)))
        if variant.get("unlogged"):
            cur.execute(sql.SQL("ALTER TABLE {} SET UNLOGGED").format(ident))
        if variant.get("bare"):
            for index, definition in _secondary_indexes(cur, table):
                cur.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index)))
                dropped.append(definition)
    return dropped


def restore(cur: Any, tables: list[str], variant: dict[str, Any], dropped: list[str]) -> None:
    """`tables` as they were before prepare."""
    for table in tables:
        ident = sql.Identifier(table)
        cur.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER USER").format(ident))
        if variant.get("unlogged"):
            cur.execute(sql.SQL("ALTER TABLE {} SET LOGGED").format(ident))
    for definition in dropped:
        cur.execute(definition)


def write_plainly(conn: Any, tables: list[str], rows: dict[str, bytes], *, insert: bool = False) -> None:
    """The same rows into the same tables as plainly as PostgreSQL allows, a transaction per table:
    COPY into an unlogged staging table, then one INSERT ... ON CONFLICT DO UPDATE of every column
    (`insert`: a plain INSERT)."""
    for table in tables:
        if not rows[table]:
            continue
        with conn, conn.cursor() as cur:
            columns = _columns(cur, table)
            key = _primary_key(cur, table)
            stage = sql.Identifier(f"stage_{table}")
            cur.execute(sql.SQL("CREATE UNLOGGED TABLE {} (LIKE {})").format(stage, sql.Identifier(table)))
            cur.copy_expert(sql.SQL("COPY {} FROM STDIN").format(stage).as_string(cur), io.BytesIO(rows[table]))
            upsert = sql.SQL("") if insert else sql.SQL(" ON CONFLICT ({}) DO UPDATE SET {}").format(
                sql.SQL(", ").join(map(sql.Identifier, key)),
                sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in columns if c not in key))
            cur.execute(sql.SQL("INSERT INTO {} SELECT * FROM {}").format(sql.Identifier(table), stage) + upsert)
            cur.execute(sql.SQL("DROP TABLE {}").format(stage))


ROUNDS = 3  # each variant this many times, interleaved; its least CPU counts (others' load only ever adds)


def same_work_floor(database_url: str, tables: list[str], rows: dict[str, bytes], cpu: BackendCpu,
                    truncate: list[str], rounds: int = ROUNDS) -> dict[str, float]:
    """PostgreSQL CPU seconds of writing `rows` plainly, per variant of VARIANTS (the least of `rounds`);
    every table in `truncate` emptied before each, and everything put back as it was after."""
    conn = psycopg2.connect(database_url)
    emptied = sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(map(sql.Identifier, truncate)))
    out: dict[str, float] = {}
    try:
        with conn, conn.cursor() as cur:
            cur.execute(RUN_SESSION)
        # once first, not counted: the first write into the tables pays for what the next ones find
        # ready (catalog caches, the relations' files extended), which would flatter every variant after it
        for name, variant in [("warm-up", {}), *list(VARIANTS.items()) * rounds]:
            with conn, conn.cursor() as cur:
                cur.execute(emptied)
                dropped = prepare(cur, tables, variant)
            before = cpu.total()
            write_plainly(conn, tables, rows, insert=bool(variant.get("insert")))
            if name != "warm-up":
                out[name] = min(out.get(name, float("inf")), cpu.total() - before)
            with conn, conn.cursor() as cur:
                cur.execute(emptied)
                restore(cur, tables, variant, dropped)
    finally:
        conn.close()
    return out
