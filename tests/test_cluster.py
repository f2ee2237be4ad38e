"""A Redis Cluster source: ranges per master, every key once, the same tables as a standalone source."""
from __future__ import annotations

from datetime import datetime

import pytest
import redis
from psycopg2 import sql

from migrator.core import notifications
from migrator.core.config import Settings
from migrator.apps.threadr.demo import seed_demo
from migrator.apps.threadr import THREADR

from helpers import by_pattern, cli, content_fingerprint, migrate, verify
from servers import redis_cluster
from test_follow import Following, changed_user, cut_subscriber, rows, wait_for

NOW = datetime(2026, 11, 27, 12, 0, 0)


def test_cluster_source_migrates_per_master_like_a_standalone_one(settings, r, pg, cluster):
    seeded = seed_demo(r, 400, now=NOW)
    standalone = migrate(settings, ranges=4)
    expected = content_fingerprint(pg)
    with pg.cursor() as cur:
        cur.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(map(sql.Identifier, THREADR.table_names()))))
    pg.commit()

    rc = redis.RedisCluster(host="127.0.0.1", port=cluster[0])
    assert seed_demo(rc, 400, now=NOW) == seeded
    on_cluster = Settings(f"redis://127.0.0.1:{cluster[1]}/0", settings.database_url, settings.broker_url)
    report = migrate(on_cluster, ranges=4)
    assert report["status"] == "completed" and report["balanced"]
    with pg.cursor() as cur:
        cur.execute("SELECT count(DISTINCT node), count(*) FROM migration_batches WHERE run_id = %s", (report["run_id"],))
        assert cur.fetchone() == (3, 3 * 4 * 4)  # masters x ranges x priorities
    pg.rollback()
    counted = {name: p["scanned"] for name, p in by_pattern(report).items()}
    seeded["thread"] += seeded.pop("refused")  # a thread the app's model refuses is a key of the pattern
    assert counted == {name: n for name, n in seeded.items() if n}  # every key once, none twice
    assert by_pattern(report).keys() == by_pattern(standalone).keys()
    assert content_fingerprint(pg) == expected
    rc.close()


@pytest.fixture
def silent_cluster(cluster):
    """The cluster's masters publishing no keyspace notifications (as a cluster is by default), their
    setting put back after."""
    nodes = [redis.Redis(port=port) for port in cluster]
    before = [notifications.current(node) for node in nodes]
    for node in nodes:
        node.config_set(notifications.SETTING, "")
    yield cluster
    for node, value in zip(nodes, before):
        node.config_set(notifications.SETTING, value)
        node.close()


def on_master(node: redis.Redis, pattern: bytes) -> list[bytes]:
    """The keys of `pattern` that live on this master."""
    return sorted(node.scan_iter(match=pattern, count=1000))


def keyspace_line(settings: Settings) -> str:
    """`check`'s line about the keyspace notifications."""
    checked = cli(settings, "check", "--no-workers")
    return next(x for x in checked.stdout.splitlines() if "keyspace events" in x)


def test_follow_subscribes_on_every_master(settings, pg, silent_cluster, tmp_path):
    """Keyspace notifications are node-local in Redis Cluster: `follow` configures and subscribes on
    every master, applies the changes made on each, and repairs what one cut master's subscriber missed."""
    cluster = silent_cluster
    on_cluster = Settings(f"redis://127.0.0.1:{cluster[1]}/0", settings.database_url, settings.broker_url)
    rc = redis.RedisCluster(host="127.0.0.1", port=cluster[0])
    masters = [redis.Redis(port=port) for port in cluster]
    names = sorted(f"127.0.0.1:{port}" for port in cluster)
    follow = None
    try:
        seed_demo(rc, 60, now=NOW)
        run = migrate(on_cluster, ranges=2)
        assert run["status"] == "completed", run["status"]
        lacking = keyspace_line(on_cluster)
        assert lacking.startswith("WARN") and all(f"{name}: ''" in lacking for name in names), lacking

        follow = Following(on_cluster, tmp_path, "--local", "--configure")
        assert all(notifications.missing(notifications.current(node)) == "" for node in masters)
        ready = keyspace_line(on_cluster)
        assert ready.startswith("OK") and all(f"{name}: " in ready for name in names), ready
        assert follow.row(pg)["nodes"] == names

        # on every master: a user changed, a thread deleted
        users = [on_master(node, b"threadr:user:user_*")[0] for node in masters]
        threads = [on_master(node, b"threadr:thread:*")[0] for node in masters]
        for node, user, thread in zip(masters, users, threads):
            changed_user(node, user, role="premium")
            node.delete(thread)
        follow.caught_up(pg, events=6)
        for user, thread in zip(users, threads):
            assert rows(pg, "SELECT role FROM users WHERE source_key = %s", user.decode()) == [("premium",)]
            assert rows(pg, "SELECT count(*) FROM threads WHERE source_key = %s", thread.decode()) == [(0,)]

        # one master's subscriber cut while a change there publishes to nobody: its reconnection
        # alone is counted, and its reconciliation applies the change
        cut, user = masters[2], on_master(masters[2], b"threadr:user:user_*")[1]
        cut.config_set(notifications.SETTING, "")
        changed_user(cut, user, role="premium")
        assert cut_subscriber(cut) == 1
        cut.config_set(notifications.SETTING, "KEA")
        repaired = wait_for(lambda: [x for x in follow.reconciliations(pg) if x["reason"] == "reconnect"], 120)[0]
        assert not repaired["clean"] and repaired["keys_reapplied"] >= 1, repaired
        figures = follow.caught_up(pg)
        assert figures["lag_s"] == 0 and figures["reconnects"] == 1 and figures["unsubscribed"] is None, figures
        assert rows(pg, "SELECT role FROM users WHERE source_key = %s", user.decode()) == [("premium",)]
        verdict = verify(on_cluster, run["run_id"])
        assert verdict["verdict"] == "clean", [(p["pattern"], p["examples"]) for p in verdict["patterns"] if p["examples"]]
        assert follow.stop() == 0, follow.output()
    finally:
        if follow is not None and follow.proc.poll() is None:
            follow.stop()
        rc.close()
        for node in masters:
            node.close()


def failed_over(replica: redis.Redis) -> bool:
    """the replica promoted (a manual failover that does not complete in time is dropped: asked again)"""
    if replica.info("replication")["role"] == "master":
        return True
    replica.execute_command("CLUSTER FAILOVER")
    return False


def test_follow_follows_a_failover(settings, pg, tmp_path):
    """A replica promoted (CLUSTER FAILOVER) is a new master: follow says it does not receive its
    events while it publishes none, subscribes to it once it does, reconciles what it missed there,
    and leaves the old master, a replica now."""
    (tmp_path / "cluster").mkdir()
    with redis_cluster(tmp_path / "cluster", masters=3, replicas=1) as ports:
        nodes = {port: redis.Redis(port=port) for port in ports}
        masters = [port for port, node in nodes.items() if node.info("replication")["role"] == "master"]
        for port in masters:  # the masters alone, as `follow --configure` does
            nodes[port].config_set(notifications.SETTING, "KEA")
        on_cluster = Settings(f"redis://127.0.0.1:{masters[0]}/0", settings.database_url, settings.broker_url)
        rc = redis.RedisCluster(host="127.0.0.1", port=masters[0])
        follow = None
        try:
            seed_demo(rc, 30, now=NOW)
            run = migrate(on_cluster, ranges=1)
            follow = Following(on_cluster, tmp_path, "--local")

            old = masters[2]
            promoted = next(port for port, node in nodes.items()
                            if node.info("replication").get("master_port") == old)
            wait_for(lambda: failed_over(nodes[promoted]), 90, every=5)
            unheard = wait_for(lambda: follow.row(pg)["unsubscribed"], 60)
            assert f"127.0.0.1:{promoted}: notify-keyspace-events is ''" in unheard, unheard
            assert "NOT RECEIVING" in cli(on_cluster, "status", follow.run_id).stdout
            refused = cli(on_cluster, "cutover", "--to", "postgres-primary", "--max-lag", "5")
            assert refused.returncode == 1 and f"not receiving the events of 127.0.0.1:{promoted}" in refused.stdout, \
                refused.stdout + refused.stderr
            user = on_master(nodes[promoted], b"threadr:user:user_*")[0]
            changed_user(nodes[promoted], user, role="premium")  # published to nobody

            nodes[promoted].config_set(notifications.SETTING, "KEA")
            now = sorted(f"127.0.0.1:{port}" for port in [*masters[:2], promoted])
            wait_for(lambda: (row := follow.row(pg))["nodes"] == now and row["unsubscribed"] is None, 60)
            wait_for(lambda: rows(pg, "SELECT role FROM users WHERE source_key = %s", user.decode()) == [("premium",)])
            thread = on_master(nodes[promoted], b"threadr:thread:*")[0]
            nodes[promoted].delete(thread)  # heard now
            wait_for(lambda: rows(pg, "SELECT count(*) FROM threads WHERE source_key = %s", thread.decode()) == [(0,)])
            follow.caught_up(pg)
            verdict = verify(on_cluster, run["run_id"])
            assert verdict["verdict"] == "clean", [(p["pattern"], p["examples"]) for p in verdict["patterns"] if p["examples"]]
            assert follow.stop() == 0, follow.output()
        finally:
            if follow is not None and follow.proc.poll() is None:
                follow.stop()
            rc.close()
            for node in nodes.values():
                node.close()
