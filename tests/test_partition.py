"""Cursor ranges on a real Redis: every key in exactly one range, and a range walk stopped early
leaves the client's connections fit for the next one."""
from __future__ import annotations

import pytest

from migrator.core.partition import KeyRange, scan_range


@pytest.fixture
def keyspace(r) -> set[bytes]:
    keys = {f"k:{i}".encode() for i in range(20_000)} | {b"\xff\xfe raw", b"a" * 5000}
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.set(key, b"1")
    pipe.execute()
    return keys


@pytest.mark.parametrize("n", [1, 3, 16, 256])
def test_the_ranges_together_yield_every_key_exactly_once(r, keyspace, n):
    yielded: list[bytes] = []
    for key_range in KeyRange.split(n):
        within = [k for reply in scan_range(r, key_range, count=100) for k in reply]
        assert len(within) == len(set(within))  # the table is not resizing: no repeat either
        yielded += within
    assert len(yielded) == len(keyspace) and set(yielded) == keyspace


def test_a_walk_abandoned_mid_range_leaves_the_pool_usable(r, keyspace):
    pool = r.connection_pool
    for _ in range(20):
        walk = scan_range(r, KeyRange.split(1)[0], count=10)
        assert next(walk)  # the next SCAN is already sent and unread when we stop
        walk.close()
    # no reply is left on a pooled connection to be read as the answer to another command...
    assert r.set("after", b"x") and r.get("after") == b"x"
    whole = {k for reply in scan_range(r, KeyRange.split(1)[0]) for k in reply}
    assert whole == keyspace | {b"after"}
    # ...and the walks did not keep a connection each
    assert len(pool._in_use_connections) == 0 and pool._created_connections <= 2
