"""Real services only: a throwaway PostgreSQL database per session and a Redis DB of our own.

MIGRATOR_TEST_ADMIN_URL (default postgresql://postgres@127.0.0.1:5432/postgres) is where the
throwaway database is created. The session claims a Redis database that is empty, or that an
earlier session of this suite filled (MIGRATOR_TEST_REDIS_URL names one; by default the first
free of DB 11, 9, 8, ... of 127.0.0.1:6379), and empties it before each test: never a database
holding keys the suite did not write. Claims live in the registry database (DB 10 of the same
server, beside the test results), so sessions running at once each get their own.
"""
from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit, urlunsplit

# Set before migrator and celeryconfig are imported; the session's worker processes inherit them.
# Queues and results of this test session, apart from any other user of the broker:
os.environ.setdefault("MIGRATOR_QUEUE_PREFIX", f"test{os.getpid()}.")
os.environ.setdefault("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/10")
# a batch beats every second, so one whose worker is gone is stale after 6 s, not 30:
os.environ.setdefault("MIGRATOR_HEARTBEAT_SECONDS", "1")

import psycopg2  # noqa: E402
import pytest  # noqa: E402
import redis  # noqa: E402
from psycopg2 import sql  # noqa: E402

from migrator.cutover import dualwrite  # noqa: E402
from migrator.core import ledger
from migrator.core.config import Settings  # noqa: E402
from migrator.core.log import configure  # noqa: E402
from migrator.core.schema import database_url_for, empty_tables, ensure_database, init_db  # noqa: E402
from migrator.apps.threadr import THREADR  # noqa: E402
from helpers import Workers, worker_env  # noqa: E402
from servers import redis_cluster  # noqa: E402

ADMIN_URL = os.environ.get("MIGRATOR_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("MIGRATOR_TEST_REDIS_URL", "")  # the claimed one, once the session has it
LOCAL_CANDIDATES = [f"redis://127.0.0.1:6379/{n}" for n in (11, 9, 8, 7, 6, 4, 3, 2, 1, 13)]
REDIS_CANDIDATES = [REDIS_URL] if REDIS_URL else LOCAL_CANDIDATES
REGISTRY_DB = 10
FILLED = "migrator-tests:filled"  # databases a session of this suite wrote into (and may empty)
CLAIM_SECONDS = 3600  # a killed session's claim lapses after this; each test renews it
TOKEN = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _registry(url: str) -> redis.Redis:
    parts = urlsplit(url)
    return redis.Redis.from_url(urlunsplit(parts._replace(path=f"/{REGISTRY_DB}")))


def _claim_key(url: str) -> str:
    return f"migrator-tests:claim:{url}"


def claim_redis_db(candidates: list[str] = REDIS_CANDIDATES) -> str:
    """A Redis database for this session alone: empty, or filled by an earlier session of this
    suite; refuses (ending the session) when every candidate holds someone else's keys."""
    refused = []
    for url in candidates:
        registry = _registry(url)
        if not registry.set(_claim_key(url), TOKEN, nx=True, ex=CLAIM_SECONDS):
            continue  # another session runs on it now
        with redis.Redis.from_url(url) as client:
            keys = client.dbsize()
        if keys == 0 or registry.sismember(FILLED, url):
            registry.sadd(FILLED, url)
            return url
        registry.delete(_claim_key(url))
        refused.append(f"{url} ({keys:,} keys)")
    pytest.exit("no Redis database for the tests: " + ", ".join(refused or ["every candidate is claimed"])
                + " hold keys this suite did not write, and it never empties those. Point MIGRATOR_TEST_REDIS_URL at an"
                " empty database, or empty one of them yourself if its keys are yours (redis-cli -n N FLUSHDB)",
                returncode=2)


@pytest.fixture(scope="session")
def redis_url() -> str:
    global REDIS_URL
    REDIS_URL = claim_redis_db()
    yield REDIS_URL
    release_redis_db(REDIS_URL)


@pytest.fixture
def spare_redis_url(redis_url: str) -> str:
    """A second Redis database of this session's, for a test that needs one beside the source (a
    Redis broker): claimed like the first among the local candidates, emptied and given back after."""
    url = claim_redis_db([url for url in LOCAL_CANDIDATES if url != redis_url])
    yield url
    release_redis_db(url)


def release_redis_db(url: str) -> None:
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    registry = _registry(url)
    registry.srem(FILLED, url)  # empty again: anyone's
    if registry.get(_claim_key(url)) == TOKEN.encode():
        registry.delete(_claim_key(url))


def pytest_configure(config: pytest.Config) -> None:
    configure(json=True, level="WARNING")


@pytest.fixture(scope="session")
def database_url() -> str:
    name = f"migrator_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(ADMIN_URL)
    ensure_database(admin, name)
    url = database_url_for(ADMIN_URL, name)
    conn = psycopg2.connect(url)
    init_db(conn, THREADR)
    conn.close()
    yield url
    with admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
    admin.close()


@pytest.fixture(scope="session")
def cluster_ports(tmp_path_factory):
    """Three Redis Cluster masters of our own on spare ports (the shared Redis is standalone)."""
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as ports:
        yield ports


@pytest.fixture
def cluster(cluster_ports):
    """The cluster's ports, every master emptied first."""
    for port in cluster_ports:
        with redis.Redis(port=port) as node:
            node.flushall()
    return cluster_ports


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str) -> Settings:
    return Settings(redis_url, database_url, os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"))


@pytest.fixture
def r(settings: Settings) -> redis.Redis:
    """The session's Redis database, emptied (it is ours: see claim_redis_db)."""
    _registry(settings.redis_url).expire(_claim_key(settings.redis_url), CLAIM_SECONDS)
    client = redis.Redis.from_url(settings.redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def pg(settings: Settings):
    """A connection to the session database, emptied of data and ledger before each test."""
    conn = psycopg2.connect(settings.database_url)
    empty_tables(conn, [*THREADR.table_names(), *ledger.TABLES, *dualwrite.TABLES])
    yield conn
    conn.close()


@pytest.fixture
def parts(monkeypatch):
    """The parts each key was read in, by the batches and by the verification (key -> count): the real
    reader, counted as it yields."""
    import migrator.core.batch
    import migrator.core.verify

    seen: dict[bytes, int] = {}

    def counting(real):
        def read_parts(client, first):
            for part in real(client, first):
                seen[first.key] = seen.get(first.key, 0) + 1
                yield part
        return read_parts

    monkeypatch.setattr(migrator.core.batch, "read_parts", counting(migrator.core.batch.read_parts))
    monkeypatch.setattr(migrator.core.verify, "read_parts", counting(migrator.core.verify.read_parts))
    return seen


@pytest.fixture(scope="module")
def workers(settings, tmp_path_factory):
    """Two worker processes of this session (w1, w2) for a test module, on the shared services."""
    pool = Workers(worker_env(settings), tmp_path_factory.mktemp("workers"))
    pool.start("w1")
    pool.start("w2")
    yield pool
    pool.stop_all()
    from workers.celery import delete_queues

    delete_queues()  # leave nothing behind on the shared broker
