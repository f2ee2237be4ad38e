"""Threadr's operations and reads through the dual-write service, in its own Redis formats."""
from __future__ import annotations

import json
import secrets
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import redis
from psycopg2 import sql

from migrator.cutover.dualwrite import DualWriteService, WriteResult, app_time
from migrator.core.mapping import SourceRecord
from migrator.core.source import expiry
from migrator.core.values import parse_dt

DAY = 86_400

# identifier types of the app's reads -> subject types of its usage counter keys
SUBJECT_KINDS = {"ip": "ip", "email": "email", "user_id": "user"}
# The reads whose shadow-read parity a cutover requires (`migrator cutover`).
PARITY_READS = ("check_premium_access", "get_usage_stats")


class ThreadrDualWrite(DualWriteService):
    """Threadr's writes and the two reads it relies on, through the dual-write service."""

    def create_user(self, email: str, password_hash: str, *, role: str = "user", user_id: str | None = None,
                    metadata: dict[str, Any] | None = None) -> str:
        user_id = user_id or "user_" + secrets.token_urlsafe(16)
        now = app_time(datetime.now(timezone.utc))
        self.put(f"threadr:user:{user_id}", {
            "user_id": user_id, "email": email, "password_hash": password_hash, "role": role, "status": "active",
            "created_at": now, "updated_at": now, "last_login_at": None, "login_count": 0,
            "failed_login_attempts": 0, "last_failed_login": None, "is_email_verified": False,
            "email_verification_token": None, "password_reset_token": None, "password_reset_expires": None,
            "metadata": metadata or {}}, 2 * 365 * DAY)
        # (its email index through put as well: PostgreSQL's legacy_id_map holds it as a run's does)
        self.put(f"threadr:user:email:{email}", user_id, 2 * 365 * DAY)
        return user_id

    def update_user(self, user_id: str, **changes: Any) -> WriteResult:
        """Change fields of a registered user (role, status, login counts, tokens, ...)."""
        doc = self.document(f"threadr:user:{user_id}", "users", user_doc)
        return self.put(f"threadr:user:{user_id}", {**doc, **changes, "updated_at": app_time(datetime.now(timezone.utc))},
                        2 * 365 * DAY)

    def save_thread(self, user_id: str, title: str, original_content: str, tweets: list[dict[str, Any]],
                    metadata: dict[str, Any] | None = None) -> str:
        thread_id = str(uuid.uuid4())
        now = app_time(datetime.now(timezone.utc))
        self.put(f"threadr:thread:{thread_id}", {
            "id": thread_id, "user_id": user_id, "title": title, "original_content": original_content,
            "tweets": tweets, "metadata": metadata or {}, "created_at": now, "updated_at": now,
            "view_count": 0, "copy_count": 0, "is_favorite": False, "is_archived": False}, 365 * DAY)
        return thread_id

    def update_thread(self, thread_id: str, **changes: Any) -> WriteResult:
        doc = self.document(f"threadr:thread:{thread_id}", "threads", thread_doc)
        return self.put(f"threadr:thread:{thread_id}", {**doc, **changes, "updated_at": app_time(datetime.now(timezone.utc))},
                        365 * DAY)

    def delete_thread(self, thread_id: str) -> WriteResult:
        return self.put(f"threadr:thread:{thread_id}", None, None)

    def create_subscription(self, customer: str, subscription: dict[str, Any]) -> WriteResult:
        """A Stripe subscription under the customer's id (user_<token> or email), as the webhook wrote it."""
        return self.put(f"threadr:subscription:user:{customer}", subscription, 365 * DAY)

    def update_subscription(self, customer: str, **changes: Any) -> WriteResult:
        key = f"threadr:subscription:user:{customer}"
        return self.put(key, {**self.document(key, "subscriptions", subscription_doc), **changes}, 365 * DAY)

    def cancel_subscription(self, customer: str) -> WriteResult:
        return self.update_subscription(customer, status="canceled", cancel_at_period_end=True)

    def grant_premium_access(self, identifier: str, identifier_type: str, days: int,
                             payment_info: dict[str, Any] | None = None) -> list[WriteResult]:
        """The app's grant: one value under the ip key or the email key (a user_id's email) of the purchase."""
        if identifier_type == "user_id":
            identifier, identifier_type = self.document(f"threadr:user:{identifier}", "users", user_doc)["email"], "email"
        if identifier_type not in ("ip", "email"):
            raise ValueError("identifier_type must be 'ip', 'email' or 'user_id'")
        now = datetime.now(timezone.utc)
        ip, email = (identifier, None) if identifier_type == "ip" else (None, identifier)
        info = {"payment_reference": f"grant_{secrets.token_hex(8)}", "granted_at": app_time(now),
                "granted_by": "dual_write_service", "client_ip": ip, **(payment_info or {})}
        grant = {"granted_at": app_time(now), "expires_at": app_time(now + timedelta(days=days)), "plan": "premium",
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
            # Redis counts, its TTL set by the first count only, as the app's; PostgreSQL takes the count
            # (GREATEST merge) and the expiry the key has (its PTTL, from before the call: source.expiry)
            now = datetime.now(timezone.utc)
            value, _, pttl = self.redis.pipeline(transaction=False).incr(key).expire(key, ttl_s, nx=True).pttl(key).execute()
            if self.strategy.writes_postgres:
                self.secondary_write(key, value, expiry(now, pttl))
            return
        value, expires = self._pg_increment(key, ttl_s)  # PostgreSQL counts
        if self.strategy.writes_redis:  # Redis mirrors the count, to expire when its row does
            try:
                self._to_redis(key, str(value).encode(), expires)
            except redis.RedisError as exc:
                self._record_repair("redis", key, str(value).encode(), expires, exc)

    def _pg_increment(self, key: str, ttl_s: int) -> tuple[int, datetime | None]:
        """PostgreSQL counts as the app's INCR and EXPIRE NX do in Redis: the count that starts a
        counter sets when it expires (so does one that finds it without an expiry), a later count
        keeps it, and one past it starts the count again; the count and the expiry it has."""
        now = datetime.now(timezone.utc)
        pattern, fields = self.mapping.classify(key)
        rows = pattern.transform(SourceRecord(key, fields, 1, None, now, timezone.utc))
        conn = self._pg()
        with conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO usage_counters AS t (id, subject_type, subject, period, period_start, count, metadata, expires_at)"
                " VALUES (%(id)s, %(subject_type)s, %(subject)s, %(period)s, %(period_start)s, 1,"
                " '{\"source\": \"dual_write\"}', %(expires)s)"
                " ON CONFLICT (id) DO UPDATE SET"
                " count = CASE WHEN t.expires_at <= %(now)s THEN 1 ELSE t.count + 1 END,"
                " expires_at = CASE WHEN t.expires_at IS NULL OR t.expires_at <= %(now)s THEN EXCLUDED.expires_at"
                " ELSE t.expires_at END"
                " RETURNING count, expires_at",
                {**rows[0].values, "now": now, "expires": expiry(now, ttl_s * 1000)})
            return cur.fetchone()

    # --- the reads the app relies on -------------------------------------------------------------

    def check_premium_access(self, identifier: str, identifier_type: str) -> dict[str, Any]:
        return self.read("check_premium_access", self._premium_from_redis, self._premium_from_postgres,
                          identifier, identifier_type)

    def get_usage_stats(self, identifier: str, identifier_type: str) -> dict[str, int]:
        return self.read("get_usage_stats", self._usage_from_redis, self._usage_from_postgres,
                          identifier, identifier_type)

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
    return app_time(datetime.fromisoformat(value)) if value else None


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


