"""The dual-write service the app imports during a zero-downtime cutover.

Writes keep the app's Redis formats (threadr-keyspace.md) and reach PostgreSQL through the same
pattern transforms and per-table merge rules as the batch migration, so a backfill running
beside the app never overwrites a newer value and both paths agree on every row.

Strategies: REDIS_ONLY (before), DUAL_WRITE (Redis answers, PostgreSQL is written too),
POSTGRES_PRIMARY (PostgreSQL answers, Redis is still written as the fallback), POSTGRES_ONLY.
A failed write to the secondary store is never counted as a success: it is recorded in
`dual_write_repairs` with the exact key, value and TTL, and `repair()` applies it again.
"""
from __future__ import annotations

import enum
import json
import random
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import psycopg2
import redis
from psycopg2 import sql
import structlog

from .mapping import Mapping, SourceRecord
from .redact import redact_text
from .source import KeyRead, decode, value_digest
from .values import parse_dt
from .writer import Prepared, Writer, describe

log = structlog.get_logger("migrator.dualwrite")

DAY = 86_400
# identifier types of the app's reads -> subject types of its usage counter keys
SUBJECT_KINDS = {"ip": "ip", "email": "email", "user_id": "user"}
TABLES = ("dual_write_repairs", "dual_write_settings", "dual_write_shadow_reads")  # migrator/sql/003_dual_write.sql


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


def _iso(at: datetime) -> str:
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
            self._followed, self._followed_at = configured_strategy(self._pg()), time.monotonic()
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

    def _to_postgres(self, key: str, raw: bytes | None, ttl_s: int | None) -> None:
        """Through the pattern's transform and its table's merge rule, as the batch writer does;
        `raw` None deletes what the key wrote."""
        pattern, fields = self.mapping.classify(key)
        if pattern is None or not pattern.migrated:
            return  # the migration does not carry this key either
        if raw is None:
            conn = self._pg()
            with conn, conn.cursor() as cur:
                cur.execute(sql.SQL("DELETE FROM {} WHERE source_key = %s").format(sql.Identifier(pattern.table)), (key,))
            return
        now = datetime.now(timezone.utc)
        expires = now + timedelta(seconds=ttl_s) if ttl_s else None
        rows = pattern.transform(SourceRecord(key, fields, decode(raw, pattern.value_format), expires, now, timezone.utc))
        conn = self._pg()
        try:
            with conn, conn.cursor() as cur:
                Writer(cur, self.mapping, run_id=None).upsert(
                    [Prepared(key.encode(), key, pattern, rows, expires, KeyRead(key.encode(), pattern.redis_type, -1, raw, len(raw)),
                              value_digest(raw))])
        except psycopg2.Error:
            conn.close()  # a broken connection is replaced on the next call
            raise

    def _to_redis(self, key: str, raw: bytes | None, ttl_s: int | None) -> None:
        if raw is None:
            self.redis.delete(key)
        else:
            self.redis.set(key, raw, ex=ttl_s)

    def _record_repair(self, store: str, key: str, raw: bytes | None, ttl_s: int | None,
                       exc: BaseException) -> int | None:
        """Keep the failed secondary write in the store that just took it, for `repair()`."""
        reason = redact_text(describe(exc))
        log.warning("secondary_write_failed", store=store, key=redact_text(key), error=reason)
        conn = self._pg() if store == "redis" else None
        if conn is None:  # PostgreSQL is the one that failed: queue the repair in Redis
            return int(self.redis.rpush(REPAIR_QUEUE, json.dumps({
                "key": key, "raw": None if raw is None else raw.decode("latin-1"), "ttl_s": ttl_s, "error": reason})))
        with conn, conn.cursor() as cur:
            cur.execute("INSERT INTO dual_write_repairs (store, redis_key, raw_value, ttl_s, error) VALUES (%s, %s, %s, %s, %s)"
                        " RETURNING id", (store, key, None if raw is None else psycopg2.Binary(raw), ttl_s, reason))
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
        primary(key, raw, ttl_s)
        if not secondary:
            return WriteResult(key, True, None)
        store, write = secondary[0]
        try:
            write(key, raw, ttl_s)
        except (redis.RedisError, psycopg2.Error) as exc:
            return WriteResult(key, True, False, self._record_repair(store, key, raw, ttl_s, exc))
        return WriteResult(key, True, True)

    def repair(self) -> int:
        """Apply queued secondary writes again; returns how many succeeded."""
        done = 0
        while (item := self.redis.lpop(REPAIR_QUEUE)) is not None:
            entry = json.loads(item)
            try:
                raw = entry["raw"]
                self._to_postgres(entry["key"], None if raw is None else raw.encode("latin-1"), entry["ttl_s"])
                done += 1
            except psycopg2.Error:
                self.redis.lpush(REPAIR_QUEUE, item)  # still down: keep it, first in line
                return done
        conn = self._pg()
        with conn, conn.cursor() as cur:
            cur.execute("SELECT id, redis_key, raw_value, ttl_s FROM dual_write_repairs WHERE repaired_at IS NULL"
                        " AND store = 'redis' ORDER BY id FOR UPDATE SKIP LOCKED")
            for repair_id, key, raw, ttl_s in cur.fetchall():
                self._to_redis(key, None if raw is None else bytes(raw), ttl_s)
                cur.execute("UPDATE dual_write_repairs SET repaired_at = now(), attempts = attempts + 1 WHERE id = %s",
                            (repair_id,))
                done += 1
        return done

    # --- the app's operations -------------------------------------------------------------------

    def create_user(self, email: str, password_hash: str, *, role: str = "user", user_id: str | None = None,
                    metadata: dict[str, Any] | None = None) -> str:
        user_id = user_id or "user_" + secrets.token_urlsafe(16)
        now = _iso(datetime.now(timezone.utc))
        self.put(f"threadr:user:{user_id}", {
            "user_id": user_id, "email": email, "password_hash": password_hash, "role": role, "status": "active",
            "created_at": now, "updated_at": now, "last_login_at": None, "login_count": 0,
            "failed_login_attempts": 0, "last_failed_login": None, "is_email_verified": False,
            "email_verification_token": None, "password_reset_token": None, "password_reset_expires": None,
            "metadata": metadata or {}}, 2 * 365 * DAY)
        if self.strategy.writes_redis:
            self.redis.set(f"threadr:user:email:{email}", user_id, ex=2 * 365 * DAY)
        return user_id

    def update_user(self, user_id: str, **changes: Any) -> WriteResult:
        """Change fields of a registered user (role, status, login counts, tokens, ...)."""
        doc = self._document(f"threadr:user:{user_id}", "users", user_doc)
        return self.put(f"threadr:user:{user_id}", {**doc, **changes, "updated_at": _iso(datetime.now(timezone.utc))},
                        2 * 365 * DAY)

    def save_thread(self, user_id: str, title: str, original_content: str, tweets: list[dict[str, Any]],
                    metadata: dict[str, Any] | None = None) -> str:
        thread_id = str(uuid.uuid4())
        now = _iso(datetime.now(timezone.utc))
        self.put(f"threadr:thread:{thread_id}", {
            "id": thread_id, "user_id": user_id, "title": title, "original_content": original_content,
            "tweets": tweets, "metadata": metadata or {}, "created_at": now, "updated_at": now,
            "view_count": 0, "copy_count": 0, "is_favorite": False, "is_archived": False}, 365 * DAY)
        return thread_id

    def update_thread(self, thread_id: str, **changes: Any) -> WriteResult:
        doc = self._document(f"threadr:thread:{thread_id}", "threads", thread_doc)
        return self.put(f"threadr:thread:{thread_id}", {**doc, **changes, "updated_at": _iso(datetime.now(timezone.utc))},
                        365 * DAY)

    def delete_thread(self, thread_id: str) -> WriteResult:
        return self.put(f"threadr:thread:{thread_id}", None, None)

    def create_subscription(self, customer: str, subscription: dict[str, Any]) -> WriteResult:
        """A Stripe subscription under the customer's id (user_<token> or email), as the webhook wrote it."""
        return self.put(f"threadr:subscription:user:{customer}", subscription, 365 * DAY)

    def update_subscription(self, customer: str, **changes: Any) -> WriteResult:
        key = f"threadr:subscription:user:{customer}"
        return self.put(key, {**self._document(key, "subscriptions", subscription_doc), **changes}, 365 * DAY)

    def cancel_subscription(self, customer: str) -> WriteResult:
        return self.update_subscription(customer, status="canceled", cancel_at_period_end=True)

    def _document(self, key: str, table: str, from_row: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """The app's current document for `key`: from Redis while Redis is written, else rebuilt from PostgreSQL."""
        if self.strategy.writes_redis:
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

    def grant_premium_access(self, identifier: str, identifier_type: str, days: int,
                             payment_info: dict[str, Any] | None = None) -> list[WriteResult]:
        """The app's grant: one value under the ip key or the email key (a user_id's email) of the purchase."""
        if identifier_type == "user_id":
            identifier, identifier_type = self._document(f"threadr:user:{identifier}", "users", user_doc)["email"], "email"
        if identifier_type not in ("ip", "email"):
            raise ValueError("identifier_type must be 'ip', 'email' or 'user_id'")
        now = datetime.now(timezone.utc)
        ip, email = (identifier, None) if identifier_type == "ip" else (None, identifier)
        info = {"payment_reference": f"grant_{secrets.token_hex(8)}", "granted_at": _iso(now),
                "granted_by": "dual_write_service", "client_ip": ip, **(payment_info or {})}
        grant = {"granted_at": _iso(now), "expires_at": _iso(now + timedelta(days=days)), "plan": "premium",
                 "duration_days": days, "client_ip": ip, "email": email, "payment_info": info}
        return [self.put(f"threadr:premium:{identifier_type}:{identifier}", grant, days * DAY + 7 * DAY)]

    def track_usage(self, ip: str, email: str | None = None, user_id: str | None = None) -> None:
        """One generation: daily and monthly counters per subject, counted in the primary store."""
        today = datetime.now(timezone.utc).date()
        for kind, subject in (("ip", ip), ("email", email), ("user", user_id)):
            if subject:
                for period, bucket, ttl in (("daily", today.isoformat(), DAY), ("monthly", today.strftime("%Y-%m"), 31 * DAY)):
                    self._count(f"threadr:usage:{kind}:{subject}:{period}:{bucket}", ttl)

    def _count(self, key: str, ttl_s: int) -> None:
        if self.strategy.writes_redis and not self.strategy.reads_postgres:
            value = self.redis.incr(key)  # Redis counts; PostgreSQL takes the count (GREATEST merge)
            self.redis.expire(key, ttl_s, nx=True)
            if self.strategy.writes_postgres:
                self._secondary_count(key, value, ttl_s)
            return
        value = self._pg_increment(key)  # PostgreSQL counts
        if self.strategy.writes_redis:
            try:
                self.redis.set(key, value, ex=ttl_s)
            except redis.RedisError as exc:
                self._record_repair("redis", key, str(value).encode(), ttl_s, exc)

    def _secondary_count(self, key: str, value: int, ttl_s: int) -> None:
        try:
            self._to_postgres(key, str(value).encode(), ttl_s)
        except psycopg2.Error as exc:
            self._record_repair("postgres", key, str(value).encode(), ttl_s, exc)

    def _pg_increment(self, key: str) -> int:
        pattern, fields = self.mapping.classify(key)
        rows = pattern.transform(SourceRecord(key, fields, 1, None, datetime.now(timezone.utc), timezone.utc))
        row = rows[0].values
        conn = self._pg()
        with conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO usage_counters (id, subject_type, subject, period, period_start, count, metadata)"
                " VALUES (%(id)s, %(subject_type)s, %(subject)s, %(period)s, %(period_start)s, 1, '{\"source\": \"dual_write\"}')"
                " ON CONFLICT (id) DO UPDATE SET count = usage_counters.count + 1 RETURNING count", row)
            return cur.fetchone()[0]

    # --- the reads the app relies on -------------------------------------------------------------

    def check_premium_access(self, identifier: str, identifier_type: str) -> dict[str, Any]:
        return self._read("check_premium_access", self._premium_from_redis, self._premium_from_postgres,
                          identifier, identifier_type)

    def get_usage_stats(self, identifier: str, identifier_type: str) -> dict[str, int]:
        return self._read("get_usage_stats", self._usage_from_redis, self._usage_from_postgres,
                          identifier, identifier_type)

    def _read(self, operation: str, from_redis: Callable, from_postgres: Callable, identifier: str, kind: str) -> Any:
        strategy = self.strategy
        if strategy.reads_postgres:
            return from_postgres(identifier, kind)
        answer = from_redis(identifier, kind)
        if strategy is WriteStrategy.DUAL_WRITE and self.shadow_rate and random.random() < self.shadow_rate:
            self._shadow.submit(self._compare, operation, from_postgres, identifier, kind, answer)
        return answer

    def _compare(self, operation: str, from_postgres: Callable, identifier: str, kind: str, redis_answer: Any) -> None:
        """Off the request path, on its own connection: PostgreSQL's answer against Redis's."""
        try:
            conn = self._connect()
            try:
                postgres_answer = from_postgres(identifier, kind, conn=conn)
                with conn, conn.cursor() as cur:
                    cur.execute("INSERT INTO dual_write_shadow_reads (operation, matched, redis_answer, postgres_answer,"
                                " identifier) VALUES (%s, %s, %s, %s, %s)",
                                (operation, postgres_answer == redis_answer, json.dumps(redis_answer, default=str),
                                 json.dumps(postgres_answer, default=str), identifier))
            finally:
                conn.close()
        except psycopg2.Error as exc:  # a shadow read never fails the app
            log.warning("shadow_read_failed", operation=operation, error=redact_text(describe(exc)))

    def _usage_from_postgres(self, identifier: str, identifier_type: str, conn: Any = None) -> dict[str, int]:
        kind = SUBJECT_KINDS[identifier_type]
        today = datetime.now(timezone.utc).date()
        conn = conn or self._pg()
        with conn, conn.cursor() as cur:
            cur.execute("SELECT period, count FROM usage_counters WHERE subject_type = %s AND subject = %s"
                        " AND ((period = 'daily' AND period_start = %s) OR (period = 'monthly' AND period_start = %s))",
                        (kind, identifier, today, today.replace(day=1)))
            found = dict(cur.fetchall())
        return {"daily": found.get("daily", 0), "monthly": found.get("monthly", 0)}

    def _usage_from_redis(self, identifier: str, identifier_type: str) -> dict[str, int]:
        kind = SUBJECT_KINDS[identifier_type]
        today = datetime.now(timezone.utc).date()
        daily = self.redis.get(f"threadr:usage:{kind}:{identifier}:daily:{today.isoformat()}")
        monthly = self.redis.get(f"threadr:usage:{kind}:{identifier}:monthly:{today.strftime('%Y-%m')}")
        return {"daily": int(daily or 0), "monthly": int(monthly or 0)}

    def _premium_from_redis(self, identifier: str, identifier_type: str) -> dict[str, Any]:
        now = datetime.now(timezone.utc)
        if identifier_type in ("user_id", "email"):
            raw = self.redis.get(f"threadr:subscription:user:{identifier}")
            if raw:
                sub = json.loads(raw)
                end = parse_dt(sub.get("current_period_end"), timezone.utc)
                if sub.get("status") in ("active", "trialing") and end and end > now:
                    return {"has_premium": True, "source": "subscription", "expires_at": end}
        if identifier_type in ("ip", "email"):
            raw = self.redis.get(f"threadr:premium:{identifier_type}:{identifier}")
            if raw:
                expires = parse_dt(json.loads(raw).get("expires_at"), timezone.utc)
                if expires and expires > now:
                    return {"has_premium": True, "source": f"{identifier_type}_grant", "expires_at": expires}
        return {"has_premium": False, "source": "free", "expires_at": None}

    def _premium_from_postgres(self, identifier: str, identifier_type: str, conn: Any = None) -> dict[str, Any]:
        conn = conn or self._pg()
        with conn, conn.cursor() as cur:
            if identifier_type in ("user_id", "email"):
                cur.execute("SELECT current_period_end FROM subscriptions WHERE kind = 'stripe' AND customer_ref = %s"
                            " AND status IN ('active', 'trialing') AND current_period_end > now()"
                            " ORDER BY current_period_end DESC LIMIT 1", (identifier,))
                row = cur.fetchone()
                if row:
                    return {"has_premium": True, "source": "subscription", "expires_at": row[0]}
            if identifier_type in ("ip", "email"):
                # Redis kept only the latest grant under a key: so does this read
                cur.execute(sql.SQL("SELECT premium_expires_at FROM subscriptions WHERE kind = 'premium_grant'"
                                    " AND {} = %s ORDER BY granted_at DESC NULLS LAST LIMIT 1")
                            .format(sql.Identifier(identifier_type)), (identifier,))
                row = cur.fetchone()
                if row and row[0] and row[0] > datetime.now(timezone.utc):
                    return {"has_premium": True, "source": f"{identifier_type}_grant", "expires_at": row[0]}
        return {"has_premium": False, "source": "free", "expires_at": None}


# PostgreSQL rows back to the app's documents, for updates once Redis is no longer written.

def _naive(value: str | None) -> str | None:
    return _iso(datetime.fromisoformat(value)) if value else None


def user_doc(row: dict[str, Any]) -> dict[str, Any]:
    times = ("created_at", "updated_at", "last_login_at", "last_failed_login", "password_reset_expires")
    fields = ("email", "password_hash", "role", "status", "login_count", "failed_login_attempts", "is_email_verified",
              "email_verification_token", "password_reset_token")
    return {"user_id": row["legacy_id"], **{f: row[f] for f in fields}, **{t: _naive(row[t]) for t in times},
            "metadata": row["app_metadata"]}


def thread_doc(row: dict[str, Any]) -> dict[str, Any]:
    fields = ("title", "original_content", "tweets", "view_count", "copy_count", "is_favorite", "is_archived")
    return {"id": row["id"], "user_id": row["user_ref"], **{f: row[f] for f in fields}, "metadata": row["app_metadata"],
            "created_at": _naive(row["created_at"]), "updated_at": _naive(row["updated_at"])}


def subscription_doc(row: dict[str, Any]) -> dict[str, Any]:
    fields = ("plan_display_name", "tier_level", "cancel_at_period_end", "thread_limit", "features", "is_annual",
              "monthly_price", "annual_price")
    return {"subscription_id": row["stripe_subscription_id"], "plan_name": row["plan"], "status": row["status_raw"],
            **{f: row[f] for f in fields}, "current_period_start": _naive(row["current_period_start"]),
            "current_period_end": _naive(row["current_period_end"])}


def configured_strategy(conn: Any) -> WriteStrategy:
    """The strategy `migrator cutover` set; DUAL_WRITE until it has set one."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT strategy FROM dual_write_settings")
        row = cur.fetchone()
    return WriteStrategy(row[0]) if row else WriteStrategy.DUAL_WRITE


# Failed PostgreSQL writes wait here, in Redis (which took them), until `repair()`.
REPAIR_QUEUE = "migrator:dual_write:repairs"
