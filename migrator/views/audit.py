"""Phase 1 of a migration, the data audit: what the source keyspace holds, read in one pass.

One SCAN walks the whole keyspace (per master on a Redis Cluster). Every key is classified by
the mapping, and each SCAN reply costs one pipelined round trip: TYPE and PTTL of every key,
MEMORY USAGE of a sample, the cardinality of migrated collections (rows they expand to) and the
values the mapping's audit tallies read (an application's own summary). Memory stays O(patterns +
shapes + examples + what the tallies keep), never O(keys), so keys are not deduplicated: on a keyspace that
is resizing or being written, SCAN may return a key twice or miss a new one, and the counts are
a snapshot estimate; on a quiet keyspace they are exact.
"""
from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import redis

from migrator.core.mapping import Mapping, Pattern, Priority
from migrator.core.partition import KeyRange, plan_ranges, scan_range
from migrator.core.redact import EMAIL, IPV4, IPV6, printable, redact_text
from migrator.core.source import node_client
from migrator.core.values import UUID as UUID_TEXT
from migrator.views import tables

AUDIT_PREFIX = "redis_audit_report_"
STAMP = "%Y%m%d_%H%M%S"  # UTC; sorts as text in time order

# Upper bounds in seconds; a key without expiry is "none".
TTL_BUCKETS: tuple[tuple[str, float], ...] = (
    ("<1h", 3_600), ("<1d", 86_400), ("<7d", 7 * 86_400), ("<30d", 30 * 86_400), ("<365d", 365 * 86_400),
    (">=365d", math.inf),
)
BUCKET_NAMES = ("none", *(name for name, _ in TTL_BUCKETS))

# Cardinality command per collection type: a migrated collection of a member-wise pattern is taken
# to become one row per element (a time series point per zset member, a counter per hash field, a
# row per stream entry); one read whole, one row.
CARDINALITY = {"zset": "ZCARD", "hash": "HLEN", "set": "SCARD", "list": "LLEN", "stream": "XLEN"}

# Unmapped keys are summarised by shape; past MAX_SHAPES distinct shapes (random key names)
# the rest are only counted, so memory stays bounded whatever the keyspace holds.
MAX_SHAPES = 100
MAX_EXAMPLES = 3
# A key segment that is an id rather than a name: it holds a digit, or is a long token.
ID_SEGMENT = re.compile(r"[^:]*\d[^:]*|[\w-]{16,}")
# Ids anywhere in a key, the first segment too (Celery's `celery-task-meta-<uuid>`), and a cluster
# hash tag holding one (`{user1}:cart`): generalised wherever they are.
UUID = re.compile(UUID_TEXT)
HASH_TAG = re.compile(r"\{[^{}]*\d[^{}]*\}")

# The migration guide's stop condition on the source's size (a mapping's audit tallies add their own).
USED_MEMORY_LIMIT = 2 * 1024**3


def ttl_bucket(pttl_ms: int) -> str:
    """The bucket of a PTTL reply (-1: no expiry)."""
    if pttl_ms < 0:
        return "none"
    seconds = pttl_ms / 1000
    return next(name for name, limit in TTL_BUCKETS if seconds < limit)


def key_shape(key: str) -> str:
    """A key with its ids generalised: emails, IPs, uuids and hash tags holding a digit anywhere,
    then every segment after the first that looks like an id (a digit, or a long token: numbers,
    dates), become `*`. A shape therefore never holds an email or an IP address."""
    text = HASH_TAG.sub("{*}", UUID.sub("*", IPV4.sub("*", IPV6.sub("*", EMAIL.sub("*", key)))))
    head, *rest = text.split(":")
    return ":".join([head, *("*" if ID_SEGMENT.fullmatch(seg) else seg for seg in rest)])


def stop_conditions(*, used_memory: int, missing_critical: Sequence[Pattern]) -> list[str]:
    """The guide's reasons to pause before migrating, as warnings (empty: go ahead)."""
    warnings = []
    if used_memory > USED_MEMORY_LIMIT:
        warnings.append(f"Redis uses {human_bytes(used_memory)} (over {human_bytes(USED_MEMORY_LIMIT)}): "
                        "plan for extended migration time; throttle")
    warnings += [f"critical data pattern missing: investigate ({p.name}: no key matches {p.glob})"
                 for p in missing_critical]
    return warnings


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def source_label(client: redis.Redis) -> str:
    """Where the audit read, from the connection settings: host:port/db, never a password."""
    kw = client.connection_pool.connection_kwargs
    if kw.get("path"):
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    return f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


@dataclass
class Tally:
    """What the audit knows of one pattern (or of the unmapped keys)."""

    keys: int = 0
    vanished: int = 0  # scanned, then gone before TYPE (expired meanwhile)
    wrong_type: int = 0
    records: int = 0  # rows a migration would write: right-typed keys, collections per element
    sampled: int = 0
    sampled_bytes: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    ttl: Counter[str] = field(default_factory=Counter)

    def estimated_bytes(self) -> int:
        return round(self.sampled_bytes / self.sampled * self.keys) if self.sampled else 0

    def ttl_buckets(self) -> dict[str, int]:
        return {name: self.ttl[name] for name in BUCKET_NAMES}


@dataclass
class Shape:
    keys: int = 0
    examples: list[str] = field(default_factory=list)
    types: Counter[str] = field(default_factory=Counter)  # what its keys hold (`mapping --init` declares it)


@dataclass(frozen=True, slots=True)
class _Asked:
    """What was queued in the pipeline for one key, to read its replies back in order."""

    pattern: Pattern | None
    tally: Tally
    shape: Shape | None  # an unmapped key's, while shapes are kept
    sample: bool
    card: bool
    value: bool


class _Auditor:
    """The running state of one audit: a tally per pattern, unmapped shapes, the mapping's own tallies."""

    def __init__(self, mapping: Mapping, every: int, now: datetime, show_pii: bool) -> None:
        self.mapping, self.every, self.now, self.show_pii = mapping, every, now, show_pii
        self.tallies = {p.name: Tally() for p in mapping.patterns}
        self.unmapped = Tally()
        self.shapes: dict[str, Shape] = {}
        self.other_shape_keys = 0
        self.additions = [make(mapping) for make in mapping.hooks.audit]
        self.readers = {p.name: [t for t in self.additions if t.reads(p)] for p in mapping.patterns}
        self.scanned = 0

    def reply(self, client: redis.Redis, keys: list[bytes]) -> None:
        """One SCAN reply: one pipeline round trip, whatever the number of keys."""
        pipe = client.pipeline(transaction=False)
        asked = [self._ask(pipe, key) for key in keys]
        replies = iter(pipe.execute(raise_on_error=False))
        for a in asked:
            rtype, pttl = _text(next(replies)), next(replies)
            memory = next(replies) if a.sample else None
            card = next(replies) if a.card else None
            value = next(replies) if a.value else None
            self._record(a, rtype, pttl, memory, card, value)

    def _ask(self, pipe: redis.client.Pipeline, key: bytes) -> _Asked:
        text = _text(key)
        pattern, _ = self.mapping.classify(text)
        tally = self.tallies[pattern.name] if pattern else self.unmapped
        shape = self._shape(text) if pattern is None else None
        # every k-th key, and the first of each pattern, so no pattern with keys lacks an estimate
        sample = self.scanned % self.every == 0 or tally.keys == 0
        self.scanned += 1
        tally.keys += 1
        migrated = pattern is not None and pattern.migrated
        card = migrated and bool(pattern.member_wise) and pattern.redis_type in CARDINALITY
        value = pattern is not None and bool(self.readers[pattern.name]) and pattern.redis_type == "string"
        pipe.type(key)
        pipe.pttl(key)
        if sample:
            pipe.memory_usage(key)
        if card:
            pipe.execute_command(CARDINALITY[pattern.redis_type], key)
        if value:
            pipe.get(key)
        return _Asked(pattern, tally, shape, sample, card, value)

    def _record(self, a: _Asked, rtype: str, pttl: Any, memory: Any, card: Any, value: Any) -> None:
        t = a.tally
        if rtype == "none" or pttl == -2:
            t.vanished += 1
            return
        t.by_type[rtype] += 1
        t.ttl[ttl_bucket(pttl)] += 1
        if isinstance(memory, int):
            t.sampled += 1
            t.sampled_bytes += memory
        if a.pattern is None:
            if a.shape is not None:
                a.shape.types[rtype] += 1
            return
        if rtype != a.pattern.redis_type:
            t.wrong_type += 1
            return
        if a.pattern.migrated:
            t.records += card if isinstance(card, int) else 1
        if isinstance(value, (bytes, str)):
            for tally in self.readers[a.pattern.name]:
                tally.add(a.pattern, value, self.now)

    def _shape(self, text: str) -> Shape | None:
        text = printable(text)  # a newline in a key name would break the table's line
        name = key_shape(text)
        shape = self.shapes.get(name)
        if shape is None:
            if len(self.shapes) >= MAX_SHAPES:
                self.other_shape_keys += 1
                return None
            shape = self.shapes[name] = Shape()
        shape.keys += 1
        if len(shape.examples) < MAX_EXAMPLES:
            shape.examples.append(text if self.show_pii else redact_text(text))
        return shape


def _node_clients(client: redis.Redis) -> list[tuple[KeyRange, redis.Redis]]:
    """(whole-keyspace range, client that scans it): the server itself, or one per cluster master."""
    return [(kr, node_client(client, kr.node) if kr.node else client) for kr in plan_ranges(client, 1)]


def _pattern_entry(pattern: Pattern, tally: Tally) -> dict[str, Any]:
    return {
        "pattern": pattern.name,
        "glob": pattern.glob,
        "priority": pattern.priority.label,
        "table": pattern.table,
        "skip": pattern.skip,
        "redis_type": pattern.redis_type,
        "keys": tally.keys,
        "by_type": dict(sorted(tally.by_type.items())),
        "wrong_type": tally.wrong_type,
        "vanished": tally.vanished,
        "records": tally.records,
        "estimated_bytes": tally.estimated_bytes(),
        "ttl_buckets": tally.ttl_buckets(),
    }


def _sums(entries: Iterable[dict[str, Any]], key: str) -> dict[str, dict[str, int]]:
    """keys and records of migrated pattern entries, summed by `key` (priority or table)."""
    out: dict[str, dict[str, int]] = {}
    for e in entries:
        if e["table"]:
            slot = out.setdefault(e[key], {"keys": 0, "records": 0})
            slot["keys"] += e["keys"]
            slot["records"] += e["records"]
    return out


def audit_keyspace(client: redis.Redis, mapping: Mapping, *, show_pii: bool = False, memory_sample: int = 1000,
                   scan_count: int = 1000, now: datetime | None = None) -> dict[str, Any]:
    """Audit the keyspace behind `client` against `mapping`; a JSON-serialisable report.

    Emails and IP addresses in the report (unmapped examples, the source address) are masked
    unless `show_pii`: the report is written to disk.
    """
    if memory_sample < 1 or scan_count < 1:
        raise ValueError("memory_sample and scan_count must be positive")
    now = now or datetime.now(timezone.utc)
    now = now if now.tzinfo else now.replace(tzinfo=timezone.utc)
    started = time.monotonic()
    nodes = _node_clients(client)
    try:
        infos = [c.info() for _, c in nodes]
        dbsize = sum(c.dbsize() for _, c in nodes)
        auditor = _Auditor(mapping, max(1, -(-dbsize // memory_sample)), now, show_pii)
        for key_range, c in nodes:
            for keys in scan_range(c, key_range, scan_count):
                auditor.reply(c, keys)
    finally:
        for _, c in nodes:
            if c is not client:
                c.close()

    ordered = sorted(mapping.patterns, key=lambda p: p.priority)  # stable: declaration order within a priority
    patterns = [_pattern_entry(p, auditor.tallies[p.name]) for p in ordered]
    used_memory = sum(int(i.get("used_memory", 0)) for i in infos)
    missing = [p for p in ordered if p.migrated and p.priority == Priority.CRITICAL and auditor.tallies[p.name].keys == 0]
    all_ttl = sum((t.ttl for t in [*auditor.tallies.values(), auditor.unmapped]), Counter())
    label = source_label(client)
    u = auditor.unmapped
    return {
        "generated_at": now.isoformat(),
        "mapping": mapping.name,
        "source": label if show_pii else redact_text(label),
        "pii_masked": not show_pii,
        "redis": {"version": ", ".join(sorted({str(i.get("redis_version")) for i in infos})),
                  "used_memory": used_memory, "used_memory_human": human_bytes(used_memory), "nodes": len(infos)},
        "dbsize": dbsize,
        "total_keys": auditor.scanned,
        "seconds": round(time.monotonic() - started, 3),
        "memory_sample": {"every": auditor.every,
                          "sampled": sum(t.sampled for t in [*auditor.tallies.values(), u])},
        "ttl_buckets": {name: all_ttl[name] for name in BUCKET_NAMES},
        "patterns": patterns,
        "unmapped": {
            "keys": u.keys,
            "by_type": dict(sorted(u.by_type.items())),
            "estimated_bytes": u.estimated_bytes(),
            "ttl_buckets": u.ttl_buckets(),
            "shapes": [{"shape": name, "keys": s.keys, "examples": s.examples, "types": dict(s.types.most_common())}
                       for name, s in sorted(auditor.shapes.items(), key=lambda kv: (-kv[1].keys, kv[0]))],
            "other_shapes_keys": auditor.other_shape_keys,
        },
        "by_priority": _sums(patterns, "priority"),
        "by_table": _sums(patterns, "table"),
        **{t.name: t.to_json() for t in auditor.additions},
        "additions": [t.name for t in auditor.additions],
        "stop_conditions": [*stop_conditions(used_memory=used_memory, missing_critical=missing),
                            *(w for t in auditor.additions for w in t.stop_conditions())],
    }


def _spread(buckets: dict[str, int]) -> str:
    return " ".join(f"{name}:{n}" for name, n in buckets.items() if n) or "-"


def render_audit(report: dict[str, Any]) -> str:
    """The report for a terminal: patterns, unmapped shapes, the mapping's tallies, volumes, stop conditions."""
    r = report["redis"]
    out = [f"audit of {report['source']} ({report['mapping']} mapping) at {report['generated_at']}",
           f"redis {r['version']}, used memory {r['used_memory_human']}, {report['total_keys']:,} keys scanned "
           f"(DBSIZE {report['dbsize']:,}) in {report['seconds']} s; MEMORY USAGE sampled on 1 key in "
           f"{report['memory_sample']['every']:,} ({report['memory_sample']['sampled']:,} keys)", ""]
    rows = []
    for p in report["patterns"]:
        types = ", ".join(f"{t} {n}" if t != p["redis_type"] else t for t, n in p["by_type"].items()) or "-"
        rows.append((p["pattern"], p["priority"], p["table"] or "skip", types, f"{p['keys']:,}",
                     human_bytes(p["estimated_bytes"]), _spread(p["ttl_buckets"])))
    u = report["unmapped"]
    rows.append(("(unmapped)", "-", "-", ", ".join(f"{t} {n}" for t, n in u["by_type"].items()) or "-",
                 f"{u['keys']:,}", human_bytes(u["estimated_bytes"]), _spread(u["ttl_buckets"])))
    out.append(tables.text(tables.table(("pattern", "priority", "table", "type(s)", "keys", "est. bytes", "TTL spread"), rows,
                                        right=(4, 5))))
    out.append(f"all keys TTL: {_spread(report['ttl_buckets'])}")
    wrong = [p for p in report["patterns"] if p["wrong_type"]]
    if wrong:
        out.append("wrong Redis type (dead letters in a run): "
                   + ", ".join(f"{p['pattern']} {p['wrong_type']} (expects {p['redis_type']})" for p in wrong))
    if u["shapes"]:
        out += ["", f"unmapped key shapes ({u['keys']:,} keys, left in Redis):"]
        shapes = [(s["shape"], f"{s['keys']:,}", ", ".join(s["examples"])) for s in u["shapes"]]
        if u["other_shapes_keys"]:
            shapes.append(("(other shapes)", f"{u['other_shapes_keys']:,}", ""))
        out.append(tables.text(tables.table(("shape", "keys", "e.g."), shapes, right=(1,))))
    out += ["", *(report[name]["summary"] for name in report.get("additions", ()))]
    out.append("records to migrate by priority: " + ", ".join(
        f"{prio} {v['records']:,} ({v['keys']:,} keys)" for prio, v in report["by_priority"].items()))
    out.append("keys by target table: " + ", ".join(f"{t} {v['keys']:,}" for t, v in report["by_table"].items()))
    out.append("")
    if report["stop_conditions"]:
        out += ["STOP CONDITIONS:", *(f"  ! {w}" for w in report["stop_conditions"])]
    else:
        out.append("stop conditions: none")
    return "\n".join(out)


def stamped_path(directory: Path, prefix: str, generated_at: str) -> Path:
    at = datetime.fromisoformat(generated_at).astimezone(timezone.utc)
    return Path(directory) / f"{prefix}{at.strftime(STAMP)}.json"


def write_json(data: dict[str, Any], path: Path) -> Path:
    """Write through a temporary name, so a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def write_audit(report: dict[str, Any], directory: Path) -> Path:
    """redis_audit_report_<UTC YYYYmmdd_HHMMSS of the audit>.json in `directory`."""
    return write_json(report, stamped_path(directory, AUDIT_PREFIX, report["generated_at"]))
