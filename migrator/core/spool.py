"""The spool: one SCAN pass per run instead of one per priority and validation.

Redis is the production store and single-threaded: every SCAN pass over the keyspace costs it CPU
the app would have had (1-2 µs per key a pass). A run used to make eight: a migrating and a
validating pass per priority. Now the first priority's batch of each cursor range records the keys
its SCAN returns, each classified once and sorted out into the list of the one priority's pass that
acts on it (the keys of its patterns in scope; unmapped keys to the priority that counts them; a
key no pass acts on is not kept: a pass's own SCAN would have dropped it), and keeps them in
PostgreSQL in the batch's transaction (ledger.write_spool, migrator/core/sql/015_spool.sql). Every
later priority's batch of the range and every priority's in-run validation read their list from
there; each still classifies its keys exactly as before. Each chunk also keeps its keys' count per
pattern (020_spool_counts.sql): a count-only validation (the sealed one) sums those and reads no key.

What a spool cannot see: keys written after its pass. `migrator verify` (which SCANs: the
independent check) reports them missing, `migrator follow` migrates them; `run
--scan-each-priority` is the former behaviour, a SCAN per pass. A spool taken on another server
process (a Redis restart reshuffles the cursor order) or lost (the tables are unlogged: a crash of
PostgreSQL empties them) is not read: the pass SCANs its range, and a batch that SCANs records a
new spool for the passes after it.
"""
from __future__ import annotations

import sys
from array import array
from collections import Counter
from itertools import accumulate
from typing import Any, Iterable, Iterator

import redis

from migrator.core import ledger
from migrator.core.mapping import UNMAPPED, Mapping
from migrator.core.options import RunOptions
from migrator.core.partition import KeyRange

# Keys per chunk (a row of migration_spool): large enough that a row's overhead is small against
# its keys, small enough that a chunk being packed holds little memory.
CHUNK_KEYS = 5_000

# Key lengths are kept as uint32 little-endian: the same bytes whichever machine reads them.
_LENGTH = "I"
assert array(_LENGTH).itemsize == 4


def pack(keys: list[bytes]) -> tuple[bytes, bytes]:
    """Keys as (their lengths, the keys one after another): two byte strings, whatever bytes a key holds."""
    lengths = array(_LENGTH, map(len, keys))
    if sys.byteorder == "big":
        lengths.byteswap()
    return lengths.tobytes(), b"".join(keys)


def unpack(lengths: bytes, packed: bytes) -> list[bytes]:
    """The keys `pack` made these two byte strings of, in order."""
    sizes = array(_LENGTH)
    sizes.frombytes(lengths)
    if sys.byteorder == "big":
        sizes.byteswap()
    ends = list(accumulate(sizes))
    return [packed[start:end] for start, end in zip([0, *ends], ends)]


def routes(mapping: Mapping, opts: RunOptions) -> list[tuple[str, frozenset[str]]]:
    """Per priority of the run, the names its passes act on: its patterns in scope, and UNMAPPED when it
    counts unmapped keys (a priority with none in scope keeps nothing and is left out). A pattern has
    one priority, so a key goes to one list at most: classifying it again in another pass's, only to
    leave it to its own, cost each key of the demo a second classification (1.3 µs)."""
    found = [(p.label, opts.counted(mapping, p)) for p in opts.priority_order()]
    return [(label, names) for label, names in found if names]


def source_process(client: redis.Redis) -> str | None:
    """The server process a range is scanned on (its run_id): a spool is good for that process only."""
    return client.info("server").get("run_id")


class Recorder:
    """The keys of one range's SCAN, sorted out per priority of the run into packed chunks, as they
    are walked, each chunk with its keys' count per pattern; `save` keeps them in the batch's
    transaction. A key SCAN returns twice is kept once: the counts are of distinct keys, as a
    validation walking the list would count them."""

    def __init__(self, routes: list[tuple[str, frozenset[str]]], mapping: Mapping) -> None:
        self.pattern_of = mapping.pattern_of
        self.route = {name: label for label, names in routes for name in names}  # name -> the list it goes to
        self.held: dict[str, list[bytes]] = {label: [] for label, _ in routes}
        self.names: dict[str, list[str]] = {label: [] for label, _ in routes}  # the held keys' patterns
        self.chunks: list[tuple[str, int, int, bytes, bytes, dict[str, int]]] = []
        self.numbered: dict[str, int] = dict.fromkeys(self.held, 0)
        self.seen: set[bytes] = set()
        self.walked = 0

    def tap(self, found: Iterable[list[bytes]]) -> Iterator[list[bytes]]:
        """`found`'s lists of keys, each recorded as it goes by."""
        for keys in found:
            self.add(keys)
            yield keys

    def add(self, keys: list[bytes]) -> None:
        self.walked += len(keys)
        seen, pattern_of, route, held, named = self.seen, self.pattern_of, self.route, self.held, self.names
        for key in keys:
            if key in seen:
                continue
            seen.add(key)
            try:
                text = key.decode("utf-8")
            except UnicodeDecodeError:  # classified as a validation would (migrator/core/verify.py)
                text = key.decode("utf-8", "backslashreplace")
            pattern = pattern_of(text)[0]
            name = UNMAPPED if pattern is None else pattern.name
            label = route.get(name)
            if label is not None:
                held[label].append(key)
                named[label].append(name)
        for label, kept in held.items():
            if len(kept) >= CHUNK_KEYS:
                self._close(label)

    def _close(self, label: str) -> None:
        held, self.held[label] = self.held[label], []
        named, self.names[label] = self.names[label], []
        self.chunks.append((label, self.numbered[label], len(held), *pack(held), dict(Counter(named))))
        self.numbered[label] += 1

    def close(self) -> None:
        """The keys still held made chunks: the range is walked."""
        for label, held in self.held.items():
            if held:
                self._close(label)

    def save(self, cur: Any, run_id: str, key_range: KeyRange, process: str | None) -> None:
        self.close()
        ledger.write_spool(cur, run_id, key_range, process, self.walked, self.chunks)
        self.chunks = []


class Spooled:
    """A pass's keys of one range, read from its spool: lists of keys, as a SCAN would give them,
    and the keys walked so far (the range's SCAN's, in proportion to what was taken)."""

    def __init__(self, walked: int, chunks: list[tuple[int, bytes, bytes]]) -> None:
        self.range_walked, self.chunks = walked, chunks
        self.keys = sum(n for n, _, _ in chunks)
        self.taken = 0

    def __iter__(self) -> Iterator[list[bytes]]:
        while self.chunks:
            _, lengths, packed = self.chunks.pop(0)  # (let go of each chunk once it is unpacked)
            keys = unpack(lengths, packed)
            self.taken += len(keys)
            yield keys

    def walked(self) -> int:
        """The range's SCAN's keys in the share of its list taken so far: progress counts a range's
        keys whichever share of them a pass reads."""
        return self.range_walked if self.taken >= self.keys else self.range_walked * self.taken // self.keys


def replay(cur: Any, run_id: str, key_range: KeyRange, priority: str, process: str | None) -> Spooled | None:
    """The spooled keys of `priority` in this range, if a spool of it was taken on this server process."""
    found = ledger.read_spool(cur, run_id, key_range, priority, process)
    return None if found is None else Spooled(*found)


def counted(cur: Any, run_id: str, key_range: KeyRange, priority: str,
            process: str | None) -> tuple[int, dict[str, int]] | None:
    """The range's keys walked and the spooled keys of `priority` per pattern, from the counts its
    chunks were saved with, if a spool of it was taken on this server process (and with counts: one
    saved before they were kept has none)."""
    return ledger.spool_counts(cur, run_id, key_range, priority, process)
