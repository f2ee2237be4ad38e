"""Threadr's keyspace (../shared/spec/threadr-keyspace.md) as one declarative mapping.

Each `Pattern` below is the single place a key shape is described: its grammar, Redis type,
priority, target table and transform, or why it is skipped. Grammars are anchored and parse
from both ends where ids may hold colons (IPv6 addresses, odd emails).
"""
from __future__ import annotations

from typing import Any

import orjson

from .mapping import BadRecord, Figure, Mapping, Pattern, Priority, Row, SourceRecord
from .merge import TableRule
from .values import (
    parse_bool,
    parse_date,
    parse_dt,
    parse_int,
    parse_number,
    require,
    require_object,
    stable_id,
    text_or_none,
)

C, H, M, L = Priority.CRITICAL, Priority.HIGH, Priority.MEDIUM, Priority.LOW

STRIPE_STATUSES = frozenset(
    {"active", "trialing", "past_due", "canceled", "unpaid", "incomplete", "incomplete_expired", "paused"}
)
# The app spelt a cancelled subscription both ways; PostgreSQL keeps Stripe's spelling.
STATUS_SPELLINGS = {"cancelled": "canceled"}


def user_uuid(ref: str | None) -> str | None:
    """Deterministic user UUID for an app user id; emails are linked later through the id map."""
    if ref and ref.startswith("user_") and "@" not in ref:
        return stable_id("user", ref)
    return None


def legacy_key(ref: str) -> str:
    """How a legacy id is stored in legacy_id_map: emails case-folded, tokens as they are."""
    return ref.lower() if "@" in ref else ref


def _legacy_row(ref: str, entity_id: str) -> Row:
    key = legacy_key(ref)
    return Row("legacy_id_map", {"id": stable_id("legacy", key), "legacy_id": key, "entity": "user", "entity_id": entity_id})


# --- critical: revenue -------------------------------------------------------------------


def _lookup_ip(value: Any) -> str | None:
    """The ip a grant is looked up by: grant_premium_access names the ip key after the grant's
    client_ip, so `None` (a webhook grant without one) is no ip."""
    return None if value is None or value == "None" else str(value)


def _premium_grant(rec: SourceRecord, *, ip: str | None, email: str | None) -> list[Row]:
    v = require_object(rec.value, "premium grant")
    expires = parse_dt(require(v, "expires_at"), rec.source_tz, field="expires_at")
    info = v.get("payment_info")
    info = {} if info is None else require_object(info, "payment_info")
    reference = text_or_none(info.get("payment_reference"), field="payment_reference")
    # The ip and the email key of one purchase hold the same value: one id, one entitlement.
    natural = reference or "|".join(str(v.get(f)) for f in ("granted_at", "email", "client_ip"))
    # Each key knows both lookups of its purchase (the app names the keys after the grant's own
    # client_ip and email), so either key's row is whole; one it cannot know is left out, not NULL.
    lookups, unknown = {"ip": ip, "email": email}, ()
    if ip is None and "client_ip" in v:
        lookups["ip"] = _lookup_ip(v["client_ip"])
    elif ip is None:  # a hand-written grant without client_ip: only its ip key knows the ip
        del lookups["ip"]
        unknown = ("ip",)
    if email is None:
        lookups["email"] = text_or_none(v.get("email"), field="email") or None
    return [
        Row(
            "subscriptions",
            {
                "id": stable_id("premium", natural),
                "kind": "premium_grant",
                "user_id": None,
                "customer_ref": None,
                **lookups,
                "plan": text_or_none(v.get("plan"), field="plan") or "premium",
                "status": "active" if expires > rec.now else "expired",
                "granted_at": parse_dt(v.get("granted_at"), rec.source_tz, field="granted_at"),
                "premium_expires_at": expires,
                "duration_days": parse_int(v.get("duration_days"), field="duration_days"),
                "payment_reference": reference,
                "granted_by": text_or_none(info.get("granted_by"), field="granted_by"),
                "amount_cents": parse_int(info.get("amount"), field="amount"),
                "currency": text_or_none(info.get("currency"), field="currency"),
                "grant_client_ip": text_or_none(v.get("client_ip"), field="client_ip"),
                "grant_email": text_or_none(v.get("email"), field="email"),
                "payment_info": info,
            },
            unknown,
        )
    ]


def premium_by_ip(rec: SourceRecord) -> list[Row]:
    # `None` is a Stripe webhook grant that had no client ip: it belongs to no ip.
    return _premium_grant(rec, ip=_lookup_ip(rec.fields["ip"]), email=None)


def premium_by_email(rec: SourceRecord) -> list[Row]:
    return _premium_grant(rec, ip=None, email=rec.fields["email"])


def stripe_subscription(rec: SourceRecord) -> list[Row]:
    v = require_object(rec.value, "subscription")
    sub_id = require(v, "subscription_id")
    raw_status = require(v, "status")
    status = STATUS_SPELLINGS.get(raw_status, raw_status)
    if status not in STRIPE_STATUSES:
        raise BadRecord(f"status {raw_status!r} is not a Stripe subscription status ({', '.join(sorted(STRIPE_STATUSES))})")
    customer = rec.fields["customer"]
    features = v.get("features")
    if features is not None and not isinstance(features, list):
        raise BadRecord("features: expected a list")
    period_end = parse_dt(v.get("current_period_end"), rec.source_tz, field="current_period_end")
    return [
        Row(
            "subscriptions",
            {
                "id": stable_id("stripe", str(sub_id)),
                "kind": "stripe",
                "user_id": user_uuid(customer),
                "customer_ref": customer,
                "plan": text_or_none(v.get("plan_name"), field="plan_name") or "unknown",
                "plan_display_name": text_or_none(v.get("plan_display_name"), field="plan_display_name"),
                "tier_level": parse_int(v.get("tier_level"), field="tier_level"),
                "status": status,
                "status_raw": raw_status,
                "stripe_subscription_id": str(sub_id),
                "current_period_start": parse_dt(v.get("current_period_start"), rec.source_tz, field="current_period_start"),
                "current_period_end": period_end,
                "premium_expires_at": period_end,
                "cancel_at_period_end": parse_bool(v.get("cancel_at_period_end"), field="cancel_at_period_end"),
                "thread_limit": parse_int(v.get("thread_limit"), field="thread_limit"),
                "features": features or [],
                "is_annual": parse_bool(v.get("is_annual"), field="is_annual"),
                "monthly_price": parse_int(v.get("monthly_price"), field="monthly_price"),
                "annual_price": parse_int(v.get("annual_price"), field="annual_price"),
            },
        )
    ]


# --- high: users, newsletter, usage, saved threads ----------------------------------------


def registered_user(rec: SourceRecord) -> list[Row]:
    v = require_object(rec.value, "user")
    ref = rec.fields["user_id"]
    if v.get("user_id") not in (None, ref):
        raise BadRecord("user_id inside the value does not match the key")
    email = require(v, "email")
    password_hash = require(v, "password_hash")
    if not isinstance(email, str) or not isinstance(password_hash, str):
        raise BadRecord("email and password_hash must be strings")
    tz = rec.source_tz
    uid = stable_id("user", ref)
    meta = v.get("metadata")
    return [
        Row(
            "users",
            {
                "id": uid,
                "legacy_id": ref,
                "email": email,
                "password_hash": password_hash,
                "role": v.get("role") or "user",
                "status": v.get("status") or "active",
                "created_at": parse_dt(v.get("created_at"), tz, field="created_at"),
                "updated_at": parse_dt(v.get("updated_at"), tz, field="updated_at"),
                "last_login_at": parse_dt(v.get("last_login_at"), tz, field="last_login_at"),
                "login_count": parse_int(v.get("login_count"), field="login_count", default=0),
                "failed_login_attempts": parse_int(v.get("failed_login_attempts"), field="failed_login_attempts", default=0),
                "last_failed_login": parse_dt(v.get("last_failed_login"), tz, field="last_failed_login"),
                "is_email_verified": parse_bool(v.get("is_email_verified"), field="is_email_verified"),
                "email_verification_token": text_or_none(v.get("email_verification_token"), field="email_verification_token"),
                "password_reset_token": text_or_none(v.get("password_reset_token"), field="password_reset_token"),
                "password_reset_expires": parse_dt(v.get("password_reset_expires"), tz, field="password_reset_expires"),
                "app_metadata": require_object(meta, "metadata") if meta is not None else {},
            },
        ),
        _legacy_row(ref, uid),
        _legacy_row(email, uid),
    ]


def newsletter_subscriber(rec: SourceRecord) -> list[Row]:
    v = require_object(rec.value, "newsletter subscription")
    email = rec.fields["email"]
    tz = rec.source_tz
    return [
        Row(
            "newsletter_subscribers",
            {
                "id": stable_id("newsletter", email.lower()),
                "email": email,
                "subscribed_at": parse_dt(v.get("subscribed_at"), tz, field="subscribed_at"),
                "client_ip": text_or_none(v.get("client_ip"), field="client_ip"),
                "user_agent": text_or_none(v.get("user_agent"), field="user_agent"),
                "referrer": text_or_none(v.get("referrer"), field="referrer"),
                "signup_source": text_or_none(v.get("source"), field="source"),
            },
        )
    ]


def usage_counter(rec: SourceRecord) -> list[Row]:
    f = rec.fields
    count = parse_int(rec.value, field="counter")
    if count < 0:
        raise BadRecord(f"counter is negative ({count})")
    bucket = f["bucket"]
    start = parse_date(bucket if f["period"] == "daily" else bucket + "-01", field="period")
    return [
        Row(
            "usage_counters",
            {
                "id": stable_id("usage", f["kind"], f["subject"], f["period"], bucket),
                "subject_type": f["kind"],
                "subject": f["subject"],
                "period": f["period"],
                "period_start": start,
                "count": count,
            },
        )
    ]


def saved_thread(rec: SourceRecord) -> list[Row]:
    v = require_object(rec.value, "thread")
    thread_id = rec.fields["thread_id"]
    if v.get("id") not in (None, thread_id):
        raise BadRecord("id inside the value does not match the key")
    tweets = require(v, "tweets")
    if not isinstance(tweets, list) or not all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in tweets):
        raise BadRecord("tweets: expected a list of objects with a string content")
    meta = v.get("metadata")
    user_ref = text_or_none(v.get("user_id"), field="user_id")
    tz = rec.source_tz
    return [
        Row(
            "threads",
            {
                "id": thread_id,
                "user_id": user_uuid(user_ref),
                "user_ref": user_ref,
                "title": text_or_none(v.get("title"), field="title"),
                "original_content": text_or_none(v.get("original_content"), field="original_content"),
                "tweets": tweets,
                "app_metadata": require_object(meta, "metadata") if meta is not None else {},
                "created_at": parse_dt(v.get("created_at"), tz, field="created_at"),
                "updated_at": parse_dt(v.get("updated_at"), tz, field="updated_at"),
                "view_count": parse_int(v.get("view_count"), field="view_count", default=0),
                "copy_count": parse_int(v.get("copy_count"), field="copy_count", default=0),
                "is_favorite": parse_bool(v.get("is_favorite"), field="is_favorite"),
                "is_archived": parse_bool(v.get("is_archived"), field="is_archived"),
            },
        )
    ]


# --- medium: analytics and stats ---------------------------------------------------------


def usage_stats(rec: SourceRecord) -> list[Row]:
    return [
        Row("usage_stats", {"id": stable_id("usage_stat", name), "stat_name": name, "value": parse_int(value, field=name)})
        for name, value in sorted(rec.value.items())
    ]


def thread_stats(rec: SourceRecord) -> list[Row]:
    v = require_object(rec.value, "thread stats")
    ref = rec.fields["user_id"]
    counters = {name: parse_int(v.get(name), field=name, default=0) for name in ("created", "viewed", "updated", "deleted", "copied")}
    return [Row("thread_stats", {"id": stable_id("thread_stats", ref), "user_id": user_uuid(ref), "user_ref": ref, **counters})]


def thread_analytics(rec: SourceRecord) -> list[Row]:
    v = require_object(rec.value, "thread analytics")
    ref, thread_id = rec.fields["user_id"], rec.fields["thread_id"]
    return [
        Row(
            "thread_analytics",
            {
                "id": stable_id("thread_analytics", ref, thread_id),
                "user_id": user_uuid(ref),
                "user_ref": ref,
                "thread_id": thread_id,
                "posted_at": parse_dt(v.get("posted_at"), rec.source_tz, field="posted_at"),
                "analytics": v,
            },
        )
    ]


def analytics_timeseries(rec: SourceRecord) -> list[Row]:
    f = rec.fields
    ref, metric = f["user_id"], f["metric"]
    # Python's str(MetricPeriod.DAY) leaked into some keys; both spell the same period.
    period = f["period"].rsplit(".", 1)[-1].lower()
    user_id = user_uuid(ref)
    points: dict[str, Row] = {}
    for member, score in rec.value:
        try:
            point = require_object(orjson.loads(member), "time series member")
        except orjson.JSONDecodeError as exc:
            raise BadRecord(f"time series member is not JSON: {exc}") from None
        at = parse_dt(point.get("timestamp"), rec.source_tz, field="timestamp") or parse_dt(score, rec.source_tz)
        row_id = stable_id("timeseries", ref, metric, period, at.isoformat())
        points[row_id] = Row(
            "analytics_timeseries",
            {
                "id": row_id,
                "user_id": user_id,
                "user_ref": ref,
                "metric": metric,
                "period": period,
                "point_at": at,
                "value": parse_number(require(point, "value"), field="value"),
            },
        )
    return list(points.values())


# --- low: sessions, events, login failures -------------------------------------------------


def session(rec: SourceRecord) -> list[Row]:
    v = require_object(rec.value, "session")
    ref = rec.fields["user_id"]
    tz = rec.source_tz
    return [
        Row(
            "sessions",
            {
                "id": stable_id("session", ref),
                "user_id": user_uuid(ref),
                "user_ref": ref,
                "email": text_or_none(v.get("email"), field="email"),
                "role": text_or_none(v.get("role"), field="role"),
                "status": text_or_none(v.get("status"), field="status"),
                "login_at": parse_dt(v.get("login_timestamp"), tz, field="login_timestamp"),
                "last_activity": parse_dt(v.get("last_activity"), tz, field="last_activity"),
                "client_ip": text_or_none(v.get("client_ip"), field="client_ip"),
                "access_token_hash": text_or_none(v.get("access_token_hash"), field="access_token_hash"),
            },
        )
    ]


def usage_event(rec: SourceRecord) -> list[Row]:
    v = require_object(rec.value, "usage event")
    tz = rec.source_tz
    occurred = parse_dt(v.get("timestamp"), tz, field="timestamp") or parse_dt(parse_number(rec.fields["epoch"]), tz)
    day = v.get("date")
    return [
        Row(
            "usage_events",
            {
                "id": stable_id("usage_event", rec.key),
                "occurred_at": occurred,
                "client_ip": text_or_none(v.get("client_ip"), field="client_ip") or rec.fields["ip"],
                "email": text_or_none(v.get("email"), field="email"),
                "event_date": parse_date(day, field="date") if day else None,
                "event_month": text_or_none(v.get("month"), field="month"),
            },
        )
    ]


def login_failure(rec: SourceRecord) -> list[Row]:
    v = require_object(rec.value, "failed login")
    email, ip = require(v, "email"), require(v, "client_ip")
    # Both the email and an IPv6 address may hold colons: the value says where they split.
    if rec.fields["rest"] != f"{email}:{ip}":
        raise BadRecord("key does not end with the value's email:client_ip, so it cannot be split")
    return [
        Row(
            "login_failures",
            {
                "id": stable_id("failed_login", email, ip),
                "email": email,
                "client_ip": ip,
                "attempts": parse_int(v.get("attempts"), field="attempts", default=0),
                "last_attempt": parse_dt(v.get("last_attempt"), rec.source_tz, field="last_attempt"),
            },
        )
    ]


EPHEMERAL = "ephemeral: rebuilt by the app within its TTL"
CROSS_CHECK = "cross-check only: an index of keys migrated under another pattern"
UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"

PATTERNS = (
    Pattern("premium_ip", "threadr:premium:ip:*", r"threadr:premium:ip:(?P<ip>.+)", "string", C,
            "legacy premium grant by client ip (`None`: webhook grant without ip)",
            table="subscriptions", transform=premium_by_ip, source="redis_ip_premium", ttl="days*86400 + 7 d",
            validation=("expires_at parses", "one entitlement per payment_reference", "ip=None stored as NULL")),
    Pattern("premium_email", "threadr:premium:email:*", r"threadr:premium:email:(?P<email>.+)", "string", C,
            "legacy premium grant by email (same value as the ip key of the purchase)",
            table="subscriptions", transform=premium_by_email, source="redis_email_premium", ttl="days*86400 + 7 d",
            validation=("expires_at parses", "deduplicated with premium_ip by payment_reference")),
    Pattern("subscription", "threadr:subscription:user:*", r"threadr:subscription:user:(?P<customer>.+)", "string", C,
            "Stripe subscription by user id or customer email",
            table="subscriptions", transform=stripe_subscription, source="redis_user_subscription", ttl="1 y or period end + 7 d",
            validation=("status is a Stripe status ('cancelled' -> 'canceled')", "subscription_id unique"),
            depends_on=("user",)),
    Pattern("subscriptions_active", "threadr:subscriptions:active", r"threadr:subscriptions:active", "set", C,
            "ids of active subscriptions", skip=CROSS_CHECK),
    Pattern("user_email_index", "threadr:user:email:*", r"threadr:user:email:(?P<email>.+)", "string", H,
            "email -> user id index", skip=CROSS_CHECK),
    Pattern("user", "threadr:user:*", r"threadr:user:(?P<user_id>[^:]+)", "string", H,
            "registered user with bcrypt password hash",
            table="users", transform=registered_user, source="redis_user", ttl="1-2 y",
            validation=("password_hash byte for byte", "email unique (case-insensitive)", "role and status in their sets")),
    Pattern("newsletter", "threadr:email:*", r"threadr:email:(?P<email>.+)", "string", H,
            "newsletter subscriber", table="newsletter_subscribers", transform=newsletter_subscriber,
            source="redis_email_subscription", ttl="2 y", validation=("email unique (case-insensitive)",)),
    Pattern("newsletter_list", "threadr:emails:list", r"threadr:emails:list", "set", H,
            "all newsletter emails", skip=CROSS_CHECK),
    Pattern("usage_stats", "threadr:usage:stats", r"threadr:usage:stats", "hash", M,
            "global counters", table="usage_stats", transform=usage_stats, source="redis_usage_stats", ttl="365 d",
            value_format="hash", validation=("every field an integer",)),
    Pattern("usage_log", "threadr:usage:log:*", r"threadr:usage:log:(?P<ip>.+):(?P<epoch>\d+(?:\.\d+)?)", "string", L,
            "one row per thread generation (not added to counters)", table="usage_events", transform=usage_event,
            source="redis_usage_log", ttl="7 d"),
    Pattern("usage_counter", "threadr:usage:*",
            r"threadr:usage:(?P<kind>ip|email|user):(?P<subject>.+):(?P<period>daily|monthly):"
            r"(?P<bucket>\d{4}-\d{2}(?:-\d{2})?)",
            "string", H, "daily and monthly usage counter per ip, email or user", value_format="int",
            table="usage_counters", transform=usage_counter, source="redis_usage", ttl="1 d/30 d (daily), 31 d/365 d (monthly)",
            validation=("non-negative integer", "merged with GREATEST within its period")),
    Pattern("thread", "threadr:thread:*", rf"threadr:thread:(?P<thread_id>{UUID})", "string", H,
            "saved thread with its tweets", table="threads", transform=saved_thread, source="redis_thread", ttl="365 d",
            validation=("tweets byte for byte", "unicode and emoji intact"), depends_on=("user",)),
    Pattern("user_threads", "threadr:user_threads:*", r"threadr:user_threads:(?P<user_id>.+)", "string", H,
            "thread ids per user", skip=CROSS_CHECK),
    Pattern("thread_stats", "threadr:thread_stats:*", r"threadr:thread_stats:(?P<user_id>.+)", "string", M,
            "per-user thread counters", table="thread_stats", transform=thread_stats, source="redis_thread_stats",
            ttl="30 d", validation=("counters merged with GREATEST",), depends_on=("user",)),
    Pattern("thread_analytics", "analytics:*:thread:*", r"analytics:(?P<user_id>.+):thread:(?P<thread_id>[^:]+)", "string", M,
            "per-thread analytics totals", table="thread_analytics", transform=thread_analytics,
            source="redis_thread_analytics", ttl="90 d", depends_on=("thread", "user")),
    Pattern("analytics_timeseries", "analytics:*:timeseries:*",
            r"analytics:(?P<user_id>.+):timeseries:(?P<metric>[^:]+):(?P<period>[^:]+)", "zset", M,
            "metric time series, one row per point", value_format="zset", table="analytics_timeseries",
            transform=analytics_timeseries, source="redis_analytics_timeseries",
            validation=("period 'MetricPeriod.DAY' normalised to 'day'",), depends_on=("user",)),
    Pattern("analytics_threads", "analytics:*:threads", r"analytics:(?P<user_id>.+):threads", "zset", M,
            "thread ids per user by creation time", skip=CROSS_CHECK),
    Pattern("session", "threadr:session:*", r"threadr:session:(?P<user_id>.+)", "string", L,
            "login session", table="sessions", transform=session, source="redis_session", ttl="~1 h", depends_on=("user",)),
    Pattern("failed_login", "threadr:failed_login:*", r"threadr:failed_login:(?P<rest>.+)", "string", L,
            "failed login attempts per email and ip (kept so lockouts survive the cutover)",
            table="login_failures", transform=login_failure, source="redis_failed_login", ttl="1.5 h",
            validation=("key splits as <email>:<client_ip> from the value",)),
    Pattern("ratelimit", "threadr:ratelimit:*", r"threadr:ratelimit:(?P<ip>.+)", "string", L,
            "per-ip request counter", skip=EPHEMERAL),
    Pattern("cache_url", "threadr:cache:url:*", r"threadr:cache:url:(?P<url>.+)", "string", L,
            "generated thread cached by url", skip=EPHEMERAL),
    Pattern("cache_text", "threadr:cache:text:*", r"threadr:cache:text:(?P<hash>.+)", "string", L,
            "generated thread cached by text hash", skip=EPHEMERAL),
)

TABLES = (
    TableRule("subscriptions", coalesce=("user_id",)),
    TableRule("users", version="updated_at"),
    TableRule("legacy_id_map"),
    TableRule("newsletter_subscribers"),
    TableRule("usage_counters", greatest=("count",)),
    TableRule("threads", version="updated_at"),
    TableRule("usage_stats", greatest=("value",)),
    TableRule("thread_stats", greatest=("created", "viewed", "updated", "deleted", "copied"), coalesce=("user_id",)),
    TableRule("thread_analytics", coalesce=("user_id",)),
    TableRule("analytics_timeseries", coalesce=("user_id",)),
    TableRule("sessions", coalesce=("user_id",)),
    TableRule("usage_events"),
    TableRule("login_failures"),
)

# Rows that name a user by a legacy id the deterministic UUID cannot cover (emails) are
# linked through legacy_id_map once the users are in, whatever order the keys arrived in.
USER_LINKS = (
    ("subscriptions", "customer_ref"),
    ("subscriptions", "email"),
    ("threads", "user_ref"),
    ("thread_stats", "user_ref"),
    ("thread_analytics", "user_ref"),
    ("analytics_timeseries", "user_ref"),
    ("sessions", "user_ref"),
)

# The guide's validation and monitoring queries, on this schema.
FIGURES = (
    Figure("subscriptions_total", "SELECT count(*) FROM subscriptions"),
    Figure("subscriptions_active", "SELECT count(*) FROM subscriptions WHERE status = 'active'"),
    Figure("premium_not_expired", "SELECT count(*) FROM subscriptions WHERE premium_expires_at > now()"),
    Figure("premium_users_active_now",
           "SELECT count(DISTINCT COALESCE(user_id::text, lower(email), ip, customer_ref)) FROM subscriptions"
           " WHERE premium_expires_at > now() AND (kind = 'premium_grant' OR status IN ('active', 'trialing'))"),
    Figure("users_total", "SELECT count(*) FROM users"),
    Figure("newsletter_subscribers", "SELECT count(*) FROM newsletter_subscribers"),
    Figure("orphaned_subscriptions",
           "SELECT count(*) FROM subscriptions s WHERE s.user_id IS NOT NULL"
           " AND NOT EXISTS (SELECT 1 FROM users u WHERE u.id = s.user_id)", dangling_in="subscriptions"),
    Figure("usage_without_users",
           "SELECT count(*) FROM usage_counters c WHERE c.subject_type = 'user'"
           " AND NOT EXISTS (SELECT 1 FROM users u WHERE u.legacy_id = c.subject)", dangling_in="usage_counters"),
    Figure("threads_generated_per_day",
           "SELECT event_date::text, count(*) FROM usage_events WHERE occurred_at >= now() - interval '7 days'"
           " GROUP BY 1 ORDER BY 1 DESC", rows=True),
)

THREADR = Mapping("threadr", PATTERNS, rules=TABLES, user_links=USER_LINKS, user_patterns=("user",), figures=FIGURES)
