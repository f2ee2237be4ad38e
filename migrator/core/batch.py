"""The unit of work: one priority over one cursor range, in one PostgreSQL transaction.

SCAN the range (or read its spool: migrator/core/spool.py) -> classify each key by the mapping -> pipelined TYPE/PTTL/value reads ->
pure transforms -> sub-batches written under savepoints (bisected on failure) -> the ledger
row updated in the same transaction. Celery tasks and `migrator run --local` both call
`migrate_batch`; it needs only a Redis client, a PostgreSQL connection and the ledger.
"""
from __future__ import annotations

import contextvars
import gc
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable
from zoneinfo import ZoneInfo

import psycopg2
import redis
import structlog

from migrator.core import lease
from migrator.core import ledger
from migrator.core import metrics
from migrator.core import spool
from migrator.core.ledger import PatternCounts
from migrator.core.mapping import SHAPE_ERRORS, UNMAPPED, BadRecord, Mapping, Pattern, Priority, Reference, SourceRecord
from migrator.core.partition import scan_range
from migrator.core.redact import printable, redact_text
from migrator.core.references import Checker
from migrator.core.runstate import Fenced
from migrator.core.seal import Figures
from migrator.core.source import (CHUNK_READ_BYTES, CHUNK_READ_MEMBERS, KeyRead, Moved, dead_letter_value, decode,
                                  expiry, key_client, node_client, read_keys, read_parts, value_digest)
from migrator.core import throttle
from migrator.core.writer import Prepared, Writer, describe, detail

log = structlog.get_logger("migrator.core.batch")


# Called after each SCAN reply with the running totals (scanned, migrated, ...) of the batch.
Progress = Callable[[dict[str, int]], None]

# A batch makes and drops a few containers per key, nearly all freed by reference counting when
# their sub-batch is written. Python's default (a collection per 700 net new containers, a full
# one every 100 of those) walked the live ones over and over: a tenth of a batch's CPU.
GC_THRESHOLDS = (100_000, 50, 100)


def collect_less() -> None:
    """Space the cyclic garbage collector's passes out, for a process that runs batches (cycles
    are still collected, after at most GC_THRESHOLDS[0] containers more)."""
    gc.set_threshold(*GC_THRESHOLDS)


@dataclass
class _Streamed:
    """What the parts of the collection being streamed wrote so far (counted once all are in)."""

    rows: int = 0
    written: int = 0
    digest: int = 0  # of every part's digest, in order
    error: BaseException | None = None  # PostgreSQL refused a part
    seals: Figures = field(default_factory=Figures)  # of every part's rows


@dataclass(frozen=True)
class BatchResult:
    batch_id: int
    priority: str
    counts: PatternCounts
    rows_written: int
    checksum: str


class _Batch:
    """State of one batch while it runs: counts, pending records, dead letters."""

    def __init__(self, client: redis.Redis, cur: Any, mapping: Mapping, spec: ledger.BatchSpec,
                 progress: Progress | None = None, check: Callable[[], None] = lambda: None,
                 writer: Writer | None = None) -> None:
        self.cur, self.mapping, self.spec, self.progress = cur, mapping, spec, progress
        self.check = check  # raises Fenced once the batch should stop (its run was cancelled)
        # a cluster range is scanned and read on its own master
        self.client = node_client(client, spec.key_range.node) if spec.key_range.node else client
        self.opts = spec.options
        priority = Priority.parse(spec.priority)
        self.scope = {p.name: p for p in self.opts.scope(mapping, priority)}
        self.count_unmapped = self.opts.includes_unmapped(mapping, priority)
        self.prefixes = self.opts.prefixes(mapping, priority)
        self.tz = ZoneInfo(self.opts.source_timezone)
        self.counts = PatternCounts()
        # (a bulk batch's writer is fenced: it leaves rows a live follow session read since it began)
        self.writer = writer or Writer(cur, mapping, spec.run_id, fenced=True)
        self.pending: list[Prepared] = []
        self.pending_bytes = 0
        # One sub-batch is written by a second thread while this one reads and transforms the
        # next: psycopg2 releases the GIL while PostgreSQL works, so the two costs overlap.
        self.write_behind = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        self.in_flight: tuple[list[Prepared], Future] | None = None
        self.dead: list[tuple] = []
        self.dead_bytes = 0
        # (pattern, key, Reference) made by the records read, checked per read chunk
        self.references: list[tuple[str, str, Reference]] = []
        self.checker = Checker(key_client(client), mapping)  # a reference may name a key on another node
        self.dangling: dict[str, list[dict[str, Any]]] = {}  # per pattern, a few dangling references
        self.rows_written = 0
        self.checksum = 0
        self.seals = Figures()  # of the rows of the records that committed (migrator/core/seal.py)
        self.streamed: _Streamed | None = None  # while a large collection is written a part at a time
        self.seen: set[bytes] = set()  # SCAN may return a key twice within a range
        self.walked = 0  # keys SCAN returned, of any priority: what progress counts (migrator/views/progress.py)
        # seconds per stage; "write" runs beside the others, "write_wait" is what it held them up
        self.timings = dict.fromkeys(ledger.STAGES, 0.0)
        self.throttle = throttle.for_run(client, spec.run_id, self.opts)
        self.read_chunk, self.scan_count = throttle.paced(self.opts)
        # strings of a chunk are read up to here; a longer one is read whole on its own (or, over
        # the operator's cap, refused with its first bytes)
        cap = self.opts.max_value_bytes
        self.read_limit = CHUNK_READ_BYTES if cap is None else min(cap, CHUNK_READ_BYTES)

    def run(self, found: Iterable[list[bytes]] | None = None, *, scanned: bool = True) -> None:
        """Take every key of `found` (lists of keys; default: a SCAN of the batch's range). `scanned`:
        they come from a SCAN, whose every key costs Redis a token's worth; a spool's cost it nothing."""
        try:
            self._run(scan_range(self.client, self.spec.key_range, self.scan_count) if found is None else found, scanned)
            self._settle()
        finally:
            self.write_behind.shutdown(wait=True)
            if self.throttle is not None:
                self.throttle.close()

    def _run(self, found: Iterable[list[bytes]], scanned: bool) -> None:
        clock, t = time.perf_counter, self.timings
        mark = clock()
        for keys in found:
            self.check()
            if self.throttle is not None and scanned:
                t["throttle"] += self.throttle.acquire(len(keys))
            now_s = clock()
            t["scan"] += now_s - mark
            wanted = self._classify(keys)
            mark = clock()
            t["transform"] += mark - now_s
            for start in range(0, len(wanted), self.read_chunk):
                chunk = wanted[start : start + self.read_chunk]
                if self.throttle is not None:
                    t["throttle"] += self.throttle.acquire(len(chunk))
                now = datetime.now(timezone.utc)  # before the read: see source.expiry
                reads = read_keys(self.client, [(key, p.redis_type) for key, _, p, _ in chunk], self.read_limit)
                now_s = clock()
                t["read"] += now_s - mark
                aside = t["write_wait"] + t["read"] + t["throttle"]  # (a large collection's parts are read in here)
                for (key, text, pattern, fields), read in zip(chunk, reads):
                    self._prepare(key, text, pattern, fields, read, now)
                self._check_references()
                while len(self.pending) >= self.opts.batch_size:
                    self._flush(self.opts.batch_size)
                if self.pending_bytes >= SUB_BATCH_BYTES:  # a few large values make a sub-batch too
                    self._flush(len(self.pending))
                mark = clock()
                t["transform"] += mark - now_s - (t["write_wait"] + t["read"] + t["throttle"] - aside)
            self.walked += len(keys)  # (once they are taken: a reply holding a large key counts after it)
            if self.progress is not None:
                self.progress({f: self.counts.total(f) for f in ledger.COUNT_FIELDS})
            mark = clock()
        self._flush(len(self.pending))

    def _classify(self, keys: list[bytes]) -> list[tuple[bytes, str, Pattern, dict[str, str]]]:
        """Those of a SCAN reply's keys this pass reads, with their text, pattern and fields; the
        others are counted (unmapped, skipped, dead) or left to the pass they belong to. (One call
        per reply, its lookups bound once: this runs for every key of every pass.)"""
        seen, scope, prefixes = self.seen, self.scope, self.prefixes
        pattern_of, fields_of = self.mapping.pattern_of, self.mapping.fields_of
        wanted = []
        for key in keys:
            if not key.startswith(prefixes) or key in seen:
                continue
            seen.add(key)
            try:
                text, valid = key.decode("utf-8"), True
            except UnicodeDecodeError:
                text, valid = key.decode("utf-8", "backslashreplace"), False
            pattern, match = pattern_of(text)
            if pattern is None:
                if self.count_unmapped:
                    self.counts.add(UNMAPPED, "skipped")
                continue
            if pattern.name not in scope:
                continue  # another priority's pass, or outside --table/--pattern
            if not pattern.read:
                self.counts.add(pattern.name, "skipped")
            elif not valid:
                self._dead(key, text, pattern, None, "key is not valid UTF-8")
            else:
                wanted.append((key, text, pattern, fields_of(match)))
        return wanted

    def _prepare(self, key: bytes, text: str, pattern: Pattern, fields: dict[str, str], read: KeyRead, now: datetime) -> None:
        if read.redis_type == "none" or read.raw is None or read.pttl == -2:
            self.counts.add(pattern.name, "expired")  # gone between SCAN and read: not an error
            return
        if read.redis_type != pattern.redis_type:
            self._dead(key, text, pattern, read, f"wrong Redis type: expected {pattern.redis_type}, found {read.redis_type}")
            return
        if isinstance(read.raw, Exception):
            self._dead(key, text, pattern, read, f"Redis error reading the value: {read.raw}")
            return
        cap = self.opts.max_value_bytes
        if cap is not None and read.size > cap and read.resume is None:  # (a collection's first part is not its size)
            kept = f"; its first {len(read.raw):,} bytes are kept here" if read.truncated else ""
            self._dead(key, text, pattern, read, f"value is {read.size:,} bytes, over the "
                       f"{cap:,}-byte limit of --max-value-bytes{kept}")
            return
        if read.truncated:
            self._flush(len(self.pending))
            if read.resume is not None and pattern.member_wise:  # a large collection: a part at a time
                self._stream(key, text, pattern, fields, read, now)
                return
            # a large value: read whole, and written as a sub-batch of its own
            self._prepare(key, text, pattern, fields, read_keys(self.client, [(key, pattern.redis_type)], None)[0], now)
            self._flush(len(self.pending))
            return
        expires_at = expiry(now, read.pttl)
        try:
            rows = self._records(text, pattern, fields, read, expires_at, now)
        except SHAPE_ERRORS as exc:
            self._dead(key, text, pattern, read, _reason(exc))
            return
        if rows is None:  # an index: read for its references, not migrated
            self.counts.add(pattern.name, "skipped")
            return
        digest = value_digest(read.raw)
        if isinstance(read.raw, bytes) and len(read.raw) > DEAD_LETTER_VALUE_BYTES:
            # the rows hold what the value says: keep only what a dead letter would
            read.raw, read.truncated = read.raw[:DEAD_LETTER_VALUE_BYTES], True
        self._hold(Prepared(key, text, pattern, rows, expires_at, read, digest))

    def _records(self, text: str, pattern: Pattern, fields: dict[str, str], read: KeyRead,
                 expires_at: datetime | None, now: datetime) -> list[Any] | None:
        """The rows of a value (None: an index, not migrated), its references kept to check; raises
        one of SHAPE_ERRORS for a value that cannot be migrated."""
        record = SourceRecord(text, fields, decode(read.raw, pattern.value_format), expires_at, now, pattern.zone(self.tz))
        rows = pattern.transform(record) if pattern.transform else None
        if pattern.references:  # (most patterns have none: no list built for them)
            self.references += [(pattern.name, text, ref) for ref in pattern.references(record)]
        return rows

    def _hold(self, record: Prepared) -> None:
        self.pending.append(record)
        self.pending_bytes += record.read.size

    def _stream(self, key: bytes, text: str, pattern: Pattern, fields: dict[str, str], first: KeyRead,
                now: datetime) -> None:
        """A large collection of a member-wise pattern, a part at a time (_write_parts), under a
        savepoint of the key's: a part that cannot be migrated, or the key going mid-way, takes back
        what the parts before it wrote, and the key is one dead letter, or one expired key, as a
        small one would be."""
        self._settle()  # the writer is idle: the savepoint holds this key's writes alone
        self._check_references()  # the chunk's keys read before it: their references are theirs
        name = pattern.name
        noted = {f: self.counts.by_pattern.get(name, {}).get(f, 0) for f in ("references", "dangling")}
        examples = len(self.dangling.get(name, ()))
        for attempt in range(MOVED_TRIES):
            self.cur.execute("SAVEPOINT collection")
            self.streamed = streamed = _Streamed()
            try:
                failure = self._write_parts(key, text, pattern, fields, first, now)
                self._settle()
            finally:
                self.streamed = None
            if failure is not MOVED or attempt == MOVED_TRIES - 1:
                break
            # a list that moved while it was read: what its parts wrote taken back, and read again whole
            self._take_back(name, noted, examples)
            now = datetime.now(timezone.utc)
            first = read_keys(self.client, [(key, pattern.redis_type)], self.read_limit)[0]
            if first.resume is None:  # (no longer large, or gone, or another type: as any key read)
                self._prepare(key, text, pattern, fields, first, now)
                return
        if failure is None and streamed.error is None:
            self.cur.execute("RELEASE SAVEPOINT collection")
            self.rows_written += streamed.written
            self.seals.merge(streamed.seals)
            if pattern.transform is None:  # an index: read for its references, not migrated
                self.counts.add(name, "skipped")
            else:
                self.counts.add(name, "migrated", rows=streamed.rows)
                self.checksum ^= (zlib.crc32(key) << 32) | streamed.digest
            return
        self._take_back(name, noted, examples)
        if failure is GONE:
            self.counts.add(name, "expired")
        elif failure is not None:
            self._dead(key, text, pattern, first, failure)
        else:
            self._dead(key, text, pattern, first, describe(streamed.error), detail(streamed.error))

    def _take_back(self, name: str, noted: dict[str, int], examples: int) -> None:
        """A large collection's writes rolled back to its savepoint, and what it referenced counting no
        more than what it wrote (`noted`: the counts, `examples`: the dangling examples, before it)."""
        self.cur.execute("ROLLBACK TO SAVEPOINT collection; RELEASE SAVEPOINT collection")
        for f, n in noted.items():
            self.counts.note(name, f, n - self.counts.by_pattern.get(name, {}).get(f, 0))
        del self.dangling.get(name, [])[examples:]

    def _write_parts(self, key: bytes, text: str, pattern: Pattern, fields: dict[str, str], first: KeyRead,
                     now: datetime) -> str | None:
        """Each part of a large collection transformed, its references checked and its rows written
        as a sub-batch of their own while the next part is read; why it stopped short (GONE: the
        key went), or None (PostgreSQL may still refuse the last part: self.streamed.error)."""
        clock, t, streamed = time.perf_counter, self.timings, self.streamed
        expires_at = expiry(now, first.pttl)
        cap, size = self.opts.max_value_bytes, 0
        parts = read_parts(self.client, first)
        while streamed.error is None:
            self.check()  # (a run stopped mid-way through a long key stops here too)
            started = clock()
            part = next(parts, None)
            t["read"] += clock() - started
            if part is None:
                return None
            if self.throttle is not None and part is not first:  # a part costs Redis about what as many keys do
                t["throttle"] += self.throttle.acquire(CHUNK_READ_MEMBERS)
            size += part.size
            if part.redis_type == "none":
                return GONE
            if isinstance(part.raw, Moved):
                return MOVED
            if isinstance(part.raw, Exception):
                return f"Redis error reading the value: {part.raw}"
            if cap is not None and size > cap:
                return f"value is over the {cap:,}-byte limit of --max-value-bytes"
            try:
                rows = self._records(text, pattern, fields, part, expires_at, now)
            except SHAPE_ERRORS as exc:
                return _reason(exc)
            self._check_references()
            if rows:
                streamed.rows += len(rows)
                digest = value_digest(part.raw)
                streamed.digest = zlib.crc32(digest.to_bytes(4, "big"), streamed.digest)
                self._hold(Prepared(key, text, pattern, rows, expires_at, part, digest))
                self._flush(1)  # (after the part before is written)
            if self.progress is not None:  # a large key takes a while: the batch is still alive
                self.progress({f: self.counts.total(f) for f in ledger.COUNT_FIELDS})
        return None

    def _check_references(self) -> None:
        """Check the references the chunk's records made, in one round trip; count what dangles."""
        if not self.references:
            return
        found, self.references = self.references, []
        for (name, text, ref), missing in zip(found, self.checker.missing([ref for _, _, ref in found])):
            self.counts.note(name, "references")
            if missing:
                self.counts.note(name, "dangling")
                examples = self.dangling.setdefault(name, [])
                if len(examples) < DANGLING_EXAMPLES:
                    # printable: no text PostgreSQL keeps may hold a NUL, whatever a key name holds
                    examples.append({"key": printable(text), "reference": printable(ref.key),
                                     "member": None if ref.member is None else printable(ref.member)})

    def _flush(self, n: int) -> None:
        if not n:
            return
        records, self.pending = self.pending[:n], self.pending[n:]
        self.pending_bytes -= sum(rec.read.size for rec in records)
        self._settle()
        self.in_flight = records, self.write_behind.submit(contextvars.copy_context().run, self._write, records)

    def _write(self, records: list[Prepared]) -> tuple[int, list]:  # in the writer thread
        started = time.perf_counter()
        try:
            return self.writer.write(records)
        finally:
            self.timings["write"] += time.perf_counter() - started

    def _settle(self) -> None:
        """Wait for the sub-batch being written and account for it (its error, if any, fails the batch)."""
        if self.in_flight is None:
            return
        (records, future), self.in_flight = self.in_flight, None
        started = time.perf_counter()
        written, bad = future.result()
        self.timings["write_wait"] += time.perf_counter() - started
        if self.streamed is not None:  # a part of a large collection: its key is counted once all are in
            self.streamed.written += written
            self.streamed.error = self.streamed.error or next((exc for _, exc in bad), None)
            if not bad:
                for rec in records:
                    self.streamed.seals.add_rows(rec.pattern.provenance, rec.seals)
            return
        self.rows_written += written
        failed = {id(rec) for rec, _ in bad}
        for rec in records:
            if id(rec) not in failed:
                self.counts.add(rec.pattern.name, "migrated", rows=len(rec.rows))
                self.checksum ^= (zlib.crc32(rec.key) << 32) | rec.digest
                self.seals.add_rows(rec.pattern.provenance, rec.seals)
        for rec, exc in bad:
            self._dead(rec.key, rec.key_text, rec.pattern, rec.read, describe(exc), detail(exc))

    def _dead(self, key: bytes, text: str, pattern: Pattern, read: KeyRead | None, reason: str,
              detail: str | None = None) -> None:
        self.counts.add(pattern.name, "dead")
        raw, whole = dead_letter_value(self.client, read, DEAD_LETTER_VALUE_BYTES) if read else (None, None)
        if whole is not None and "bytes are kept" not in reason:
            reason += f" ({whole})"
        self.dead.append((
            pattern.name, key, printable(text),  # (the exact key is kept as bytes beside it)
            read.redis_type if read else None,
            raw,
            read.pttl if read else None,
            f"{reason} ({detail})" if detail else reason,
        ))
        log.warning("dead_letter", pattern=pattern.name, key=redact_text(text[:LOGGED_KEY_CHARS]), reason=redact_text(reason))
        self.dead_bytes += len(self.dead[-1][4] or b"") + len(key)
        # (not in a dry run: its writes are rolled back to a savepoint, dead letters after it)
        if self.dead_bytes > DEAD_LETTER_SPILL_BYTES and not self.opts.dry_run:
            self.spill_dead()

    def spill_dead(self) -> None:
        """Write the dead letters kept so far, in the batch's transaction: raw values of huge or
        many bad keys are not held in memory until the batch ends."""
        self._settle()  # the writer thread is done with the cursor
        ledger.add_dead_letters(self.cur, self.spec.run_id, self.spec.id, self.dead)
        self.dead, self.dead_bytes = [], 0


def _reason(exc: BaseException) -> str:
    """A dead letter's reason for what a transform raised."""
    return str(exc) if isinstance(exc, BadRecord) else f"{type(exc).__name__}: {exc}"


# A large collection's key went while its parts were read: it counts expired, not dead
GONE = "the key went mid-way"
# A list that moved between two of its parts is read again whole this many times in all, then is a dead
# letter saying so (a queue the app pushes to and pops from all the while)
MOVED_TRIES = 3
MOVED = f"{Moved()}, {MOVED_TRIES} times in a row: a run or `migrator follow` reads it again once the app leaves it still"

# Values held for one sub-batch at most: memory stays flat whatever the values' sizes.
SUB_BATCH_BYTES = 16 * 1024 * 1024

# Dead letters kept in memory before they are written out (their raw values can be large).
DEAD_LETTER_SPILL_BYTES = 16 * 1024 * 1024
# A dead letter keeps at most this much of its value (and says how large the value was).
DEAD_LETTER_VALUE_BYTES = 1024 * 1024

# Characters of a key name a log line shows (a name may be half a megabyte; the ledger keeps it whole).
LOGGED_KEY_CHARS = 200

# Dangling references kept per pattern and batch, as examples (the count is kept whole).
DANGLING_EXAMPLES = 5


def migrate_batch(client: redis.Redis, conn: Any, mapping: Mapping, batch_id: int,
                  progress: Progress | None = None, *, connect: Callable[[], Any]) -> BatchResult | None:
    """Run one planned batch from the ledger; None when it was already done.

    The batch is claimed first (see migrator/core/lease.py): a second delivery of a batch another
    live worker runs waits for it and then finds it done; a stale one is taken over. Raises
    Fenced when the run is not running, or stopped while the batch ran (nothing committed).
    `connect` opens the heartbeat's own connection.
    """
    claimed = lease.claim(conn, batch_id)
    if claimed is None:
        log.info("batch_already_done", batch=batch_id)
        return None
    spec, held = claimed
    try:
        # Every log line of this batch, ours or the writer's, carries run, priority and batch.
        with structlog.contextvars.bound_contextvars(run=spec.run_id, priority=spec.priority, batch=batch_id), \
                lease.Heartbeat(connect, held) as heartbeat, metrics.batch_outcome(spec.priority) as ended:
            return ended(_migrate(client, conn, mapping, spec, held, heartbeat, progress))
    finally:
        if held.locked:
            lease.release(conn, batch_id)


def _keys_of(cur: Any, mapping: Mapping, batch: _Batch) -> tuple[Iterable[list[bytes]] | None, spool.Spooled | None,
                                                                  spool.Recorder | None, str | None]:
    """Where a batch's keys come from (migrator/core/spool.py): (what to take, its spool when they
    are read from one, the recorder of a new spool when they are SCANned for one, the server process).
    The run's first priority SCANs and records; a later one reads the spool its range has on this
    server process, or SCANs and records when there is none; --scan-each-priority always SCANs."""
    spec, opts = batch.spec, batch.opts
    if opts.scan_each_priority:
        return None, None, None, None
    process = spool.source_process(batch.client)
    if spec.priority != opts.priority_order()[0].label:
        spooled = spool.replay(cur, spec.run_id, spec.key_range, spec.priority, process)
        if spooled is not None:
            return spooled, spooled, None, process
    recorder = spool.Recorder(spool.routes(mapping, opts), mapping)
    return recorder.tap(scan_range(batch.client, spec.key_range, batch.scan_count)), None, recorder, process


def _migrate(client: redis.Redis, conn: Any, mapping: Mapping, spec: ledger.BatchSpec, held: lease.Lease,
             heartbeat: lease.Heartbeat, progress: Progress | None) -> BatchResult:
    log.info("batch_started", range=spec.key_range.index, ranges=spec.key_range.count, dry_run=spec.options.dry_run)
    try:
        with conn.cursor() as cur:
            # Journals the prior image of every row this run updates (see migrator/core/sql/001_ledger.sql).
            cur.execute("SELECT set_config('migrator.run_id', %s, true)", (spec.run_id,))
            if spec.options.dry_run:
                cur.execute("SAVEPOINT dry_run")
            batch = _Batch(client, cur, mapping, spec, progress, heartbeat.check)
            try:
                found, spooled, recorder, process = _keys_of(cur, mapping, batch)
                walked = spooled.walked if spooled is not None else lambda: batch.walked
                heartbeat.walked = walked  # written with each beat: progress moves within the range
                batch.run(found, scanned=spooled is None)
            finally:
                if batch.client is not client:
                    batch.client.close()
            if spec.options.dry_run:
                cur.execute("ROLLBACK TO SAVEPOINT dry_run")
            if recorder is not None:  # (after a dry run's rollback: its later passes read it too)
                recorder.save(cur, spec.run_id, spec.key_range, process)
            checksum = f"{batch.checksum:016x}"
            batch.spill_dead()
            lease.still_ours(cur, held)  # (holds the run's row until the commit)
            ledger.finish_batch(cur, spec.id, batch.counts, batch.rows_written, checksum, batch.timings, batch.dangling,
                                walked(), batch.seals.to_json())
        conn.commit()
    except Fenced as exc:
        log.warning("batch_fenced", reason=str(exc))
        try:
            conn.rollback()
            with conn.cursor() as cur:
                lease.give_back(cur, held, f"stopped: {exc}")
            conn.commit()
        except psycopg2.Error:
            pass  # (the ledger shows it stale; nothing of it committed)
        raise
    except Exception as exc:
        reason = redact_text(describe(exc))
        log.error("batch_failed", error=reason)
        try:
            conn.rollback()
            with conn.cursor() as cur:
                ledger.fail_batch(cur, spec.id, held.attempt, reason)
            conn.commit()
        except psycopg2.Error:
            # PostgreSQL itself went away: the batch stays 'running' in the ledger, and its
            # retry (or `migrator resume`) runs it again from the start of its range
            log.warning("batch_failure_not_recorded", error=reason)
        raise
    log.info("batch_done", rows_written=batch.rows_written, **{f: batch.counts.total(f) for f in ledger.COUNT_FIELDS},
             seconds={k: round(v, 3) for k, v in batch.timings.items()})
    return BatchResult(spec.id, spec.priority, batch.counts, batch.rows_written, checksum)
