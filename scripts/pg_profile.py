"""Where PostgreSQL's CPU goes in one run, by statement: the bench's figure (scripts/bench.py) taken apart.

    .venv/bin/python scripts/pg_profile.py                 # about 100,000 keys
    .venv/bin/python scripts/pg_profile.py --keys 30000 --top 15

Seeds the demo keyspace into a redis-server of its own, runs `migrator run --local --jobs 1` into a
throwaway database and then `migrator verify RUN --local --jobs 1`, both in this process, and
prints, for each, PostgreSQL's CPU per key by kind of statement: each statement's cost is its
backend's CPU time across it (/proc/PID/schedstat, in nanoseconds), so a server of this machine
only. A kind is a statement's start (`migrator_write` and `migrator_compare` by name: every
upsert, and every comparison of the validation, goes through them).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import psycopg2
import psycopg2.extensions

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from costs import quietly  # noqa: E402
from demo_keyspace import demo_keyspace  # noqa: E402
from migrator.core import ledger  # noqa: E402
# per kind of statement: [calls, CPU seconds of their backend]
SPENT: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])


def backend_cpu(pid: int) -> float:
    """CPU seconds a backend of this machine's server has used so far."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def kind(text: str) -> str:
    """What a statement is, for grouping: the engine's function it calls, or its first words."""
    called = re.match(r"\s*SELECT \* FROM (migrator_\w+)", text)
    return called.group(1) if called else re.sub(r"\s+", " ", text.strip())[:90]


class ProfiledCursor(psycopg2.extensions.cursor):
    def _timed(self, query: Any, call: Callable[[], Any]) -> Any:
        pid = self.connection.get_backend_pid()
        before = backend_cpu(pid)
        try:
            return call()
        finally:
            text = query.as_string(self) if hasattr(query, "as_string") else query
            spent = SPENT[kind(text.decode(errors="replace") if isinstance(text, bytes) else text)]
            spent[0] += 1
            spent[1] += backend_cpu(pid) - before

    def execute(self, query: Any, args: Any = None) -> Any:
        return self._timed(query, lambda: super(ProfiledCursor, self).execute(query, args))

    def copy_expert(self, query: Any, file: Any, size: int = 8192) -> Any:
        return self._timed(query, lambda: super(ProfiledCursor, self).copy_expert(query, file, size))


class ProfiledConnection(psycopg2.extensions.connection):
    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs.get("name"):  # (a named cursor's work is in its fetches: not counted)
            kwargs.setdefault("cursor_factory", ProfiledCursor)
        return super().cursor(*args, **kwargs)


def show(title: str, keys: int, top: int) -> None:
    total = sum(cpu for _, cpu in SPENT.values())
    print(f"\n{title}: PostgreSQL CPU {total * 1e6 / keys:.1f} µs per key ({keys:,} keys)")
    for name, (n, cpu) in sorted(SPENT.items(), key=lambda s: -s[1][1])[:top]:
        print(f"{cpu * 1e6 / keys:8.2f} µs/key {int(n):6,} calls  {name}")
    SPENT.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=100_000, help="about this many keys (default 100,000)")
    parser.add_argument("--top", type=int, default=25, help="kinds of statement shown (default 25)")
    args = parser.parse_args()
    connect = psycopg2.connect
    with demo_keyspace("pg_profile", args.keys) as (url, source_url, client):
        keys = client.dbsize()
        os.environ.update(REDIS_URL=source_url, DATABASE_URL=url)
        psycopg2.connect = lambda *a, **k: connect(*a, connection_factory=ProfiledConnection, **k)
        try:
            print(f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
            quietly("run", "--local", "--jobs", "1", "--json", "--output-dir", tempfile.gettempdir())
            show("run --local --jobs 1", keys, args.top)
            conn = connect(url)
            with conn, conn.cursor() as cur:
                run_id = ledger.latest_run(cur)
            conn.close()
            quietly("verify", run_id, "--local", "--jobs", "1", "--json")
            show("verify --local --jobs 1 of that run", keys, args.top)
            print(f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
        finally:
            psycopg2.connect = connect

if __name__ == "__main__":
    main()
