"""The dual-write service an app imports during a zero-downtime cutover.

An application's operations (migrator/apps/<app>/dualwrite.py) subclass
DualWriteService: they write the app's Redis formats with `put`, and answer the app's reads
with `read`, whose shadow reads `migrator parity` and `migrator cutover` judge. Writes reach
PostgreSQL through the same pattern transforms and per-table merge rules as the batch migration, so a backfill running
beside the app never overwrites a newer value and both paths agree on every row.

Strategies: REDIS_ONLY (before), DUAL_WRITE (Redis answers, PostgreSQL is written too),
POSTGRES_PRIMARY (PostgreSQL answers, Redis is still written as the fallback), POSTGRES_ONLY.
A failed write to the secondary store is never counted as a success: it is recorded in
`dual_write_repairs` with the exact key, value and expiry, and `repair()` applies it again: a key
expires when the app's write said, however late its repair (one whose time is up is not made again).
"""
from __future__ import annotations

import enum
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import psycopg2
import redis
from psycopg2 import sql
import structlog

from migrator.core import ledger
from migrator.core.mapping import Mapping, SourceRecord
from migrator.core.redact import redact_text
from migrator.core.source import MILLISECOND, KeyRead, decode, expiry, value_digest
from migrator.core.writer import Prepared, Writer, describe

log = structlog.get_logger("migrator.cutover.dualwrite")

TABLES = ("dual_write_repairs", "dual_write_settings", "dual_write_shadow_reads")  # migrator/core/sql/003_dual_write.sql


class WriteStrategy(str, enum.Enum):
    REDIS_ONLY = "redis_only"
    DUAL_WRITE = "dual_write"
    POSTGRES_PRIMARY = "postgres_primary"
    POSTGRES_ONLY = "postgres_only"

    @property
    def writes_redis(self) -> bool:
        return self is not WriteStrategy.POSTGRES_ONLY

    @property
    def writes_postgres(self) -> bool:
        return self is not WriteStrategy.REDIS_ONLY

    @property
    def reads_postgres(self) -> bool:
        return self in (WriteStrategy.POSTGRES_PRIMARY, WriteStrategy.POSTGRES_ONLY)


@dataclass(frozen=True)
class WriteResult:
    """What happened to one write: the primary store took it; the secondary did, or it awaits repair."""

    key: str
    primary_ok: bool
    secondary_ok: bool | None  # None: this strategy has no secondary store
    repair_id: int | None = None


def deadline(ttl_s: int | None) -> datetime | None:
    """When a write given `ttl_s` now expires (None: never)."""
    return expiry(datetime.now(timezone.utc), (ttl_s or 0) * 1000)


def app_time(at: datetime) -> str:
    # the app wrote naive UTC datetimes
    return at.astimezone(timezone.utc).replace(tzinfo=None).isoformat()


class DualWriteService:
    """`strategy` fixed, or None to follow `dual_write_settings` (what `migrator cutover` switches),
    re-read at most every `follow_every_s`. `shadow_rate`: the share of reads, in DUAL_WRITE,
    also answered by PostgreSQL and compared, in a background thread off the request path."""

    def __init__(self, client: redis.Redis, connect: Callable[[], Any], mapping: Mapping,
                 strategy: WriteStrategy | None = WriteStrategy.DUAL_WRITE, *, shadow_rate: float = 0.0,
                 follow_every_s: float = 5.0) -> None:
        self.redis, self._connect, self.mapping = client, connect, mapping
        self._fixed, self._followed, self._followed_at, self._follow_every = strategy, None, 0.0, follow_every_s
        self.shadow_rate = shadow_rate
        self._shadow = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow-read")
        self._conn: Any = None

    @property
    def strategy(self) -> WriteStrategy:
        if self._fixed is not None:
            return self._fixed
        if self._followed is None or time.monotonic() - self._followed_at > self._follow_every:
            try:
                self._followed = configured_strategy(self._pg())
            except psycopg2.Error:
                # PostgreSQL unreachable a moment: the app's writes go on by the strategy last read (its
                # PostgreSQL side recorded for repair), and the setting is read again at the next look
                if self._conn is not None:
                    self._conn.close()
                if self._followed is None:
                    raise
                log.warning("strategy_not_read", kept=self._followed.value)
            self._followed_at = time.monotonic()
        return self._followed

    @strategy.setter
    def strategy(self, value: WriteStrategy) -> None:
        self._fixed = value

    # --- plumbing ---------------------------------------------------------------------------

    def _pg(self) -> Any:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def close(self) -> None:
        self._shadow.shutdown(wait=True)
        if self._conn is not None and not self._conn.closed:
            self._conn.close()

    def _to_postgres(self, key: str, raw: bytes | None, expires: datetime | None) -> None:
        """Through the pattern's transform and its table's merge rule, as the batch writer does;
        `raw` None, or an expiry past, deletes what the key wrote."""
        pattern, fields = self.mapping.classify(key)
        if pattern is None or not pattern.migrated:
            return  # the migration does not carry this key either
        now = datetime.now(timezone.utc)
        if raw is None or (expires is not None and expires <= now):
            conn = self._pg()
            with conn, conn.cursor() as cur:
                cur.execute(sql.SQL("DELETE FROM {} WHERE source_key = %s").format(sql.Identifier(pattern.table)), (key,))
            return
        rows = pattern.transform(SourceRecord(key, fields, decode(raw, pattern.value_format), expires, now, timezone.utc))
        conn = self._pg()
        try:
            with conn, conn.cursor() as cur:
                Writer(cur, self.mapping, run_id=None).upsert(
                    [Prepared(key.encode(), key, pattern, rows, expires, KeyRead(key.encode(), pattern.redis_type, -1, raw, len(raw)),
                              value_digest(raw))])
                # the app's write, stamped as follow stamps what it applies (merge.SYNCED_AT): a bulk batch
                # that began before it, and may have read the key before it, leaves the row alone
                by_table: dict[str, list[tuple[str, str]]] = {}
                for row in rows:
                    by_table.setdefault(row.table, []).append((row.values["id"], key))
                for table, given in by_table.items():
                    ledger.stamp_synced(cur, table, given)
                # rows the key gave before and gives no more (a customer's new subscription under the key
                # of the old): gone, as a run's validation retires them; a row another key may give too
                # (one grant under two keys) is left to it (verify names it if none does)
                for table in pattern.tables:
                    if pattern not in self.mapping.sharing(table):
                        cur.execute(sql.SQL("DELETE FROM {} WHERE " + ledger.NOT_KEPT).format(sql.Identifier(table)),
                                    {"keys": [key], "keep": [row_id for row_id, _ in by_table.get(table, [])]})
        except psycopg2.Error:
            conn.close()  # a broken connection is replaced on the next call
            raise

    def _to_redis(self, key: str, raw: bytes | None, expires: datetime | None) -> None:
        left_ms = None if expires is None else int((expires - datetime.now(timezone.utc)) / MILLISECOND)
        if raw is None or (left_ms is not None and left_ms <= 0):
            self.redis.delete(key)
        else:
            self.redis.set(key, raw, px=left_ms)

    def _record_repair(self, store: str, key: str, raw: bytes | None, expires: datetime | None,
                       exc: BaseException) -> int | None:
        """Keep the failed secondary write in the store that just took it, for `repair()`."""
        reason = redact_text(describe(exc))
        log.warning("secondary_write_failed", store=store, key=redact_text(key), error=reason)
        conn = self._pg() if store == "redis" else None
        if conn is None:  # PostgreSQL is the one that failed: queue the key in Redis, which holds its value
            return int(self.redis.rpush(REPAIR_QUEUE, json.dumps({"key": key, "error": reason})))
        with conn, conn.cursor() as cur:
            cur.execute("INSERT INTO dual_write_repairs (store, redis_key, raw_value, expires_at, error) VALUES (%s, %s, %s, %s, %s)"
                        " RETURNING id", (store, key, None if raw is None else psycopg2.Binary(raw), expires, reason))
            return cur.fetchone()[0]

    def put(self, key: str, value: Any, ttl_s: int | None) -> WriteResult:
        """Write one key to the primary store, then the secondary; a secondary failure is queued.
        `value` None deletes the key (and what it wrote in PostgreSQL)."""
        raw = value if value is None or isinstance(value, bytes) else (
            value if isinstance(value, str) else json.dumps(value)).encode()
        writers = [("redis", self._to_redis)] if self.strategy.writes_redis else []
        if self.strategy.writes_postgres:
            writers.append(("postgres", self._to_postgres))
        if self.strategy.reads_postgres:
            writers.reverse()  # PostgreSQL first: it answers the reads now
        (_, primary), *secondary = writers
        expires = deadline(ttl_s)  # (before either write: never later than Redis's)
        primary(key, raw, expires)
        if not secondary:
            return WriteResult(key, True, None)
        store, write = secondary[0]
        try:
            write(key, raw, expires)
        except (redis.RedisError, psycopg2.Error) as exc:
            return WriteResult(key, True, False, self._record_repair(store, key, raw, expires, exc))
        return WriteResult(key, True, True)

    def repair(self) -> int:
        """Bring each key a secondary write failed for to what its primary store holds now; returns how
        many repairs were applied. The queued bytes are not replayed where they may be older than the
        primary: a later write (a delete, a reactivation) would be undone by them."""
        done = 0
        while (item := self.redis.lpop(REPAIR_QUEUE)) is not None:
            key = json.loads(item)["key"]
            try:
                # Redis took the write, and every later one: what it holds now is what PostgreSQL is to hold
                now = datetime.now(timezone.utc)
                raw, pttl = self.redis.pipeline(transaction=False).get(key).pttl(key).execute()
                self._to_postgres(key, raw, None if raw is None else expiry(now, pttl))
                done += 1
            except psycopg2.Error:
                self.redis.lpush(REPAIR_QUEUE, item)  # still down: keep it, first in line
                return done
        conn = self._pg()
        with conn, conn.cursor() as cur:
            cur.execute("SELECT id, redis_key, raw_value, coalesce(expires_at, created_at + ttl_s * interval '1 second')"
                        " FROM dual_write_repairs WHERE repaired_at IS NULL AND store = 'redis' ORDER BY id FOR UPDATE SKIP LOCKED")
            queued = cur.fetchall()
            latest = {key: repair_id for repair_id, key, _, _ in queued}  # (a later repair of the key supersedes)
            for repair_id, key, raw, expires in queued:
                raw = None if raw is None else bytes(raw)
                if latest[key] == repair_id and self._current_in_postgres(cur, key, raw):
                    self._to_redis(key, raw, expires)
                    done += 1
                cur.execute("UPDATE dual_write_repairs SET repaired_at = now(), attempts = attempts + 1 WHERE id = %s",
                            (repair_id,))
        return done

    def _current_in_postgres(self, cur: Any, key: str, raw: bytes | None) -> bool:
        """Whether PostgreSQL, the primary, still holds what `raw` gave `key` (by the digest its rows keep of
        the value they came from): else a later write changed it, and Redis was given that one, or it is
        queued after this. Where no row says (a counter PostgreSQL counts), the queued value is all there is."""
        pattern, _ = self.mapping.classify(key)
        if pattern is None or not pattern.migrated:
            return True
        cur.execute(sql.SQL("SELECT source_digest FROM {} WHERE source_key = %s AND source_digest IS NOT NULL LIMIT 1").format(
            sql.Identifier(pattern.table)), (key,))
        found = cur.fetchone()
        if found is None:
            return True
        return raw is not None and found[0] == value_digest(raw)

    # --- for an application's operations (a subclass of this one) ---------------------------

    def document(self, key: str, table: str, from_row: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """The app's current document for `key`, from the store that answers the reads: Redis, else rebuilt
        from PostgreSQL (under POSTGRES_PRIMARY too: Redis, the fallback, may miss a write whose Redis side
        failed, and a change made on top of it would lose that write in the primary)."""
        if not self.strategy.reads_postgres:
            raw = self.redis.get(key)
            if raw is None:
                raise LookupError(f"{redact_text(key)} does not exist")
            return json.loads(raw)
        conn = self._pg()
        with conn, conn.cursor() as cur:
            cur.execute(sql.SQL("SELECT to_jsonb(t) FROM {} t WHERE source_key = %s").format(sql.Identifier(table)), (key,))
            row = cur.fetchone()
        if row is None:
            raise LookupError(f"{redact_text(key)} does not exist")
        return from_row(row[0])

    def secondary_write(self, key: str, value: int, expires: datetime | None) -> None:
        try:
            self._to_postgres(key, str(value).encode(), expires)
        except psycopg2.Error as exc:
            self._record_repair("postgres", key, str(value).encode(), expires, exc)


    def read(self, operation: str, from_redis: Callable, from_postgres: Callable, identifier: str, kind: str) -> Any:
        """One of the app's reads, answered by the store the strategy reads; in DUAL_WRITE, a
        share of them (`shadow_rate`) also asked of PostgreSQL, off the request path, and the two
        answers recorded under `operation` for `migrator parity`."""
        strategy = self.strategy
        if strategy.reads_postgres:
            return from_postgres(identifier, kind)
        answer = from_redis(identifier, kind)
        if strategy is WriteStrategy.DUAL_WRITE and self.shadow_rate and random.random() < self.shadow_rate:
            self._shadow.submit(self._compare, operation, from_redis, from_postgres, identifier, kind, answer)
        return answer

    def _compare(self, operation: str, from_redis: Callable, from_postgres: Callable, identifier: str, kind: str,
                 redis_answer: Any) -> None:
        """Off the request path, on its own connection: PostgreSQL's answer against Redis's. PostgreSQL
        answers later than Redis did: a counter the app counts all the while has moved meanwhile, so
        Redis is asked again after it, and PostgreSQL matches when it says either of Redis's answers."""
        try:
            conn = self._connect()
            try:
                postgres_answer = from_postgres(identifier, kind, conn=conn)
                if postgres_answer != redis_answer:
                    redis_answer = from_redis(identifier, kind)
                with conn, conn.cursor() as cur:
                    cur.execute("INSERT INTO dual_write_shadow_reads (operation, matched, redis_answer, postgres_answer,"
                                " identifier) VALUES (%s, %s, %s, %s, %s)",
                                (operation, postgres_answer == redis_answer, json.dumps(redis_answer, default=str),
                                 json.dumps(postgres_answer, default=str), identifier))
            finally:
                conn.close()
        except psycopg2.Error as exc:  # a shadow read never fails the app
            log.warning("shadow_read_failed", operation=operation, error=redact_text(describe(exc)))

def configured_strategy(conn: Any) -> WriteStrategy:
    """The strategy `migrator cutover` set; DUAL_WRITE until it has set one."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT strategy FROM dual_write_settings")
        row = cur.fetchone()
    return WriteStrategy(row[0]) if row else WriteStrategy.DUAL_WRITE


# Failed PostgreSQL writes wait here, in Redis (which took them), until `repair()`.
REPAIR_QUEUE = "migrator:dual_write:repairs"
