"""The read throttle: one token bucket per run, shared by every process, beside the source DB."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis

from helpers import cli, migrate
from migrator.core.config import state_db
from migrator.apps.threadr.demo import seed_demo
from migrator.core.options import RunOptions
from migrator.core.throttle import Throttle


def _state(r: redis.Redis) -> redis.Redis:
    kwargs = r.connection_pool.connection_kwargs
    return redis.Redis(host=kwargs["host"], port=kwargs["port"], db=state_db(kwargs["db"]))


def test_two_holders_share_one_bucket(r):
    run = f"throttle-test-share-{os.getpid()}"  # its own bucket: another test session may share the state DB
    first, second = Throttle(r, run, 1000), Throttle(r, run, 1000)
    try:
        assert first.acquire(1000) == 0  # a full second's burst is there at the start
        waited = second.acquire(1000)  # the other worker finds it empty: about a second to wait
        assert 0.5 < waited <= 1.0
        # the second slept its debt off; the next 500 keys cost half a second at 1,000 keys/s
        assert 0.4 < first.acquire(500) <= 0.5
        assert r.dbsize() == 0  # nothing of the throttle lands in the database being migrated
    finally:
        _state(r).delete(f"migrator:throttle:{run}")
        first.close()
        second.close()


def test_throttled_run_scans_and_reads_under_the_cap_and_still_balances(settings, r, pg):
    seed_demo(r, 60)
    keys = r.dbsize()
    report = migrate(settings, max_keys_per_sec=1000)
    assert report["status"] == "completed" and report["balanced"]
    bucket = f"migrator:throttle:{report['run_id']}"
    state = _state(r)
    try:
        # every key scanned or read took a token (about three per key: its SCAN and two reads):
        # past the first second's 1,000 and what the run's own time refills, so the batches
        # slept, and the bucket ended short
        assert keys * 3 > 2 * 1000
        assert report["stage_seconds"]["throttle"] > 0
        assert float(state.hget(bucket, "tokens")) < 1000
    finally:
        state.delete(bucket)


def test_the_cap_must_be_positive_and_is_in_run_help():
    with pytest.raises(ValueError, match="--max-keys-per-sec"):
        RunOptions(max_keys_per_sec=0)
    out = subprocess.run([sys.executable, "-m", "migrator.cli.main", "run", "--help"], capture_output=True, text=True).stdout
    assert "--max-keys-per-sec" in out


def test_keys_taken_from_the_spool_take_no_token_their_reads_do(settings, r, pg, monkeypatch):
    """A token per key SCAN names and per key read: the later passes' keys, from the spool, cost
    Redis nothing until read, so a run takes about three per key (its SCAN, two reads), not one
    more per pass."""
    seed_demo(r, 60)
    keys = r.dbsize()
    taken: list[int] = []
    real = Throttle.acquire

    def counted(self, n):
        taken.append(n)
        return real(self, n)

    monkeypatch.setattr(Throttle, "acquire", counted)
    report = migrate(settings, max_keys_per_sec=10_000_000)  # (a cap that never waits: only the count matters)
    assert report["status"] == "completed"
    state = _state(r)
    state.delete(f"migrator:throttle:{report['run_id']}")
    state.close()
    assert keys < sum(taken) <= 3 * keys


def test_verify_takes_a_cap_of_its_own_or_none_and_leaves_the_run_s_bucket_alone(settings, r, pg):
    """`migrator verify --max-keys-per-sec N`: a verification's own cap and bucket, in place of the
    run's (0: none); without the flag it takes from the run's bucket, as it always did."""
    seed_demo(r, 60)
    keys = r.dbsize()
    report = migrate(settings, max_keys_per_sec=10_000_000)  # (a cap that never waits)
    run = report["run_id"]
    state = _state(r)
    own = f"migrator:throttle:{run}"

    def verify(*flags: str) -> tuple[dict, str]:
        before = state.hget(own, "ts")
        done = cli(settings, "verify", run, "--local", "--jobs", "1", "--json", *flags)
        assert done.returncode == 0, done.stderr
        with pg.cursor() as cur:
            cur.execute("SELECT max(id) FROM migration_verifications WHERE run_id = %s", (run,))
            (verification,) = cur.fetchone()
        pg.rollback()
        return f"{own}:verification:{verification}", ("touched" if state.hget(own, "ts") != before else "untouched")

    try:
        capped, run_bucket = verify("--max-keys-per-sec", "500")
        # its SCAN and its reads took about two tokens a key from a bucket of its own, past the first
        # second's 500: it slept, and its bucket ended short; the run's was not touched
        assert keys * 2 > 2 * 500 and float(state.hget(capped, "tokens")) < 500 and run_bucket == "untouched"
        uncapped, run_bucket = verify("--max-keys-per-sec", "0")
        assert not state.exists(uncapped) and run_bucket == "untouched"
        default, run_bucket = verify()
        assert not state.exists(default) and run_bucket == "touched"
        with pg.cursor() as cur:
            cur.execute("SELECT max_keys_per_sec FROM migration_verifications WHERE run_id = %s AND NOT sealed ORDER BY id",
                        (run,))
            assert [cap for (cap,) in cur.fetchall()][-3:] == [500, 0, None]
        pg.rollback()
    finally:
        state.delete(own, *state.keys(f"{own}:*"))
        state.close()
