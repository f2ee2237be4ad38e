"""A cap on the load a run puts on Redis, shared by every process that works on it.

`--max-keys-per-sec` protects the production Redis: one token bucket per run, kept in another
database of the source server (the database Celery's results use by default, never the one
being migrated, so the scan never sees it). Every key a SCAN reply names and every key read
takes a token (on a large table a SCAN costs Redis about as much per key as a read does), in
one atomic script call per reply or read chunk; a call that finds the bucket short reserves its
tokens anyway and sleeps until they would have been there, so workers on any number of hosts
together touch at most `rate` keys per second (plus one second's burst). A key the pass reads
from the run's spool (migrator/core/spool.py) costs Redis nothing until it is read, and takes no
token for its name. A run touches each key about three times: once in its one SCAN pass, and two
reads (the migration's and the validation's); with --scan-each-priority, once in each of its 8
SCAN passes (a migration and a validation per priority) and two reads.
"""
from __future__ import annotations

import time

import redis

from migrator.core import metrics
from migrator.core.config import state_db
from migrator.core.options import RunOptions
from migrator.core.source import client_like

# KEYS[1]: the bucket. ARGV: rate (keys/s), keys wanted. Returns milliseconds to wait.
TAKE = """
local rate, want = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or rate
local ts = tonumber(b[2]) or now
tokens = math.min(rate, tokens + (now - ts) * rate / 1000) - want
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
redis.call('PEXPIRE', KEYS[1], 3600000)
if tokens >= 0 then return 0 end
return math.ceil(-tokens * 1000 / rate)
"""


class Throttle:
    """Not for a Redis Cluster source (no second database there): `plan_run` refuses that."""

    def __init__(self, source: redis.Redis, run_id: str, rate: int) -> None:
        self.client = client_like(source, db=state_db(int(source.connection_pool.connection_kwargs.get("db") or 0)))
        self.key = f"migrator:throttle:{run_id}"
        self.rate = rate
        self._take = self.client.register_script(TAKE)

    def acquire(self, keys: int) -> float:
        """Take `keys` tokens, sleeping as long as the shared rate requires; returns the seconds slept."""
        wait = int(self._take(keys=[self.key], args=[self.rate, keys])) / 1000
        if wait:
            metrics.THROTTLE_WAIT.inc(wait)
            time.sleep(wait)
        return wait

    def close(self) -> None:
        self.client.close()


def paced(opts: RunOptions) -> tuple[int, int]:
    """(keys per read pipeline, SCAN COUNT) for a run: under a cap, shorter round trips too, since
    a pipeline or a SCAN call holds Redis for its whole length, and the app's slowest requests
    are the ones that wait behind it."""
    if not opts.max_keys_per_sec:
        return opts.read_chunk, opts.scan_count
    step = max(10, opts.max_keys_per_sec // 100)  # about a hundred round trips a second
    return min(opts.read_chunk, step), min(opts.scan_count, step)


def for_run(source: redis.Redis, run_id: str, opts: RunOptions) -> Throttle | None:
    return Throttle(source, run_id, opts.max_keys_per_sec) if opts.max_keys_per_sec else None
