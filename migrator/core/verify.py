"""Full verification: every key of a run's mapping read again from Redis, transformed, and
compared with its rows in PostgreSQL, range by range; rows no key accounts for are found too.

Per cursor range, the rows each chunk of keys should have become go to PostgreSQL the way the
writer sends them, and one read-only statement per table (merge.TableRule.compare) casts them as
a write would and joins them to the table by id. It answers a count (the rows found under the
key that expects them) and only the rows that are missing or differ, so a clean range costs one
primary-key read per row and sends back numbers; only problem rows are named, column by column.

Rows no key expects (their key deleted, or never from this keyspace) cannot be found from the
keys: per table, the rows carrying the scope's provenance are counted, and only when that count
differs from the rows the ranges attributed are they looked at one by one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterable
from zoneinfo import ZoneInfo

import orjson
import psycopg2
import redis
import structlog
from psycopg2 import sql

from migrator.core import jsoncodec, lease, ledger, runstate, seal, spool
from migrator.core import throttle
from migrator.core.ledger import VerifySpec
from migrator.core.mapping import SHAPE_ERRORS, UNMAPPED, Mapping, Pattern, Priority, SourceRecord
from migrator.core.options import RunOptions
from migrator.core.partition import KeyRange, plan_ranges, scan_range
from migrator.core.redact import printable, redact_text
from migrator.core.source import (CHUNK_READ_BYTES, CHUNK_READ_MEMBERS, KeyRead, cluster_masters, decode, expiry, key_client,
                     node_client, read_keys, read_parts, value_digest)
from migrator.core.writer import _error_class, call_with_documents, column_types, describe

log = structlog.get_logger("migrator.core.verify")

# Per pattern. keys: keys of the pattern in Redis now; compared: keys whose rows were compared;
# rows: rows they should have become; missing / different: rows absent, or differing while the
# key's value did not move; changed: rows whose key the app wrote since the run; dead: keys the
# run made dead letters (no rows expected); unreadable: keys whose value cannot be migrated now
# but were not dead letters of the run; expired: keys gone between the scan and the read;
# skipped: keys of patterns the mapping skips; extra: rows no key of the keyspace expects;
# expired_rows: rows whose key has expired since; spooled: keys read from the run's spool
# (migrator/core/spool.py) rather than SCANned: some may be gone since, found so only when read;
# retired: extra rows a run's own validation gave their table's on_delete (see _retire).
FIELDS = ("keys", "compared", "rows", "missing", "different", "changed", "dead", "unreadable", "expired", "skipped",
          "extra", "expired_rows", "spooled", "retired")
# Why a row is extra when its key is gone, or gives other rows now: the rows a run retires.
GONE, NOT_GIVEN = "its key is not in Redis", "its key no longer gives this row"
EXAMPLES_PER_PATTERN = 5  # of each kind
# A range holds the run's dead letters' keys when there are at most this many (a few MB).
DEAD_KEYS_HELD = 20_000
# Namespace of the per-range advisory locks (the range id is the second key).
VERIFY_LOCK = 0x7666

Progress = Callable[[dict[str, int]], None]


def _counts() -> dict[str, int]:
    return dict.fromkeys(FIELDS, 0)


DIFFERING = ("missing", "different", "changed")  # the kinds of a row behind or apart from its key
DIFFERING_KEPT = 10_000


@dataclass
class Tally:
    """What one range (or the row check) found, per pattern and per table."""

    patterns: dict[str, dict[str, int]] = field(default_factory=dict)
    columns: dict[str, dict[str, int]] = field(default_factory=dict)  # per pattern: differing column -> rows
    attributed: dict[str, int] = field(default_factory=dict)  # per table
    examples: list[dict[str, Any]] = field(default_factory=list)
    writes: dict[str, list[str]] = field(default_factory=dict)  # per pattern: the tables its rows went to
    # a run's own validation: every extra row whose key is gone or gives other rows now, as
    # (pattern, table, id, key), for _retire (None: a verification that only tells)
    stale: list[tuple[str, str, str, str]] | None = None
    # the keys of the rows missing, different or changed, up to DIFFERING_KEPT (a reconciliation applies
    # those again); overflowed: more differed than that
    differing: set[str] = field(default_factory=set)
    overflowed: bool = False

    def add(self, pattern: str, what: str, n: int = 1) -> None:
        counts = self.patterns.get(pattern)  # (not setdefault: its default would be built per key)
        if counts is None:
            counts = self.patterns[pattern] = _counts()
        counts[what] += n

    def problem(self, pattern: str, kind: str, example: dict[str, Any], columns: Iterable[str] = ()) -> None:
        self.add(pattern, kind)
        if kind in DIFFERING and example.get("key") is not None:
            if len(self.differing) < DIFFERING_KEPT:
                self.differing.add(example["key"])
            else:
                self.overflowed = True
        columns = list(columns)
        for column in columns:
            named = self.columns.setdefault(pattern, {})
            named[column] = named.get(column, 0) + 1
        if sum(e["pattern"] == pattern and e["kind"] == kind for e in self.examples) < EXAMPLES_PER_PATTERN:
            key = example.get("key")  # kept in the ledger as JSON, which holds no NUL
            self.examples.append({"pattern": pattern, "kind": kind, **example, "key": key and printable(key),
                                  "columns": list(columns)})

    def wrote(self, pattern: str, table: str) -> None:
        tables = self.writes.setdefault(pattern, [])
        if table not in tables:
            tables.append(table)

    def merge(self, other: "Tally") -> None:
        """Add what another tally found (a range's, or a large key's)."""
        for name, counts in other.patterns.items():
            for f, n in counts.items():
                self.add(name, f, n)
        for name, columns in other.columns.items():
            named = self.columns.setdefault(name, {})
            for column, n in columns.items():
                named[column] = named.get(column, 0) + n
        for name, tables in other.writes.items():
            for table in tables:
                self.wrote(name, table)
        for table, n in other.attributed.items():
            self.attributed[table] = self.attributed.get(table, 0) + n
        self.examples += other.examples
        self.differing |= other.differing
        self.overflowed = self.overflowed or other.overflowed or len(self.differing) > DIFFERING_KEPT

    def to_json(self) -> dict[str, Any]:
        return {"patterns": self.patterns, "columns": self.columns, "writes": self.writes}


@dataclass(slots=True)
class _Expected:
    key: bytes
    text: str
    pattern: Pattern
    rows: list[Any]
    digest: int
    expires_at: datetime | None  # the key's, now: its rows' expiry


class RangeVerifier:
    """Counts and compares the keys of one range it is fed, chunk by chunk."""

    def __init__(self, client: redis.Redis, cur: Any, mapping: Mapping, patterns: list[Pattern], opts: RunOptions, *,
                 run_id: str, compare: bool, count_unmapped: bool, since: str,
                 cap: throttle.Throttle | None = None, spooled: bool = False) -> None:
        self.client, self.cur, self.mapping, self.opts, self.run_id = client, cur, mapping, opts, run_id
        self.cap = cap  # --max-keys-per-sec: the run's bucket, reads included
        limit = opts.max_value_bytes
        self.read_limit = CHUNK_READ_BYTES if limit is None else min(limit, CHUNK_READ_BYTES)
        self.scope = {p.name: p for p in patterns}
        self.compare, self.count_unmapped, self.since = compare, count_unmapped, since
        self.spooled = spooled  # the keys fed are the run's spool's, not a SCAN's
        self.prefixes = (b"",) if count_unmapped else mapping.prefixes(patterns)
        self.tz = ZoneInfo(opts.source_timezone)
        self.tally = Tally()
        self.seen: set[bytes] = set()  # SCAN may return a key twice within a range
        self.pending: list[tuple[bytes, str, Pattern, dict[str, str]]] = []
        self.statements: dict[tuple, str] = {}
        # the run's dead letters, read at the first chunk compared (None: too many to hold)
        self.dead: set[bytes] | None = None
        self.dead_read = False
        self.links = mapping.linked_columns()  # table -> linked column -> reference columns

    def feed(self, keys: list[bytes]) -> None:
        # (its lookups bound once per reply: this runs for every key of every pass)
        seen, scope, prefixes, add, pending = self.seen, self.scope, self.prefixes, self.tally.add, self.pending
        pattern_of, fields_of = self.mapping.pattern_of, self.mapping.fields_of
        for key in keys:
            if not key.startswith(prefixes) or key in seen:
                continue
            seen.add(key)
            try:
                text = key.decode("utf-8")
            except UnicodeDecodeError:  # no row can name it (the run made it a dead letter)
                text = key.decode("utf-8", "backslashreplace")
            pattern, match = pattern_of(text)
            name = UNMAPPED if pattern is None else pattern.name
            if not (name in scope or (pattern is None and self.count_unmapped)):
                continue
            add(name, "keys")
            if self.spooled:
                add(name, "spooled")
            if pattern is None:
                continue
            if pattern.skip:
                add(name, "skipped")
            elif self.compare:
                pending.append((key, text, pattern, fields_of(match)))
        if len(self.pending) >= self.opts.read_chunk:
            self.flush()

    def take(self, counts: dict[str, int]) -> None:
        """The keys of a spool per pattern, counted when it was saved (spool.Recorder), tallied as
        `feed` would tally those keys when it compares none."""
        for name, n in counts.items():
            pattern = self.scope.get(name)
            if pattern is None and not (name == UNMAPPED and self.count_unmapped):
                continue
            self.tally.add(name, "keys", n)
            self.tally.add(name, "spooled", n)
            if pattern is not None and pattern.skip:
                self.tally.add(name, "skipped", n)

    def flush(self) -> None:
        chunk, self.pending = self.pending, []
        if not chunk:
            return
        if self.cap is not None:
            self.cap.acquire(len(chunk))
        now = datetime.now(timezone.utc)  # before the read, as the run's (source.expiry)
        # (every key's PTTL too: its rows' expiry is compared with the key's now)
        reads = read_keys(self.client, [(key, p.redis_type) for key, _, p, _ in chunk], self.read_limit)
        dead = self._dead([key for key, _, _, _ in chunk])
        expected = []
        for (key, text, pattern, fields), read in zip(chunk, reads):
            if key in dead:
                self.tally.add(pattern.name, "dead")  # the run kept no row of it
                continue
            cap = self.opts.max_value_bytes
            if read.truncated and (cap is None or read.size <= cap):  # a large value: compared on its own
                if read.resume is not None and pattern.member_wise:
                    self._compare_parts(key, text, pattern, fields, read, now)
                    continue
                # (its raw bytes gone once transformed: the rows and their document are enough to hold)
                found = self._expected(key, text, pattern, fields, read_keys(self.client, [(key, pattern.redis_type)],
                                                                              None)[0], now)
                self._compare([found] if found else [])
                continue
            found = self._expected(key, text, pattern, fields, read, now)
            if found is not None:
                expected.append(found)
        self._compare(expected)

    def _dead(self, keys: list[bytes]) -> set[bytes]:
        """Those of `keys` the run made dead letters. The run's few are read once per range and held
        (a lookup per chunk cost PostgreSQL 1 µs per key); many are looked up chunk by chunk."""
        if not self.dead_read:
            self.dead, self.dead_read = ledger.all_dead_keys(self.cur, self.run_id, DEAD_KEYS_HELD), True
        if self.dead is not None:
            return self.dead.intersection(keys)
        return ledger.dead_keys(self.cur, self.run_id, keys)

    def _expected(self, key: bytes, text: str, pattern: Pattern, fields: dict[str, str], read: Any,
                  now: datetime) -> "_Expected | None":
        """What a key should have become, or None (counted) when it is gone or cannot be migrated."""
        if read.redis_type == "none" or read.raw is None or read.pttl == -2:
            self.tally.add(pattern.name, "expired")
            return None
        cap = self.opts.max_value_bytes
        if (read.redis_type != pattern.redis_type or isinstance(read.raw, Exception)
                or (cap is not None and read.size > cap) or text.encode() != key):
            self.tally.add(pattern.name, "unreadable")
            return None
        expires_at = expiry(now, read.pttl)
        try:
            rows = pattern.transform(SourceRecord(text, fields, decode(read.raw, pattern.value_format), expires_at, now,
                                                  pattern.zone(self.tz)))
        except SHAPE_ERRORS:
            self.tally.add(pattern.name, "unreadable")
            return None
        return _Expected(key, text, pattern, rows, value_digest(read.raw), expires_at)

    def _compare_parts(self, key: bytes, text: str, pattern: Pattern, fields: dict[str, str], first: KeyRead,
                       now: datetime) -> None:
        """A large collection of a member-wise pattern, compared a part at a time, as the run wrote
        it: one key compared with all its rows, and only if every part could be read and transformed
        (else one key expired or unreadable, as a small one would be)."""
        tally, self.tally = self.tally, Tally()
        cap, size = self.opts.max_value_bytes, 0
        try:
            for part in read_parts(self.client, first):
                if self.cap is not None and part is not first:  # a part costs Redis about what as many keys do
                    self.cap.acquire(CHUNK_READ_MEMBERS)
                size += part.size
                if cap is not None and size > cap:
                    self.tally.add(pattern.name, "unreadable")
                    break
                found = self._expected(key, text, pattern, fields, part, now)  # (counts it when it is not)
                if found is None:
                    break
                if found.rows:
                    self._compare([found])
        finally:
            parts, self.tally = self.tally, tally
        counts = parts.patterns.setdefault(pattern.name, _counts())
        if counts["expired"] or counts["unreadable"]:
            tally.add(pattern.name, "expired" if counts["expired"] else "unreadable")
            return
        counts["compared"] = 1  # one key, however many parts
        tally.merge(parts)

    def _compare(self, expected: list[_Expected]) -> None:
        """Compare these keys' rows; a key whose rows PostgreSQL cannot even take (the run made
        it a dead letter) is set aside by halving, as the writer does."""
        if not expected:
            return
        groups: dict[tuple[str, tuple[str, ...], Pattern, tuple[str, ...]], list[list[Any]]] = {}
        for exp in expected:
            for row in exp.rows:
                groups.setdefault((row.table, tuple(row.values), exp.pattern, row.unknown), []).append(
                    [*row.values.values(), exp.text, exp.digest, exp.expires_at])
        order = list(groups)
        statements = [self._statement(*group) for group in order]
        documents = [jsoncodec.dumps(groups[g]) for g in order]
        del groups  # (a large value's rows: held once, as its document)
        attributed, problems, state, message = call_with_documents(self.cur, "migrator_compare", statements, documents)
        del documents
        if state is not None:
            if len(expected) == 1:
                self.tally.add(expected[0].pattern.name, "unreadable")
                log.info("verify_unwritable_record", pattern=expected[0].pattern.name,
                         error=redact_text(describe(_error_class(state)(message))))
                return
            mid = len(expected) // 2
            self._compare(expected[:mid])
            self._compare(expected[mid:])
            return
        owner = {exp.text: exp.pattern.name for exp in expected}
        for exp in expected:
            self.tally.add(exp.pattern.name, "compared")
            self.tally.add(exp.pattern.name, "rows", len(exp.rows))
        for (table, _, pattern, _), found, named in zip(order, attributed, problems):
            self.tally.wrote(pattern.name, table)
            self.tally.attributed[table] = self.tally.attributed.get(table, 0) + found
            # a column of another table than the pattern's own is named with its table
            qualify = (lambda c: c) if table == pattern.table else (lambda c: f"{table}.{c}")  # noqa: E731
            for row_id, key, kind, columns in named:
                self.tally.problem(owner[key], kind, {"table": table, "id": row_id, "key": key},
                                   () if kind == "missing" else map(qualify, columns))

    def _statement(self, table: str, columns: tuple[str, ...], pattern: Pattern, unknown: tuple[str, ...]) -> str:
        if (table, columns, pattern, unknown) not in self.statements:
            full = (*columns, "source_key", "source_digest", "expires_at")
            types = column_types(self.cur, self.mapping, table, full)
            # the pattern of the key, or any other whose rows may have been written last
            provenances = {pattern.provenance, *(p.provenance for p in self.mapping.patterns if p.table == table)}
            self.statements[(table, columns, pattern, unknown)] = self.mapping.rule(table).compare(
                full, types, provenances=sorted(provenances), links=self.links.get(table),
                since=self.since, unknown=unknown).as_string(self.cur)
        return self.statements[(table, columns, pattern, unknown)]


RESTARTED = "Redis restarted during the verification"


def server_process(client: redis.Redis) -> str | None:
    """Which server process a standalone source is (cursors mean nothing on another); None on a cluster."""
    return None if cluster_masters(client) else client.info("server").get("run_id")


def scope_of(mapping: Mapping, opts: RunOptions, priorities: Iterable[Priority]) -> tuple[list[Pattern], bool]:
    """The patterns a verification of these priorities checks, and whether it counts unmapped keys."""
    patterns: list[Pattern] = []
    unmapped = False
    for priority in priorities:
        patterns += opts.scope(mapping, priority)
        unmapped = unmapped or opts.includes_unmapped(mapping, priority)
    return patterns, unmapped


def _planned(client: redis.Redis, conn: Any, run_id: str) -> tuple[dict[str, Any], list[KeyRange]]:
    """The run, and the cursor ranges a verification of it goes through."""
    with conn, conn.cursor() as cur:
        run = ledger.require_run(cur, run_id)
    return run, plan_ranges(client, RunOptions.from_json(run["options"]).ranges)


def plan_verification(client: redis.Redis, conn: Any, run_id: str, priorities: list[Priority],
                      from_spool: bool = False, sealed: bool = False, reason: dict[str, Any] | None = None,
                      max_keys_per_sec: int | None = None) -> int:
    """Record a verification of the run's `priorities` and its cursor ranges; its id. A dry run
    kept no rows: its verification only counts the source keys. `from_spool` (the in-run
    validation of one priority): over the ranges of the priority's batches, each reading the keys
    its range's spool holds, if any (migrator/core/spool.py), rather than SCANning. `sealed` (the
    in-run validation of one priority, by default): it counts the source keys too, reading no value,
    and checks the seals of the priority's rows (migrator/core/seal.py) rather than comparing them.
    `reason`: why it runs, kept with it (the seal check that did not hold, for its full re-read).
    `max_keys_per_sec`: its own cap on Redis (0: none), in place of the run's."""
    run, key_ranges = _planned(client, conn, run_id)
    with conn, conn.cursor() as cur:
        if from_spool:
            (priority,) = priorities
            key_ranges = ledger.batch_ranges(cur, run_id, priority.label) or key_ranges
        verification_id = ledger.create_verification(cur, run_id, [p.label for p in priorities],
                                                      not run["dry_run"] and not sealed, key_ranges,
                                                      server_process(client), from_spool, sealed, reason, max_keys_per_sec)
    log.info("verification_planned", run=run_id, verification=verification_id, ranges=len(key_ranges),
             priorities=[p.label for p in priorities], from_spool=from_spool, sealed=sealed, after_seal=reason is not None)
    return verification_id


def verify_range(client: redis.Redis, conn: Any, mapping: Mapping, range_id: int,
                 progress: Progress | None = None, *, connect: Callable[[], Any]) -> dict[str, Any] | None:
    """Verify one planned range from the ledger; its counts, or None when it was already done. Its
    keys walked go to the ledger as it runs, on a session made by `connect` (_Walked)."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s, %s)", (VERIFY_LOCK, range_id))
    try:
        with conn.cursor() as cur:
            spec = ledger.start_verify_range(cur, range_id)
        conn.commit()
        if spec is None:
            return None
        with structlog.contextvars.bound_contextvars(run=spec.run_id, verification=spec.verification_id,
                                                     range=range_id):
            walked = _Walked(connect, range_id, progress)
            try:
                return _verify(client, conn, mapping, spec, walked)
            finally:
                walked.close()
    finally:
        lease.release(conn, range_id, VERIFY_LOCK)


def check_range(client: redis.Redis, conn: Any, mapping: Mapping, spec: VerifySpec,
                progress: Progress | None = None) -> Tally:
    """Compare the keys of one range with their rows; what it found. Reads only: recording it is
    the caller's."""
    opts = spec.options
    patterns, unmapped = scope_of(mapping, opts, map(Priority.parse, spec.priorities))
    node = node_client(client, spec.key_range.node) if spec.key_range.node else client
    cap = throttle.for_run(client, spec.bucket or spec.run_id, opts)
    started = time.perf_counter()
    try:
        with conn.cursor() as cur:
            counts = _spool_counts(cur, node, spec)
            spooled = None if counts is not None else _spooled(cur, node, spec)
            verifier = RangeVerifier(node, cur, mapping, patterns, opts, run_id=spec.run_id, compare=spec.compare,
                                     count_unmapped=unmapped, since=spec.run_started, cap=cap,
                                     spooled=spooled is not None or counts is not None)
            if counts is not None:  # counted as spooled: no key to walk (a count-only verification reads none)
                verifier.take(counts[1])
                if progress is not None:
                    progress({"walked": counts[0], "keys": sum(c["keys"] for c in verifier.tally.patterns.values()),
                              "compared": 0})
            found: Iterable[list[bytes]] = () if counts is not None else spooled if spooled is not None else \
                scan_range(node, spec.key_range, throttle.paced(opts)[1])
            walked = 0  # every key SCAN returned, in scope or not: what progress counts
            for keys in found:
                if cap is not None and spooled is None:  # (a spool's keys cost Redis nothing: only their reads)
                    cap.acquire(len(keys))
                verifier.feed(keys)
                walked = spooled.walked() if spooled is not None else walked + len(keys)
                if progress is not None:
                    progress({"walked": walked,
                              **{f: sum(c[f] for c in verifier.tally.patterns.values()) for f in ("keys", "compared")}})
            verifier.flush()
    finally:
        if node is not client:
            node.close()
        if cap is not None:
            cap.close()
    tally = verifier.tally
    keys = sum(c["keys"] for c in tally.patterns.values())
    log.info("verify_range_done", keys=keys, seconds=round(time.perf_counter() - started, 3),
             problems=sum(c[f] for c in tally.patterns.values() for f in ("missing", "different", "changed")))
    return tally


def _spool_counts(cur: Any, node: redis.Redis, spec: VerifySpec) -> tuple[int, dict[str, int]] | None:
    """For a count-only verification (sealed, or of a dry run) planned to read the run's spool: the
    range's keys walked and its spooled keys per pattern, counted as they were spooled, when the
    spool holds them for this server process; None: walk the keys (the full re-read always does)."""
    if spec.compare or not spec.from_spool or len(spec.priorities) != 1:
        return None
    return spool.counted(cur, spec.run_id, spec.key_range, spec.priorities[0], spool.source_process(node))


def _spooled(cur: Any, node: redis.Redis, spec: VerifySpec) -> spool.Spooled | None:
    """The range's keys from the run's spool, for a verification planned to read it that checks one
    priority, when the spool holds them for this server process; None: SCAN the range."""
    if not spec.from_spool or len(spec.priorities) != 1:
        return None
    return spool.replay(cur, spec.run_id, spec.key_range, spec.priorities[0], spool.source_process(node))


class _Walked:
    """A running range's progress: passed on to `then` (Flower's, on a worker), and its keys walked
    written to the ledger at most every HEARTBEAT_SECONDS on a session of its own, since the range's
    own transaction shows nothing until it commits. A write that fails is logged and dropped: the
    display lags, the verification goes on."""

    def __init__(self, connect: Callable[[], Any], range_id: int, then: Progress | None) -> None:
        self.connect, self.range_id, self.then = connect, range_id, then
        self.walked = 0
        self.conn: Any = None
        self.last = time.monotonic()

    def __call__(self, counts: dict[str, int]) -> None:
        self.walked = counts["walked"]
        if self.then is not None:
            self.then(counts)
        if time.monotonic() - self.last < ledger.HEARTBEAT_SECONDS:
            return
        self.last = time.monotonic()
        try:
            if self.conn is None:
                self.conn = self.connect()
                self.conn.autocommit = True
            with self.conn.cursor() as cur:
                ledger.verify_range_walked(cur, self.range_id, self.walked)
        except Exception as exc:  # psycopg2.Error, or a ConfigError from connect
            log.warning("verify_progress_not_recorded", error=redact_text(describe(exc)))
            self.close()

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg2.Error:
                pass
            self.conn = None


def _verify(client: redis.Redis, conn: Any, mapping: Mapping, spec: VerifySpec, walked: _Walked) -> dict:
    try:
        tally = check_range(client, conn, mapping, spec, walked)
        with conn.cursor() as cur:
            ledger.finish_verify_range(cur, spec.id, tally.to_json(), tally.attributed, tally.examples, walked.walked)
        conn.commit()
    except Exception as exc:
        reason = redact_text(describe(exc))
        log.error("verify_range_failed", error=reason)
        try:
            conn.rollback()
            with conn.cursor() as cur:
                ledger.fail_verify_range(cur, spec.id, reason)
            conn.commit()
        except psycopg2.Error:
            log.warning("verify_range_failure_not_recorded", error=reason)
        raise
    return tally.to_json()


def finish(client: redis.Redis, conn: Any, mapping: Mapping, verification_id: int, retire: bool = False) -> dict[str, Any]:
    """Once every range is in: look for rows no key expects, then the verification's result
    (kept in the ledger; asked again, the kept one). `retire`: the run's own validation, which
    retires the extra rows whose key is gone or gives other rows now (_retire)."""
    with conn, conn.cursor() as cur:
        found = ledger.get_verification(cur, verification_id)
        ranges = ledger.verify_ranges(cur, verification_id)
    if found["status"] != "running":
        return kept_result(found)
    result = conclude(client, conn, mapping, found, ranges, retire)
    with conn, conn.cursor() as cur:
        ledger.end_verification(cur, verification_id, result, result["error"])
    return result


def kept_result(found: dict[str, Any]) -> dict[str, Any]:
    """The result the ledger keeps of a verification that has ended (ledger.get_verification); one
    that could not end has none: incomplete, with its error."""
    return found["result"] or {"verification_id": found["id"], "verdict": "incomplete", "error": found["error"]}


def conclude(client: redis.Redis, conn: Any, mapping: Mapping, found: dict[str, Any],
             ranges: list[dict[str, Any]], retire: bool = False) -> dict[str, Any]:
    """A verification's result from its ranges' findings (`found` and `ranges` as the ledger
    gives them: ledger.get_verification, ledger.verify_ranges), rows no key expects included
    (`retire`: as finish says)."""
    opts = RunOptions.from_json(found["options"])
    priorities = [Priority.parse(p) for p in found["priorities"]]
    patterns, _ = scope_of(mapping, opts, priorities)
    tally = Tally()
    for r in ranges:
        found_in = r["counts"]
        tally.merge(Tally(found_in.get("patterns", {}), found_in.get("columns", {}), r["attributed"], r["examples"],
                          found_in.get("writes", {})))
    unfinished = [r["id"] for r in ranges if r["status"] != "done"]
    error, sealing = None, None
    if found["redis_run_id"] != server_process(client):
        # keys moved between cursor ranges with the new hash seed: ranges scanned before and after
        # the restart count some keys twice and may miss others
        error = f"{RESTARTED}: verify again"
    elif unfinished:
        errors = sorted({r["error"] for r in ranges if r["error"]})
        error = f"{len(unfinished)} of {len(ranges)} range(s) could not be verified" + (f": {errors[0]}" if errors else "")
    elif found["compare"]:
        tally.stale = [] if retire else None
        _extra_rows(client, conn, mapping, found["run_id"], patterns, opts, tally)
        _retire(conn, mapping, found["run_id"], tally)
    elif found["sealed"]:
        (priority,) = priorities
        with conn, conn.cursor() as cur:
            sealing = seal.check(cur, mapping, found["run_id"], priority.label, patterns)
    result = summarise(mapping, found, patterns, tally, len(ranges), len(unfinished), error, sealing)
    log.info("verification_done", run=found["run_id"], verification=found["id"], verdict=result["verdict"],
             missing=result["missing"], different=result["different"], extra=result["extra"])
    return result


def verify_in_memory(client: redis.Redis, conn: Any, mapping: Mapping, run_id: str,
                     priorities: list[Priority], max_keys_per_sec: int | None = None) -> dict[str, Any]:
    """A verification planned, run and concluded here, one range at a time, and recorded nowhere
    (for a role that may not write the ledger): the ranges and rows of `plan_verification`, the
    checks of `verify_range` and `finish`, its plan kept in memory instead of the ledger."""
    run, key_ranges = _planned(client, conn, run_id)
    labels = tuple(p.label for p in priorities)
    found = {"id": None, "run_id": run_id, "priorities": labels, "compare": not run["dry_run"], "sealed": False,
             "reason": None, "options": run["options"], "redis_run_id": server_process(client)}
    opts, bucket = ledger.capped(RunOptions.from_json(run["options"]), run_id, None, max_keys_per_sec)
    ranges = []
    for n, key_range in enumerate(key_ranges):
        spec = VerifySpec(n, None, run_id, labels, found["compare"], key_range, opts, run["started_at"].isoformat(),
                          bucket=bucket)
        try:
            tally = check_range(client, conn, mapping, spec)
            ranges.append({"id": n, "status": "done", "counts": tally.to_json(), "attributed": tally.attributed,
                           "examples": tally.examples, "error": None})
        except Exception as exc:  # the range could not be verified: the verdict says so, as a recorded one would
            if not conn.closed:
                conn.rollback()
            ranges.append({"id": n, "status": "failed", "counts": {}, "attributed": {}, "examples": [],
                           "error": redact_text(describe(exc))})
    return conclude(client, conn, mapping, found, ranges)


def summarise(mapping: Mapping, found: dict[str, Any], patterns: list[Pattern], tally: Tally, ranges: int,
              failed: int, error: str | None, sealing: dict[str, Any] | None = None) -> dict[str, Any]:
    """A verification's result; `sealing`: what the seal check of a sealed one found (seal.check)."""
    by_name = {p.name: p for p in mapping.patterns}
    rows = []
    for name in [*(p.name for p in patterns), UNMAPPED]:
        if name not in tally.patterns:
            continue
        pattern = by_name.get(name)
        rows.append({
            "pattern": name,
            "priority": (pattern.priority if pattern else mapping.unmapped_priority).label,
            "table": pattern.table if pattern else None,
            **tally.patterns[name],
            "columns": dict(sorted(tally.columns.get(name, {}).items(), key=lambda c: -c[1])),
            "examples": [e for kind in ("missing", "different", "extra", "changed")
                         for e in [e for e in tally.examples if e["pattern"] == name and e["kind"] == kind][
                             :EXAMPLES_PER_PATTERN]],
        })
    totals = {f: sum(r[f] for r in rows) for f in FIELDS}
    if error:
        verdict = "incomplete"
    elif sealing is not None:  # the keys were counted, the rows' seals checked: "unsealed" asks for a full re-read
        verdict = "sealed" if sealing["held"] else "unsealed"
    elif not found["compare"]:
        verdict = "counted"  # a dry run kept no rows: the keys were counted, nothing compared
    else:
        verdict = "clean" if not (totals["missing"] or totals["different"] or totals["extra"]) else "differences"
    return {
        "verification_id": found["id"],
        "run_id": found["run_id"],
        "priorities": list(found["priorities"]),
        "verdict": verdict,
        "missing": totals["missing"],
        "different": totals["different"],
        "extra": totals["extra"],
        "changed_since_run": totals["changed"],
        "ranges": {"total": ranges, "failed": failed},
        "totals": totals,
        "patterns": rows,
        "error": error,
        "seal": sealing,
        "reason": found["reason"],  # why it ran: the seal check a full re-read follows
    }


# --- rows no key expects ------------------------------------------------------------------

ROW_CHUNK = 500


def _extra_rows(client: redis.Redis, conn: Any, mapping: Mapping, run_id: str, patterns: list[Pattern],
                opts: RunOptions, tally: Tally) -> None:
    """Per table of the scope: rows carrying its provenance (or the run's mark) that the ranges
    did not find under their own key. Read row by row only where the counts disagree."""
    scoped = [p for p in patterns if p.migrated]
    writers: dict[str, list[Pattern]] = {}  # per table: the patterns whose rows go there
    for p in scoped:
        for table in dict.fromkeys([p.table, *tally.writes.get(p.name, [])]):
            writers.setdefault(table, []).append(p)
    for table, mine in writers.items():
        others = [p.provenance for p in mapping.patterns if p.table == table and p not in mine]
        where = sql.SQL("(t.metadata = ANY({mine}::jsonb[]) OR (t.migration_run = {run}"
                        " AND NOT t.metadata = ANY({others}::jsonb[])))").format(
            mine=sql.Literal([p.provenance for p in mine]), run=sql.Literal(run_id), others=sql.Literal(others))
        rule = mapping.rule(table)
        if rule.on_delete == "mark":  # a row kept, marked, once its key went: no key is to give it
            where += sql.SQL(" AND t.{} IS NULL").format(sql.Identifier(rule.deleted_at))
        with conn, conn.cursor() as cur:
            cur.execute(sql.SQL("SELECT count(*) FROM {} t WHERE {}").format(sql.Identifier(table), where))
            total = cur.fetchone()[0]
        if total == tally.attributed.get(table, 0):
            continue
        _rows_of(client, conn, mapping, table, where, mine, opts, tally)


def _rows_of(client: redis.Redis, conn: Any, mapping: Mapping, table: str, where: sql.Composable,
             mine: list[Pattern], opts: RunOptions, tally: Tally) -> None:
    """Every row of `table` in scope whose key is gone, or no longer expects it."""
    tz = ZoneInfo(opts.source_timezone)
    by_provenance = {p.provenance: p for p in mine}
    client = key_client(client)
    large: dict[str, Pattern] = {}  # keys of large collections, whose rows are looked at once, at the end
    spelling = mapping.row_key_columns(table)  # (what spells the other keys that may give a row: keys_giving)
    with conn:
        with conn.cursor(name="verify_rows") as cur:  # streamed: a table may not fit in memory
            cur.itersize = ROW_CHUNK
            cur.execute(sql.SQL("SELECT t.id::text, t.source_key, t.metadata::text, t.expires_at{} FROM {} t WHERE {}"
                                " ORDER BY t.id").format(
                sql.SQL("").join(sql.SQL(", t.{}::text").format(sql.Identifier(c)) for c in spelling),
                sql.Identifier(table), where))
            while True:
                chunk = cur.fetchmany(ROW_CHUNK)
                if not chunk:
                    break
                _check_rows(client, mapping, table, chunk, by_provenance, mine[0], tz, tally, large, spelling)
    for key, pattern in large.items():
        _rows_of_large(client, conn, mapping, table, where, key, pattern, tz, tally)


def _rows_of_large(client: redis.Redis, conn: Any, mapping: Mapping, table: str, where: sql.Composable, key: str,
                   pattern: Pattern, tz: ZoneInfo, tally: Tally) -> None:
    """The rows of `table` in scope under a large collection's key that the key no longer gives: the
    ids it gives go to a temporary table a part at a time, and PostgreSQL names the rows not among
    them (a large key's rows are spread over every chunk of rows: it is read once, not per chunk)."""
    now, fields = datetime.now(timezone.utc), mapping.classify(key)[1]
    gone, readable = False, True
    with conn:
        with conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE IF NOT EXISTS migrator_given (id text PRIMARY KEY) ON COMMIT DELETE ROWS")
            for part in read_parts(client, read_keys(client, [(key.encode(), pattern.redis_type)])[0]):
                gone = part.redis_type == "none"
                readable = part.redis_type == pattern.redis_type and not isinstance(part.raw, Exception)
                if readable:
                    try:
                        rows = pattern.transform(SourceRecord(key, fields, decode(part.raw, pattern.value_format),
                                                              expiry(now, part.pttl), now, pattern.zone(tz)))
                    except SHAPE_ERRORS:
                        readable = False
                if not readable:
                    break
                cur.execute("INSERT INTO pg_temp.migrator_given SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING",
                            ([r.values["id"] for r in rows if r.table == table],))
        judged = datetime.now(timezone.utc)  # after the read: a key found gone was gone by then
        given = sql.SQL(" AND NOT EXISTS (SELECT FROM pg_temp.migrator_given g WHERE g.id = t.id::text)")
        with conn.cursor(name="verify_large") as cur:
            cur.itersize = ROW_CHUNK
            cur.execute(sql.SQL("SELECT t.id::text, t.expires_at FROM {} t WHERE {} AND t.source_key = %s{}").format(
                sql.Identifier(table), where, given if readable else sql.SQL("")), (key,))
            for row_id, expires_at in cur:
                example = {"table": table, "id": row_id, "key": key}
                why = _judge(tally, pattern, example, gone, readable, False, expires_at, judged)
                if why is not None:
                    _stale(tally, pattern, example, why)


def _judge(tally: Tally, pattern: Pattern, example: dict[str, Any], gone: bool, readable: bool, given: bool,
           expires_at: datetime | None, now: datetime) -> str | None:
    """One row the ranges did not find under its key: its key is gone, cannot be migrated now, or
    does not give it (a row the key gives is no problem). Returns why it is stale (GONE, NOT_GIVEN),
    for the caller to call _stale, or None."""
    if gone:
        if expires_at is not None and expires_at <= now:
            tally.add(pattern.name, "expired_rows")  # its key's TTL ran out since: not a difference
            return None
        return GONE
    if not readable:
        tally.problem(pattern.name, "changed", {**example, "why": "its key's value cannot be migrated now"})
        return None
    return None if given else NOT_GIVEN


def _stale(tally: Tally, pattern: Pattern, example: dict[str, Any], why: str) -> None:
    tally.problem(pattern.name, "extra", {**example, "why": why})
    if tally.stale is not None:
        tally.stale.append((pattern.name, example["table"], example["id"], example["key"]))


def _retire(conn: Any, mapping: Mapping, run_id: str, tally: Tally) -> None:
    """A run's own validation makes its tables hold what Redis holds: the extra rows it found whose
    key is gone (deleted by the app, not expired) or gives other rows now (a member removed) get
    their table's on_delete, as `migrator follow` gives them, journaled for rollback; they count as
    retired, not extra (a row several keys may give is stale only once none of them gives it:
    _given_elsewhere). Raises Fenced, retiring nothing, once the run is not running."""
    by_table: dict[str, list[tuple[str, str, str]]] = {}
    for name, table, row_id, key in tally.stale or ():
        by_table.setdefault(table, []).append((name, row_id, key))
    if not by_table:
        return
    with conn, conn.cursor() as cur:
        runstate.hold(cur, run_id)
        cur.execute("SELECT set_config('migrator.run_id', %s, true)", (run_id,))  # a mark's prior image journaled
        for table, rows in by_table.items():
            rule = mapping.rule(table)
            ledger.retire_named(cur, run_id, table, [(row_id, key) for _, row_id, key in rows],
                                rule.deleted_at if rule.on_delete == "mark" else None)
    retired = {(table, row_id) for table, rows in by_table.items() for _, row_id, _ in rows}
    for table, rows in by_table.items():
        for name, _, _ in rows:
            tally.add(name, "extra", -1)
            tally.add(name, "retired")
    tally.examples = [e for e in tally.examples if not (e["kind"] == "extra" and (e["table"], e["id"]) in retired)]
    log.info("stale_rows_retired", run=run_id, tables={t: len(rows) for t, rows in by_table.items()})


def _check_rows(client: redis.Redis, mapping: Mapping, table: str, chunk: list[tuple], by_provenance: dict[str, Pattern],
                fallback: Pattern, tz: ZoneInfo, tally: Tally, large: dict[str, Pattern], spelling: tuple[str, ...]) -> None:
    keys: dict[str, Pattern | None] = {}
    for _, key, _, _, *_ in chunk:
        if key is not None and key not in keys:
            pattern, _ = mapping.classify(key)
            keys[key] = pattern if pattern in by_provenance.values() else None
    readable = [k for k, p in keys.items() if p is not None]
    read_at = datetime.now(timezone.utc)  # (source.expiry)
    reads = dict(zip(readable, read_keys(client, [(k.encode(), keys[k].redis_type) for k in readable])))
    now = datetime.now(timezone.utc)  # after the read: a key found gone was gone by then
    yields: dict[str, set[str] | None] = {}  # the ids each key gives now; None: it gives none it can be read for
    for key, read in reads.items():
        pattern = keys[key]
        if read.resume is not None and pattern.member_wise:
            large[key] = pattern
            continue
        if read.truncated:  # a large value: read whole, alone, and let go once its ids are known
            read = read_keys(client, [(key.encode(), pattern.redis_type)], None)[0]
            reads[key] = replace(read, raw=b"")
        if read.redis_type != pattern.redis_type or isinstance(read.raw, Exception):
            yields[key] = None
            continue
        try:
            rows = pattern.transform(SourceRecord(key, mapping.classify(key)[1], decode(read.raw, pattern.value_format),
                                                  expiry(read_at, read.pttl), read_at, pattern.zone(tz)))
            yields[key] = {r.values["id"] for r in rows if r.table == table}
        except SHAPE_ERRORS:
            yields[key] = None
    sharing = mapping.sharing(table)
    suspects: list[tuple[Pattern, dict[str, Any], str, dict[str, Any]]] = []  # stale unless another key gives them
    for row_id, key, metadata, expires_at, *spelt in chunk:
        pattern = keys.get(key) or by_provenance.get(_compact(metadata)) or fallback
        example = {"table": table, "id": row_id, "key": key}
        if key is None or keys.get(key) is None:
            tally.problem(pattern.name, "extra", {**example, "why": "no key of the mapping's patterns for this table"})
        elif key not in large:
            ids = yields[key]
            why = _judge(tally, pattern, example, reads[key].redis_type == "none", ids is not None,
                         ids is not None and row_id in ids, expires_at, now)
            if why is not None and pattern in sharing:
                suspects.append((pattern, example, why, dict(zip(spelling, spelt))))
            elif why is not None:
                _stale(tally, pattern, example, why)
    if suspects:
        given = _given_elsewhere(client, mapping, table, suspects, tz)
        for pattern, example, why, _ in suspects:
            if example["id"] not in given:
                _stale(tally, pattern, example, why)


def _given_elsewhere(client: redis.Redis, mapping: Mapping, table: str,
                     suspects: list[tuple[Pattern, dict[str, Any], str, dict[str, Any]]], tz: ZoneInfo) -> set[str]:
    """The ids of these rows that another key still gives: one grant under its ip key and its email key,
    the key that wrote it last since overwritten by a later grant while the other still holds it.
    The other keys are spelled from each row's columns (Pattern.row_key), read and transformed."""
    others: dict[str, Pattern] = {}
    for _, example, _, values in suspects:
        others.update((key, p) for key, p in mapping.keys_giving(table, values).items() if key != example["key"])
    read_at = datetime.now(timezone.utc)
    given: set[str] = set()
    for key, read in zip(others, read_keys(client, [(k.encode(), p.redis_type) for k, p in others.items()], None)):
        pattern = others[key]
        if read.redis_type != pattern.redis_type or isinstance(read.raw, Exception):
            continue
        try:
            rows = pattern.transform(SourceRecord(key, mapping.classify(key)[1], decode(read.raw, pattern.value_format),
                                                  expiry(read_at, read.pttl), read_at, pattern.zone(tz)))
        except SHAPE_ERRORS:
            continue
        given.update(r.values["id"] for r in rows if r.table == table)
    return given


def _compact(metadata: str) -> str:
    return orjson.dumps(orjson.loads(metadata)).decode()


# --- showing a result -------------------------------------------------------------------

def mask_value(value: Any) -> Any:
    """A value fit to print: PII masked, long text cut to its start and length (password hashes
    and tokens included)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = jsoncodec.dumps(value, default=str).decode() if isinstance(value, (dict, list, tuple)) else str(value)
    text = redact_text(text)
    return text if len(text) <= 16 else f"{text[:6]}…({len(text)} chars)"


def explain(client: redis.Redis, conn: Any, mapping: Mapping, example: dict[str, Any], opts: RunOptions) -> list[dict]:
    """For a row that differs: each differing column, as PostgreSQL holds it and as the key's
    value now gives it, masked."""
    pattern, fields = mapping.classify(example["key"])
    if pattern is None or not pattern.migrated or not example.get("columns"):
        return []
    client = key_client(client)
    # a large collection of a member-wise pattern a part at a time, until the row is found; any other value whole
    read = read_keys(client, [(example["key"].encode(), pattern.redis_type)], CHUNK_READ_BYTES if pattern.member_wise
                     else None)[0]
    expected: dict[str, Any] = {}
    for part in read_parts(client, read):
        if part.redis_type != pattern.redis_type or expected:
            break
        now = datetime.now(timezone.utc)
        expires_at = expiry(now, part.pttl)
        try:
            rows = pattern.transform(SourceRecord(example["key"], fields, decode(part.raw, pattern.value_format),
                                                  expires_at, now, pattern.zone(ZoneInfo(opts.source_timezone))))
            expected = next(({**r.values, "expires_at": expires_at and expires_at.isoformat()} for r in rows
                             if r.table == example["table"] and r.values["id"] == example["id"]), {})
        except SHAPE_ERRORS:
            break
    with conn, conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT to_jsonb(t) FROM {} t WHERE id = %s").format(sql.Identifier(example["table"])),
                    (example["id"],))
        found = cur.fetchone()
    actual = found[0] if found else {}
    # (an expiry is shown whole: a time, no one's secret)
    shown = lambda c, v: v if c == "expires_at" else mask_value(v)  # noqa: E731
    return [{"column": c, "postgres": shown(c, actual.get(c)), "redis": shown(c, expected.get(c))}
            for c in example["columns"]]


def masked(result: dict[str, Any]) -> dict[str, Any]:
    """A result fit to print: the keys of its examples masked (the ledger keeps them whole)."""
    return {**result, "patterns": [{**p, "examples": [{**e, "key": e["key"] and printable(redact_text(e["key"]))}
                                                       for e in p["examples"]]} for p in result.get("patterns", [])]}


def strictly(result: dict[str, Any]) -> dict[str, Any]:
    """The verdict for a cutover (`verify --strict`): rows behind what their key holds now (the app
    changed the key since they were written, and nothing brought them up to date) are not clean."""
    if result["verdict"] == "clean" and result["changed_since_run"]:
        return {**result, "verdict": "stale"}
    return result


def render(result: dict[str, Any]) -> str:
    """The verification as a table per pattern, its verdict, and the examples it kept."""
    head = ("pattern", "table", "keys", "compared", "rows", "missing", "different", "extra", "changed", "dead",
            "unreadable", "expired")
    rows = [(p["pattern"], p["table"] or "-", *(p[f] for f in head[2:])) for p in result["patterns"]]
    t = result["totals"]
    rows.append(("TOTAL", "", *(t[f] for f in head[2:])))
    widths = [max(len(f"{r[i]:,}" if isinstance(r[i], int) else str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    cell = lambda v: f"{v:,}" if isinstance(v, int) else str(v)  # noqa: E731
    line = lambda r: "  ".join(cell(v).rjust(w) if i >= 2 else cell(v).ljust(w)  # noqa: E731
                               for i, (v, w) in enumerate(zip(r, widths)))
    verdict = {"clean": "CLEAN", "differences": "DIFFERENCES", "incomplete": "COULD NOT FINISH",
               "counted": "COUNTED (dry run: no rows to compare)",
               "stale": f"STALE: {result['changed_since_run']:,} row(s) behind what their key holds now (the app changed it"
                        " since they were written): run again, or let `migrator follow` catch up"}[result["verdict"]]
    which = "(not recorded)" if result["verification_id"] is None else result["verification_id"]
    if result["verdict"] == "clean" and (t["dead"] or t["unreadable"]):  # clean, of the keys that have rows
        verdict += (f" of the keys that have rows: {t['dead']:,} key(s) are the run's dead letters and "
                    f"{t['unreadable']:,} cannot be migrated now, with no rows (`migrator report {result['run_id']}` "
                    "says why)")
    out = [f"run {result['run_id']}: verification {which} {verdict}",
           line(head), line(tuple("-" * w for w in widths)), *map(line, rows)]
    out.append(f"missing {result['missing']:,}, different {result['different']:,}, extra (rows no key gives) "
               f"{result['extra']:,}; changed since the run {result['changed_since_run']:,}")
    for p in result["patterns"]:
        if p["columns"]:
            out.append(f"  {p['pattern']}: differing columns " + ", ".join(f"{c} ({n:,})" for c, n in p["columns"].items()))
        for e in p["examples"]:
            where = f"{e['table']} {e['id']}"
            out.append(f"    {e['kind']:9} {e['key'] or '(no source key)'}  {where}"
                       + (f"  {e['why']}" if e.get("why") else "")
                       + (f"  columns {', '.join(e['columns'])}" if e.get("columns") else ""))
            for d in e.get("diff", []):
                out.append(f"              {d['column']}: postgres {d['postgres']!r}  redis {d['redis']!r}")
    if result.get("error"):
        out.append(f"error: {result['error']}")
    return "\n".join(out)
