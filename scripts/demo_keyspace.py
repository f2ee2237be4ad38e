"""The demo keyspace in a redis-server of its own and a throwaway database with Threadr's schema:
what scripts/pg_profile.py, write_variants.py and seal_cost.py each measure a run over."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psycopg2
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from costs import PrivateRedis  # noqa: E402
from migrator.apps.threadr import THREADR  # noqa: E402
from migrator.apps.threadr.demo import seed_demo  # noqa: E402
from migrator.core.schema import database_url_for, ensure_database, init_db  # noqa: E402

KEYS_PER_USER = 13.9  # what the demo generator writes per user (as scripts/bench.py)


@contextmanager
def demo_keyspace(label: str, keys: int) -> Iterator[tuple[str, str, redis.Redis]]:
    """(database URL, Redis URL, client) of about `keys` demo keys in a private Redis and an
    initialised throwaway database named for `label`; both gone afterwards."""
    admin_url = os.environ.get("MIGRATOR_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"migrator_{label}_{os.getpid()}"
    admin = psycopg2.connect(admin_url)
    ensure_database(admin, name)
    url = database_url_for(admin_url, name)
    source = PrivateRedis()
    try:
        conn = psycopg2.connect(url)
        init_db(conn, THREADR)
        conn.close()
        client = redis.Redis.from_url(source.url)
        seed_demo(client, max(1, int(keys / KEYS_PER_USER)))
        yield url, source.url, client
    finally:
        source.close()
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()
