"""The spool (migrator/core/spool.py): one SCAN pass per run, its keys read by the later passes.

SCAN calls are counted on a redis-server of the test's own (INFO commandstats), so that no other
suite's traffic is in the count.
"""
from __future__ import annotations


import psycopg2
import pytest
import redis

from migrator.apps.threadr.demo import seed_demo
from migrator.core import ledger, spool
from migrator.core.config import Settings
from migrator.core.partition import KeyRange
from migrator.views.status import spool_note
from servers import redis_server
from helpers import grants_after_critical_batches, migrate, verify


@pytest.fixture
def private(settings, tmp_path):
    """Settings whose Redis is a server of this test's own, and a client of it."""
    with redis_server(tmp_path) as port, redis.Redis(port=port) as client:
        yield Settings(f"redis://127.0.0.1:{port}/0", settings.database_url, settings.broker_url), client


def scan_calls(client: redis.Redis) -> int:
    return client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)


def one_pass(client: redis.Redis) -> int:
    """The SCAN calls one walk of the whole keyspace takes (COUNT 1000, a run's default)."""
    before = scan_calls(client)
    for _ in client.scan_iter(count=1000):
        pass
    return scan_calls(client) - before


def spooled(pg, run_id: str) -> dict[str, int]:
    with pg, pg.cursor() as cur:
        return ledger.spool_size(cur, run_id)


def test_pack_and_unpack_keep_any_bytes_in_order():
    keys = [b"", b"a", "é:ü".encode(), bytes(range(256)), b"\x00" * 70_000]
    assert spool.unpack(*spool.pack(keys)) == keys
    assert spool.unpack(*spool.pack([])) == []


def test_a_run_scans_the_keyspace_once_and_its_later_passes_read_the_spool(private, pg):
    settings, client = private
    seed_demo(client, 300)
    single = one_pass(client)
    client.config_resetstat()
    report = migrate(settings, ranges=2)
    assert report["status"] == "completed"
    spooled_calls = scan_calls(client)
    # one pass's worth (the ranges' probes at their ends add a few calls), not one per priority and validation
    assert single <= spooled_calls <= 2 * single
    assert spooled(pg, report["run_id"])["ranges"] == 0  # dropped once the run completed

    client.config_resetstat()
    again = migrate(settings, ranges=2, scan_each_priority=True)
    assert again["status"] == "completed"
    assert scan_calls(client) >= 7 * single  # the former way: a SCAN per priority's batches and validation
    assert again["totals"] == report["totals"]

    client.config_resetstat()
    assert verify(settings, report["run_id"])["verdict"] == "clean"
    assert scan_calls(client) >= single  # `migrator verify` SCANs: the independent check


def test_a_key_written_after_the_spool_pass_is_missing_for_verify_and_taken_by_a_second_run(settings, r, pg,
                                                                                            monkeypatch):
    """Grants that appear after critical's batches: the run no longer sees them (its validation reads
    the spool, and completes); `migrator verify` SCANs and reports them missing; a second run takes them."""
    seed_demo(r, 60)
    grants_after_critical_batches(monkeypatch, r, lambda i: {"duration_days": i + 1})  # (a grant each)
    report = migrate(settings)
    assert report["status"] == "completed"
    found = verify(settings, report["run_id"])
    assert found["verdict"] == "differences" and found["missing"] == 30
    premium = next(p for p in found["patterns"] if p["pattern"] == "premium_ip")
    assert premium["missing"] == 30 and premium["spooled"] == 0

    second = migrate(settings)
    assert second["status"] == "completed"
    assert verify(settings, second["run_id"])["verdict"] == "clean"


def test_the_in_run_validation_from_the_spool_still_finds_a_deleted_and_a_changed_row(settings, r, pg, monkeypatch):
    """Damage between critical's batches and its validation (which reads the spool) fails critical."""
    import migrator.execution.finalize

    seed_demo(r, 60)
    real_link = migrator.execution.finalize.link_rows

    def link_then_damage(conn, mapping, run_id):
        linked = real_link(conn, mapping, run_id)
        with conn, conn.cursor() as cur:
            cur.execute("DELETE FROM subscriptions WHERE id = (SELECT id FROM subscriptions"
                        " WHERE kind = 'premium_grant' ORDER BY id LIMIT 1)")
            cur.execute("UPDATE subscriptions SET plan = 'tampered' WHERE id = (SELECT id FROM subscriptions"
                        " WHERE kind = 'premium_grant' ORDER BY id DESC LIMIT 1)")
        return linked

    monkeypatch.setattr(migrator.execution.finalize, "link_rows", link_then_damage)
    report = migrate(settings)
    assert report["status"] == "rolled_back"
    with pg.cursor() as cur:
        cur.execute("SELECT checks FROM migration_validations WHERE run_id = %s AND priority = 'critical'",
                    (report["run_id"],))
        (checks,) = cur.fetchone()
        # (the full one that follows the seals' check, which the damage broke)
        cur.execute("SELECT result FROM migration_verifications WHERE run_id = %s AND from_spool AND compare",
                    (report["run_id"],))
        (result,) = cur.fetchone()
    assert not {c["name"]: c for c in checks}["verification"]["ok"]
    assert result["missing"] >= 1 and result["different"] >= 1
    assert all(p["spooled"] == p["keys"] for p in result["patterns"])  # its keys came from the spool
    assert spooled(pg, report["run_id"])["ranges"] == 0  # and a rolled back run's spool is dropped


def test_a_retried_first_batch_leaves_one_copy_of_its_spool(settings, r, pg, monkeypatch):
    """The first priority's batch fails once after recording its spool (a lost connection as it
    ends) and is retried: its range's spool holds every key once, and the later passes read it."""
    import migrator.core.batch
    import migrator.execution.finalize

    seed_demo(r, 60)
    keys = r.dbsize()
    real_finish, real_figures = ledger.finish_batch, migrator.execution.finalize.figure_checks
    failed, kept = [], {}

    def finish_or_fail_once(cur, batch_id, *args):
        if not failed:
            failed.append(batch_id)
            raise psycopg2.OperationalError("connection lost (the test's)")
        return real_finish(cur, batch_id, *args)

    def spool_then_figures(conn, mapping, opts):  # after the last priority, before the run completes
        with conn, conn.cursor() as cur:
            run_id = ledger.latest_run(cur)
            kept.update(ledger.spool_size(cur, run_id))
            walked, chunks = ledger.read_spool(cur, run_id, KeyRange.split(1)[0], "low", spool.source_process(r))
            kept["low"], kept["walked"] = sum(n for n, _, _ in chunks), walked
        return real_figures(conn, mapping, opts)

    monkeypatch.setattr(migrator.core.batch.ledger, "finish_batch", finish_or_fail_once)
    monkeypatch.setattr(migrator.execution.finalize, "figure_checks", spool_then_figures)
    report = migrate(settings, ranges=1)
    assert failed and report["status"] == "completed"
    # low counts the unmapped keys: its list is the whole keyspace, once
    assert kept["ranges"] == 1 and kept["low"] == kept["walked"] == keys
    (note,) = spool_note(kept)  # what `status` says while the spool exists
    assert f"{kept['keys']:,} key names of 1 range(s)" in note and "VACUUM FULL migration_spool" in note
    assert spooled(pg, report["run_id"])["ranges"] == 0


def test_a_spool_of_another_server_process_is_not_read_and_the_next_batch_scans_again(private, pg, monkeypatch):
    """A Redis restart (another run_id) reshuffles the cursor order: a spool taken before it is not
    read. Critical's spool is made another process's once its batches are in: critical's validation
    and high's batches SCAN (high's record a new spool), and the passes after them read that one."""
    import migrator.execution.finalize

    settings, client = private
    seed_demo(client, 300)
    client.config_resetstat()
    assert migrate(settings, ranges=2)["status"] == "completed"
    single = scan_calls(client)  # one pass over two ranges, their probes included
    real_link = migrator.execution.finalize.link_rows
    calls = []

    def link_then_restart(conn, mapping, run_id):
        calls.append(run_id)
        if len(calls) == 1:
            with conn, conn.cursor() as cur:
                cur.execute("UPDATE migration_spool_ranges SET source_process = 'before a restart' WHERE run_id = %s",
                            (run_id,))
        return real_link(conn, mapping, run_id)

    monkeypatch.setattr(migrator.execution.finalize, "link_rows", link_then_restart)
    client.config_resetstat()
    # (one validation pass per priority: the sealed default re-reads critical, whose grants two keys give)
    report = migrate(settings, ranges=2, validation="reread")
    assert report["status"] == "completed"
    assert scan_calls(client) == 3 * single  # critical's batches, its validation, high's batches
    with pg, pg.cursor() as cur:
        cur.execute("SELECT priorities[1], result -> 'totals' ->> 'spooled', result -> 'totals' ->> 'keys'"
                    " FROM migration_verifications WHERE run_id = %s ORDER BY id", (report["run_id"],))
        spooled_keys = {priority: (int(n), int(keys)) for priority, n, keys in cur.fetchall()}
    assert spooled_keys["critical"][0] == 0 < spooled_keys["critical"][1]
    later = [counts for p, counts in spooled_keys.items() if p != "critical"]
    assert all(n == keys for n, keys in later) and sum(n for n, _ in later) > 0
