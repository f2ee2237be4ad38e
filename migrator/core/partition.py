"""Cursor ranges: split Redis's SCAN order into disjoint slices that workers walk independently.

Redis walks its hash table in reversed-bit cursor order, so the 64-bit reversed cursor space
is a line from 0 to 2**64 that SCAN moves along monotonically. Range k of N covers reversed
positions [k*2**64/N, (k+1)*2**64/N). A SCAN call may run past the end of its range (its
keys are then also seen by the next range), so writes must be idempotent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import redis

from migrator.core.source import cluster_masters, node_client, pooled

SPACE = 1 << 64
# Tables smaller than this get one range: with fewer buckets than ranges they overlap heavily.
KEYS_PER_RANGE = 50_000
MAX_RANGES = 256


def rev64(value: int) -> int:
    return int(f"{value:064b}"[::-1], 2)


@dataclass(frozen=True)
class KeyRange:
    index: int
    count: int
    start: int  # reversed-cursor position, inclusive
    end: int  # reversed-cursor position, exclusive
    node: str = ""  # "host:port" of a cluster master whose keys this range covers; "" standalone

    @classmethod
    def split(cls, count: int, node: str = "") -> list["KeyRange"]:
        if count < 1:
            raise ValueError("the number of ranges must be at least 1")
        bounds = [k * SPACE // count for k in range(count + 1)]
        return [cls(k, count, bounds[k], bounds[k + 1], node) for k in range(count)]


def plan_ranges(client: redis.Redis, requested: int | None = None) -> list[KeyRange]:
    """The ranges of a run: N for a standalone server, or N per master of a Redis Cluster.

    From Redis 7.4 a cluster node keeps one table per slot and its cursor carries the slot in
    its low bits, so reversed-cursor ranges would be badly unbalanced: one range per master.
    """
    masters = cluster_masters(client)
    if not masters:
        return KeyRange.split(ranges_for(client.dbsize(), requested))
    ranges = []
    for node in masters:
        nc = node_client(client, node)
        try:
            version = tuple(int(x) for x in nc.info("server")["redis_version"].split(".")[:2])
            count = 1 if version >= (7, 4) else ranges_for(nc.dbsize(), requested)
        finally:
            nc.close()
        ranges += KeyRange.split(count, node)
    return ranges


def ranges_for(key_count: int, requested: int | None = None) -> int:
    """How many ranges to cut: `requested` if given, else one per KEYS_PER_RANGE keys (a power of 2)."""
    if requested:
        return requested
    wanted = max(1, -(-key_count // KEYS_PER_RANGE))
    n = 1
    while n < wanted and n < MAX_RANGES:
        n *= 2
    return n


def scan_range(client: redis.Redis, key_range: KeyRange, count: int = 1000) -> Iterator[list[bytes]]:
    """Yield the keys of one range, a SCAN reply at a time (a reply may be empty).

    The call that crosses the range end also returns keys of the next range. Those are left
    to the next range: a probe SCAN from the end (what the next range's first calls see)
    names them. On a table that is not resizing, every key is then yielded by exactly one range.
    The next call is sent before a reply's keys are handed over, so Redis walks on while they
    are processed.
    """
    with pooled(client) as conn:
        conn.send_command("SCAN", rev64(key_range.start), "COUNT", count)
        while True:
            reply_cursor, keys = conn.read_response()
            cursor = int(reply_cursor)
            crossed = cursor == 0 or rev64(cursor) >= key_range.end
            if not crossed:
                conn.send_command("SCAN", cursor, "COUNT", count)
            elif key_range.end < SPACE and keys:
                beyond = _seen_from(client, key_range.end, cursor, count)
                keys = [k for k in keys if k not in beyond]
            yield keys
            if crossed:
                return


def _seen_from(client: redis.Redis, position: int, until: int, count: int) -> set[bytes]:
    """Keys a SCAN sees from reversed `position` up to the cursor `until` (0: the end)."""
    seen: set[bytes] = set()
    cursor = rev64(position)
    while True:
        cursor, keys = client.scan(cursor=cursor, count=count)
        seen.update(keys)
        if cursor == 0 or (until != 0 and rev64(cursor) >= rev64(until)):
            return seen
