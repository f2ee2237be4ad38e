"""`migrator backup` against real servers: a restorable pg_dump and RDB, no password anywhere, no half backups.

`redis-cli --rdb` snapshots a whole server, and the shared one holds other sessions' data
(hundreds of MB), so the Redis side is always a server of the test's own.
"""
from __future__ import annotations

import os
import subprocess
from datetime import datetime

import pytest
import redis

from migrator.views.backup import backup, restore_instructions
from migrator.core.config import ConfigError, Settings
from migrator.apps.threadr.demo import seed_demo

from servers import redis_cluster, redis_server, spare_port, with_password

NOW = datetime(2026, 11, 27, 12, 0, 0)
STAMP = "20261127_120000"
REDIS_SECRET = "redis-s3cret"
PG_SECRET = "pg-s3cret"


def keys_of(port: int) -> int:
    with redis.Redis(port=port) as client:
        return client.dbsize()


def test_backup_of_a_seeded_keyspace_restores_both_sides(settings, pg, tmp_path):
    with pg.cursor() as cur:
        cur.execute("INSERT INTO migration_runs (id, status, mapping, source) VALUES (gen_random_uuid(), 'planned', "
                    "'threadr', 'before the backup')")
    pg.commit()
    with redis_server(tmp_path, password=REDIS_SECRET) as port, \
            redis.Redis(port=port, password=REDIS_SECRET) as client:
        seed_demo(client, 50)
        seeded = client.dbsize()
        source = Settings(f"redis://:{REDIS_SECRET}@127.0.0.1:{port}/0", with_password(settings.database_url, PG_SECRET),
                          settings.broker_url)
        result = backup(source, tmp_path / "backups", name="threadr", now=NOW)
        sql, (rdb,) = result.sql, result.rdb

        assert sql.path == tmp_path / "backups" / f"threadr_pre_migration_{STAMP}.sql"
        assert rdb.path == tmp_path / "backups" / f"redis_backup_{STAMP}.rdb"
        dump = sql.path.read_text()
        assert sql.size == len(dump.encode()) > 0 and "PostgreSQL database dump" in dump
        assert "CREATE TABLE public.users" in dump and "before the backup" in dump
        assert rdb.size == rdb.path.stat().st_size > 0 and rdb.path.read_bytes().startswith(b"REDIS")
        assert result.commands[0].startswith("PGPASSWORD=*** ") and result.commands[1].startswith("REDISCLI_AUTH=*** ")
        instructions = restore_instructions(result)
        for shown in (repr(result), *result.commands, instructions):
            assert REDIS_SECRET not in shown and PG_SECRET not in shown

        # what changed since the backup is undone by the printed commands, run as they stand
        with pg.cursor() as cur:
            cur.execute("DELETE FROM migration_runs")
        pg.commit()
        client.flushall()
        client.set("written after the backup", 1)
        postgres, redis_side = instructions.rstrip("\n").split("\n\n")
        for paragraph, secret in ((postgres, {"PGPASSWORD": PG_SECRET}), (redis_side, {"REDISCLI_AUTH": REDIS_SECRET})):
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", paragraph], env={**os.environ, **secret},
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
        with pg.cursor() as cur:
            cur.execute("SELECT source FROM migration_runs")
            assert cur.fetchall() == [("before the backup",)]
        pg.rollback()
        assert client.dbsize() == seeded and not client.exists("written after the backup")


def test_cluster_source_gets_one_rdb_per_master(settings, tmp_path):
    (tmp_path / "cluster").mkdir()
    with redis_cluster(tmp_path / "cluster") as ports:
        with redis.RedisCluster(host="127.0.0.1", port=ports[0]) as client:
            seed_demo(client, 30)
        seeded = sum(map(keys_of, ports))
        result = backup(Settings(f"redis://127.0.0.1:{ports[1]}/0", settings.database_url, settings.broker_url),
                        tmp_path / "backups", name="threadr", now=NOW)
    assert sorted(d.path.name for d in result.rdb) == sorted(f"redis_backup_{STAMP}_127.0.0.1_{p}.rdb" for p in ports)
    restored = 0
    for rdb in result.rdb:
        with redis_server(rdb.path.parent, "--dbfilename", rdb.path.name) as port:
            restored += keys_of(port)
    assert restored == seeded
    instructions = restore_instructions(result)
    assert all(f"redis-cli -h 127.0.0.1 -p {p} SHUTDOWN NOSAVE" in instructions for p in ports)


@pytest.mark.parametrize("port", ["closed", "notaport"])
def test_bad_database_url_raises_without_its_password_and_writes_nothing(settings, tmp_path, port):
    where = spare_port() if port == "closed" else port
    bad = Settings(settings.redis_url, f"postgresql://postgres:{PG_SECRET}@127.0.0.1:{where}/x", settings.broker_url)
    with pytest.raises(ConfigError, match="cannot connect to PostgreSQL") as failure:
        backup(bad, tmp_path, name="threadr")
    assert PG_SECRET not in str(failure.value) and "postgres:***@" in str(failure.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_dump_leaves_no_file_behind(settings, tmp_path):
    # a server that refuses SYNC: pg_dump succeeds first, then redis-cli --rdb fails
    with redis_server(tmp_path, "--rename-command", "SYNC", "", "--rename-command", "PSYNC", "") as port:
        source = Settings(f"redis://127.0.0.1:{port}/0", settings.database_url, settings.broker_url)
        with pytest.raises(ConfigError, match=r"redis-cli failed \(exit 1\): .*unknown command 'SYNC'"):
            backup(source, tmp_path / "backups", name="threadr", now=NOW)
    assert list((tmp_path / "backups").iterdir()) == []


def test_missing_tools_and_unwritable_directories_are_config_errors(settings, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=r"cannot write backups to .*a-file/backups .*choose another directory"):
        backup(settings, tmp_path / "a-file" / "backups", name="threadr")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    with pytest.raises(ConfigError, match=r"pg_dump is not on PATH; install the PostgreSQL client"):
        backup(settings, tmp_path / "backups", name="threadr")
