"""The spool (migrator/core/spool.py): one SCAN pass per run, its keys read by the later passes.

SCAN calls are counted on a redis-server of the test's own (INFO commandstats), so that no other
suite's traffic is in the count.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import psycopg2
import pytest
import redis

from migrator.apps.threadr import THREADR
from migrator.apps.threadr.demo import seed_demo
from migrator.core import ledger, spool
from migrator.core.config import Settings
from migrator.core.mapping import UNMAPPED, Priority
from migrator.core.options import RunOptions
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
            kept["low_keys"] = sum(1 for k in r.scan_iter() if THREADR.pattern_of(k.decode(errors="replace"))[0]
                                   in (None, *THREADR.select([Priority.LOW], None, None)))
        return real_figures(conn, mapping, opts)

    monkeypatch.setattr(migrator.core.batch.ledger, "finish_batch", finish_or_fail_once)
    monkeypatch.setattr(migrator.execution.finalize, "figure_checks", spool_then_figures)
    report = migrate(settings, ranges=1)
    assert failed and report["status"] == "completed"
    # each key is kept once, in the list of the pass that acts on it: low's holds its own and the unmapped
    assert kept["ranges"] == 1 and kept["keys"] == kept["walked"] == keys
    assert kept["low"] == kept["low_keys"] < keys
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


def test_a_spooled_chunk_counts_each_distinct_key_once_by_its_pattern_as_a_walk_classifies_it():
    """The recorder's counts per chunk: a key SCAN returns twice is kept and counted once, an
    unmapped one (non-UTF-8 included, and one under another priority's prefix) as UNMAPPED in the
    list of the priority that counts those, the others by their pattern in their own priority's list
    alone; with a --pattern filter, a key no pass acts on is kept nowhere."""
    user, bad_user, stray = b"threadr:user:user_1", b"threadr:user:user_\xff", b"bad\xff\xfeutf8"
    usage_log, odd_usage = b"threadr:usage:log:10.0.0.1:1796188802.17", b"threadr:usage:what"

    def recorded(opts: RunOptions) -> dict[str, tuple]:
        recorder = spool.Recorder(spool.routes(THREADR, opts), THREADR)
        recorder.add([user, stray, user, usage_log])
        recorder.add([bad_user, user, odd_usage])
        recorder.close()
        assert recorder.walked == 7
        return {label: (keys, spool.unpack(lengths, packed), counts) for label, _, keys, lengths, packed, counts
                in recorder.chunks}

    unmapped = THREADR.unmapped_priority.label
    assert THREADR.named("user")[0].priority == Priority.HIGH != THREADR.unmapped_priority
    assert recorded(RunOptions()) == {"high": (2, [user, bad_user], {"user": 2}),
                                      unmapped: (3, [stray, usage_log, odd_usage], {UNMAPPED: 2, "usage_log": 1})}
    assert recorded(RunOptions(patterns=("user",))) == {"high": (2, [user, bad_user], {"user": 2})}


def _validated(settings, pg, *, erase_counts: bool, drop_from: str | None = None) -> dict[str, Any]:
    """A run's (ranges=2) validations: per priority and whether it compared, its patterns' keys,
    spooled and skipped and its ranges' keys walked; the keys each kind of validation walked one by
    one; its checks. `erase_counts`: its spool's counts are taken away before each validation (a
    spool saved without them: the keys are walked); `drop_from`: that priority's batches are given
    their spool without half its keys (a batch that took fewer keys than the spool holds)."""
    import migrator.core.verify
    import migrator.execution.finalize

    real_link, real_read, real_feed = (migrator.execution.finalize.link_rows, ledger.read_spool,
                                       migrator.core.verify.RangeVerifier.feed)
    fed = {True: 0, False: 0}

    def link_then_erase(conn, mapping, run_id):
        with conn, conn.cursor() as cur:
            cur.execute("UPDATE migration_spool SET counts = NULL WHERE run_id = %s", (run_id,))
        return real_link(conn, mapping, run_id)

    def read_short(cur, run_id, key_range, priority, process):
        found = real_read(cur, run_id, key_range, priority, process)
        if found is None or priority != drop_from:
            return found
        walked, chunks = found
        kept = [spool.unpack(lengths, packed)[::2] for _, lengths, packed in chunks]
        return walked, [(len(keys), *spool.pack(keys)) for keys in kept]

    def counting_feed(self, keys):
        fed[self.compare] += len(keys)
        return real_feed(self, keys)

    with pytest.MonkeyPatch.context() as patched:  # (undone after the run: a second run wraps the originals)
        if erase_counts:
            patched.setattr(migrator.execution.finalize, "link_rows", link_then_erase)
        patched.setattr(ledger, "read_spool", read_short)
        patched.setattr(migrator.core.verify.RangeVerifier, "feed", counting_feed)
        report = migrate(settings, ranges=2)
    with pg, pg.cursor() as cur:
        cur.execute("SELECT v.priorities[1], v.compare, v.result, (SELECT sum(keys_walked) FROM migration_verify_ranges"
                    " WHERE verification_id = v.id) FROM migration_verifications v WHERE v.run_id = %s",
                    (report["run_id"],))
        found = {(priority, compare): ({p["pattern"]: (p["keys"], p["spooled"], p["skipped"]) for p in result["patterns"]},
                                       int(walked)) for priority, compare, result, walked in cur.fetchall()}
        cur.execute("SELECT priority, checks FROM migration_validations WHERE run_id = %s", (report["run_id"],))
        checks = {priority: {c["name"]: c for c in checks} for priority, checks in cur.fetchall()}
    return {"status": report["status"], "verifications": found, "fed": fed, "checks": checks}


@pytest.mark.parametrize("hostile", [False, True], ids=["demo", "unmapped-skipped-non-utf8"])
def test_a_sealed_validation_takes_its_counts_from_the_spool_s_chunks_with_the_numbers_of_walking_its_keys(
        settings, r, pg, hostile):
    """The sealed validations of a run count no key one by one (only critical's full re-read, which
    its grants two keys give ask for, walks its keys), and report what walking them reports."""
    now = datetime.now(timezone.utc)

    def seed():  # the same keys and values each time
        r.flushdb()
        seed_demo(r, 120, now=now)
        if hostile:  # unmapped keys, one not UTF-8 and one with a NUL (read back from the spool by low's batches)
            r.mset({b"bad\xff\xfeutf8": b"x", b"nul\x00x": b"x"})
            r.mset({f"stray:{i}": "x" for i in range(40)})

    seed()
    counted = _validated(settings, pg, erase_counts=False)
    seed()
    walked = _validated(settings, pg, erase_counts=True)  # (a second run: its rows written again)
    assert counted["status"] == walked["status"] == "completed"
    assert counted["verifications"] == walked["verifications"]
    assert counted["fed"][False] == 0 < walked["fed"][False]  # the sealed ones: counts, or each key walked
    assert counted["fed"][True] == walked["fed"][True] > 0  # critical's re-read walks its keys either way
    assert all(counted["checks"][p.label]["source_counts"]["ok"] for p in RunOptions().priority_order())
    sealed = [v for (_, compare), v in counted["verifications"].items() if not compare]
    assert len(sealed) == 4 and all(n > 0 for _, n in sealed)
    if hostile:
        low = counted["verifications"][(THREADR.unmapped_priority.label, False)][0]
        assert low[UNMAPPED][0] >= 42
        assert any(low[p.name][2] == low[p.name][0] > 0 for p in THREADR.patterns if p.skip and p.name in low)


def test_a_batch_that_took_fewer_keys_than_its_spool_counts_fails_source_counts(settings, r, pg):
    """Medium's batches are given half of their spooled keys: its sealed validation counts the
    spool's keys from the chunks' counts, more than the batches saw, and its source_counts fails."""
    seed_demo(r, 120)
    damaged = _validated(settings, pg, erase_counts=False, drop_from="medium")
    assert damaged["status"] == "rolled_back"
    assert damaged["fed"][False] == 0  # (counted from the chunks' counts, not walked)
    assert not damaged["checks"]["medium"]["source_counts"]["ok"]
    assert damaged["checks"]["critical"]["source_counts"]["ok"] and damaged["checks"]["high"]["source_counts"]["ok"]
