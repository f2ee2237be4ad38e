"""Checking references in Redis: an index entry's record exists, a record is in its index.

A pattern's `references` (mapping.Reference) name keys that must exist and, with a member,
hold it. They are checked in the source itself as the batch reads its keys, a pipeline or two per
chunk (and a few more to find which keys are missing, when some are), so an index that names a
record that is not there, or a record its index does not list, is counted as dangling whatever
was migrated. What a string index holds (a JSON array, or one
value) is read once per batch and kept.
"""
from __future__ import annotations

from typing import Any, Sequence

import redis

from migrator.core import jsoncodec
from migrator.core.mapping import Mapping, Reference
from migrator.core.source import roundtrip

# Index values kept per batch (a user's thread list is asked once per thread of that user).
CACHED_INDEXES = 10_000
# Keys asked per EXISTS call (see Checker.exist).
EXISTS_GROUP = 16


class Checker:
    """Checks references against one source; keeps the string indexes it read."""

    def __init__(self, client: redis.Redis, mapping: Mapping) -> None:
        self.client, self.mapping = client, mapping
        self.held: dict[str, frozenset[str] | None] = {}  # string index -> what it holds (None: not there)

    def missing(self, refs: Sequence[Reference]) -> list[bool]:
        """For each reference, whether it is dangling."""
        commands: list[tuple] = []
        reads: dict[str, int] = {}  # string indexes to read, by where their reply lands
        plan: list[tuple[str, Any]] = []
        named = [ref.key for ref in refs if ref.member is None]
        exist = iter(self.exist(named) if named else [])
        for ref in refs:
            if ref.member is None:
                plan.append(("known", not next(exist)))
                continue
            target, _ = self.mapping.pattern_of(ref.key)
            kind = target.redis_type if target else "string"
            if kind == "set":
                plan.append(("reply", len(commands)))
                commands.append(("SISMEMBER", ref.key, ref.member))
            elif kind == "zset":
                plan.append(("score", len(commands)))
                commands.append(("ZSCORE", ref.key, ref.member))
            else:
                if ref.key not in self.held and ref.key not in reads:
                    reads[ref.key] = len(commands)
                    commands.append(("GET", ref.key))
                plan.append(("held", ref))
        replies = roundtrip(self.client, commands) if commands else []
        for key, at in reads.items():
            if len(self.held) >= CACHED_INDEXES:
                self.held.clear()
            self.held[key] = _members(replies[at])
        out = []
        for how, where in plan:
            if how == "known":
                out.append(where)
            elif how == "held":
                held = self.held.get(where.key)
                out.append(held is None or where.member not in held)
            else:
                reply = replies[where]
                ok = not isinstance(reply, Exception) and (reply is not None if how == "score" else bool(reply))
                out.append(not ok)
        return out

    def exist(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key exists. EXISTS of many keys answers how many of them do, for about the
        cost to Redis of one key's: keys are asked EXISTS_GROUP at a time, and only a group whose
        count falls short is split in two and asked again, until each dangling key stands alone
        (a reference seldom dangles). A cluster's keys are asked one by one (theirs may be on
        different nodes)."""
        found = [True] * len(keys)
        size = 1 if isinstance(self.client, redis.RedisCluster) else EXISTS_GROUP
        groups = [(start, min(start + size, len(keys))) for start in range(0, len(keys), size)]
        while groups:
            replies = roundtrip(self.client, [("EXISTS", *keys[start:end]) for start, end in groups])
            short = []
            for (start, end), reply in zip(groups, replies):
                if reply == end - start:  # (EXISTS counts a key named twice twice)
                    continue
                if end - start == 1 or reply == 0:
                    found[start:end] = [False] * (end - start)
                else:  # (a refused call too: each key is asked on its own in the end)
                    middle = (start + end) // 2
                    short += [(start, middle), (middle, end)]
            groups = short
        return found


def _members(raw: Any) -> frozenset[str] | None:
    """What a string index holds: the entries of a JSON array, or its whole text."""
    if raw is None or isinstance(raw, Exception):
        return None
    try:
        parsed = jsoncodec.loads(raw)
    except jsoncodec.JSONDecodeError:
        parsed = None
    if isinstance(parsed, list):
        return frozenset(str(m) for m in parsed)
    return frozenset({raw.decode("utf-8", "backslashreplace")})
