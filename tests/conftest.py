"""Real services only: a throwaway PostgreSQL database per session and a Redis DB of our own.

MIGRATOR_TEST_ADMIN_URL (default postgresql://postgres@127.0.0.1:5432/postgres) is where the
throwaway database is created; MIGRATOR_TEST_REDIS_URL (default DB 11) is flushed per test.
"""
from __future__ import annotations

import os
import uuid

import psycopg2
import pytest
import redis
from psycopg2 import sql

from migrator import dualwrite, ledger
from migrator.config import Settings
from migrator.log import configure
from migrator.schema import database_url_for, empty_tables, ensure_database, init_db
from migrator.threadr import THREADR
from servers import redis_cluster

# Queues and results of this test session, apart from any other user of the broker. Set before
# anything imports celeryconfig.
os.environ.setdefault("MIGRATOR_QUEUE_PREFIX", f"test{os.getpid()}.")
os.environ.setdefault("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/10")

ADMIN_URL = os.environ.get("MIGRATOR_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("MIGRATOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")



def pytest_configure(config: pytest.Config) -> None:
    configure(json=True, level="WARNING")


@pytest.fixture(scope="session")
def database_url() -> str:
    name = f"migrator_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(ADMIN_URL)
    ensure_database(admin, name)
    url = database_url_for(ADMIN_URL, name)
    conn = psycopg2.connect(url)
    init_db(conn)
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
def settings(database_url: str) -> Settings:
    return Settings(REDIS_URL, database_url, os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"))


@pytest.fixture
def r(settings: Settings) -> redis.Redis:
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
