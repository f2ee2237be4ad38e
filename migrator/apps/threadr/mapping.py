"""Threadr's keyspace as one declarative mapping, derived from what Threadr's own code writes
(docs/threadr-mapping.md: per pattern, each field, the code that writes it, how it is stored).

Each `Pattern` below is the single place a key shape is described: its grammar, Redis type,
priority, target table and transform, or why it is skipped. Grammars are anchored and parse
from both ends where ids may hold colons (IPv6 addresses, odd emails). The app wrote naive
datetimes in two clocks: `datetime.now()` (premium grants, newsletter, usage, Stripe periods:
the host's zone, --source-timezone) and `datetime.utcnow()` (users, sessions, failed logins,
threads, analytics: `utc_naive`). What its own models refuse is a dead letter naming the rule.
"""
from __future__ import annotations

from importlib.resources import files
from typing import Any

import orjson

from migrator.core import jsoncodec
from migrator.core.hooks import Hooks
from migrator.core.mapping import BadRecord, Figure, KeyTemplate, Link, Mapping, Pattern, Priority, Reference, References, Row, SourceRecord
from migrator.core.merge import TableRule
from migrator.core.values import (
    UUID,
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

from .audit import PremiumTally
from .demo import seed_demo
from .dualwrite import PARITY_READS

C, H, M, L = Priority.CRITICAL, Priority.HIGH, Priority.MEDIUM, Priority.LOW

# The app spells a cancelled subscription both ways; PostgreSQL keeps Stripe's spelling.
STATUS_SPELLINGS = {"cancelled": "canceled"}


def user_uuid(ref: str | None) -> str | None:
    """Deterministic user UUID for an app user id; other ids (emails, UUID strings the app's
    PostgreSQL fallback wrote) are linked later through the id map."""
    if ref and ref.startswith("user_") and "@" not in ref:
        return stable_id("user", ref)
    return None


def legacy_key(ref: str) -> str:
    """How a legacy id is stored in legacy_id_map: emails case-folded, tokens as they are."""
    return ref.lower() if "@" in ref else ref


def _legacy_row(ref: str, entity_id: str) -> Row:
    key = legacy_key(ref)
    return Row("legacy_id_map", {"id": stable_id("legacy", key), "legacy_id": key, "entity": "user", "entity_id": entity_id})


def refused(model: str, rule: str) -> BadRecord:
    """A record Threadr's own model (backend/src/models/) would refuse: a dead letter, with the rule."""
    return BadRecord(f"Threadr's {model} refuses it: {rule}")


def extra(v: dict[str, Any], known: frozenset[str]) -> dict[str, Any]:
    """The fields of a record no column holds (a script's additions): kept whole, not dropped."""
    return {k: x for k, x in v.items() if k not in known}


def one_of(value: Any, allowed: tuple[str, ...], *, model: str, field: str) -> str:
    if value not in allowed:
        raise refused(model, f"{field} {str(value)[:40]!r} is not one of {', '.join(allowed)}")
    return value


# --- critical: revenue -------------------------------------------------------------------


def _lookup_ip(value: Any) -> str | None:
    """The ip a grant is looked up by: grant_premium_access names the ip key after the grant's
    client_ip, so `None` (a webhook grant without one) is no ip."""
    return None if value is None or value == "None" else str(value)


PREMIUM_FIELDS = frozenset({"granted_at", "expires_at", "plan", "duration_days", "client_ip", "email", "payment_info"})


def _premium_grant(rec: SourceRecord, *, by_ip: bool, ip: str | None = None, email: str | None = None) -> list[Row]:
    v = require_object(rec.value, "premium grant")
    expires = parse_dt(require(v, "expires_at"), rec.source_tz, field="expires_at")
    if expires is None:  # (grant_premium_access always writes one)
        raise BadRecord("expires_at is empty: a grant without an expiry is neither active nor expired")
    info = v.get("payment_info")
    info = {} if info is None else require_object(info, "payment_info")
    reference = text_or_none(info.get("payment_reference"), field="payment_reference")
    # payment_reference is free text the app reuses (webhook retries, admin grants): it names no
    # one purchase. The grant's whole value does: the ip and email keys of a purchase hold the
    # same bytes, and two grants differ at least in their granted_at.
    natural = jsoncodec.dumps(v, option=orjson.OPT_SORT_KEYS).decode()
    # Each key says one lookup of its grant: the other key of the purchase may since name a later
    # grant (the app overwrites ip:None, ip:0.0.0.0 and an admin's address with every grant), so
    # the other lookup is left to that key: neither written nor checked for this one.
    # (the other is NULL to the writer, which its COALESCE keeps from the other key: one column set
    # for both keys, so concurrent batches lock a purchase's row in one order)
    lookups, unknown = ({"ip": ip, "email": None}, ("email",)) if by_ip else ({"ip": None, "email": email}, ("ip",))
    return [
        Row(
            "subscriptions",
            {
                "id": stable_id("premium", natural),
                "kind": "premium_grant",
                "user_id": None,
                "customer_ref": None,
                **lookups,
                "plan": "premium" if v.get("plan") is None else text_or_none(v["plan"], field="plan"),  # "" kept
                # (a grant counts while premium_expires_at is in the future, as the app reads it: a
                # status from the clock would be wrong once that passes, and a re-read would disagree)
                "status": "active",
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
                "extra": extra(v, PREMIUM_FIELDS),
            },
            unknown,
        )
    ]


def premium_by_ip(rec: SourceRecord) -> list[Row]:
    # `None` is a Stripe webhook grant that had no client ip: it belongs to no ip.
    return _premium_grant(rec, by_ip=True, ip=_lookup_ip(rec.fields["ip"]))


def premium_by_email(rec: SourceRecord) -> list[Row]:
    return _premium_grant(rec, by_ip=False, email=rec.fields["email"])


SUBSCRIPTION_FIELDS = frozenset({
    "subscription_id", "plan_name", "plan_display_name", "tier_level", "status", "current_period_start",
    "current_period_end", "cancel_at_period_end", "thread_limit", "features", "is_annual", "monthly_price", "annual_price"})


def stripe_subscription(rec: SourceRecord) -> list[Row]:
    v = require_object(rec.value, "subscription")
    sub_id = str(require(v, "subscription_id"))
    raw_status = text_or_none(require(v, "status"), field="status")
    customer = rec.fields["customer"]
    features = v.get("features")
    if features is not None and not (isinstance(features, list) and all(isinstance(f, str) for f in features)):
        raise refused("SubscriptionInfo", "features must be a list of strings")
    period_end = parse_dt(v.get("current_period_end"), rec.source_tz, field="current_period_end")
    return [
        Row(
            "subscriptions",
            {
                # one Stripe subscription may be kept under two keys (the customer's email, from
                # the webhook, and the user id, from the app's routes): two records, two rows
                "id": stable_id("stripe", sub_id, customer),
                "kind": "stripe",
                "user_id": user_uuid(customer),
                "customer_ref": None if customer == "None" else customer,  # a Stripe customer without email
                "ip": None,
                "email": None,
                "plan": "unknown" if v.get("plan_name") is None else text_or_none(v["plan_name"], field="plan_name"),
                "plan_display_name": text_or_none(v.get("plan_display_name"), field="plan_display_name"),
                "tier_level": parse_int(v.get("tier_level"), field="tier_level"),
                # the app spells a cancelled subscription both ways; PostgreSQL keeps Stripe's spelling
                "status": STATUS_SPELLINGS.get(raw_status, raw_status),
                "status_raw": raw_status,
                "stripe_subscription_id": sub_id,
                "current_period_start": parse_dt(v.get("current_period_start"), rec.source_tz, field="current_period_start"),
                "current_period_end": period_end,
                "premium_expires_at": period_end,
                "cancel_at_period_end": parse_bool(v.get("cancel_at_period_end"), field="cancel_at_period_end",
                                                   default=None),
                "thread_limit": parse_int(v.get("thread_limit"), field="thread_limit"),
                "features": features,
                "is_annual": parse_bool(v.get("is_annual"), field="is_annual", default=None),
                "monthly_price": parse_int(v.get("monthly_price"), field="monthly_price"),
                "annual_price": parse_int(v.get("annual_price"), field="annual_price"),
                "extra": extra(v, SUBSCRIPTION_FIELDS),
            },
        )
    ]


def subscription_index(rec: SourceRecord) -> list[Reference]:
    """An active subscription is listed in threadr:subscriptions:active by its customer."""
    v = require_object(rec.value, "subscription")
    return [Reference("threadr:subscriptions:active", rec.fields["customer"])] if v.get("status") == "active" else []


def members_of(prefix: str) -> References:
    """The references of an index whose members each name a record key."""
    def entries(rec: SourceRecord) -> list[Reference]:
        members = rec.value if rec.value and not isinstance(rec.value[0], tuple) else [m for m, _ in rec.value]
        return [Reference(prefix.format(**rec.fields) + m) for m in members]
    return entries


# --- high: users, newsletter, usage, saved threads ----------------------------------------

ROLES = ("user", "premium", "admin")
USER_STATUSES = ("active", "inactive", "suspended")


def registered_user(rec: SourceRecord) -> list[Row]:
    v = require_object(rec.value, "user")
    ref = rec.fields["user_id"]
    if v.get("user_id") not in (None, ref):
        raise BadRecord("user_id inside the value does not match the key")
    email = require(v, "email")
    password_hash = require(v, "password_hash")
    if not isinstance(email, str) or not isinstance(password_hash, str):
        raise refused("User model", "email and password_hash are strings")
    tz = rec.source_tz
    uid = stable_id("user", ref)
    meta = v.get("metadata")
    for field in ("created_at", "updated_at"):
        if v.get(field) is None:
            raise refused("User model", f"{field} is required")
    return [
        Row(
            "users",
            {
                "id": uid,
                "legacy_id": ref,
                "email": email,
                "password_hash": password_hash,
                "role": one_of(v.get("role", "user"), ROLES, model="User model", field="role"),
                "status": one_of(v.get("status", "active"), USER_STATUSES, model="User model", field="status"),
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
                "app_metadata": {} if "metadata" not in v else _user_metadata(meta),
            },
        ),
        _legacy_row(ref, uid),
    ]


def _user_metadata(meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise refused("User model", "metadata is a dictionary")
    return meta


def user_in_index(rec: SourceRecord) -> list[Reference]:
    """A user is found by its email through threadr:user:email:<email>, which holds its id."""
    v = require_object(rec.value, "user")
    return [Reference(f"threadr:user:email:{v.get('email')}", rec.fields["user_id"])]


def user_email(rec: SourceRecord) -> list[Row]:
    """The app's own email -> user id index: who an email names (the last registration, when
    two raced), for rows that name their user by email."""
    ref = rec.value
    if not ref:
        raise BadRecord("the email index names no user id")
    return [_legacy_row(rec.fields["email"], stable_id("user", ref))]


NEWSLETTER_FIELDS = frozenset({"email", "subscribed_at", "client_ip", "user_agent", "referrer", "source"})


def user_of_email(rec: SourceRecord) -> list[Reference]:
    return [Reference(f"threadr:user:{rec.value}")]


def newsletter_subscriber(rec: SourceRecord) -> list[Row]:
    v = require_object(rec.value, "newsletter subscription")
    email = rec.fields["email"]
    tz = rec.source_tz
    return [
        Row(
            "newsletter_subscribers",
            {
                # the key's email as it is: the app lower-cases it, a script may not (two keys, two rows)
                "id": stable_id("newsletter", email),
                "email": email,
                "subscribed_at": parse_dt(v.get("subscribed_at"), tz, field="subscribed_at"),
                "client_ip": text_or_none(v.get("client_ip"), field="client_ip"),
                "user_agent": text_or_none(v.get("user_agent"), field="user_agent"),
                "referrer": text_or_none(v.get("referrer"), field="referrer"),
                "signup_source": text_or_none(v.get("source"), field="source"),
                "extra": extra(v, NEWSLETTER_FIELDS),
            },
        )
    ]


def newsletter_in_list(rec: SourceRecord) -> list[Reference]:
    return [Reference("threadr:emails:list", rec.fields["email"])]


def usage_counter(rec: SourceRecord) -> list[Row]:
    f = rec.fields
    count = parse_int(rec.value, field="counter")
    if count < 0:
        raise BadRecord(f"counter is negative ({count}): the app only increments it")
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


def _checked_tweets(tweets: Any) -> list[dict[str, Any]]:
    """Tweets as SavedThread accepts them: at least one, each a content of up to 280 characters,
    an order from 1 and a character count of 0 to 280."""
    if not isinstance(tweets, list) or not tweets:
        raise refused("SavedThread model", "tweets must be a list of at least one tweet")
    for n, t in enumerate(tweets, 1):
        if not isinstance(t, dict) or not isinstance(t.get("content"), str):
            raise refused("SavedThread model", f"tweet {n} has no text content")
        if len(t["content"]) > 280:
            raise refused("SavedThread model", f"tweet {n} is {len(t['content'])} characters, over 280")
        order, count = t.get("order"), t.get("character_count")
        if not isinstance(order, int) or isinstance(order, bool) or order < 1:
            raise refused("SavedThread model", f"tweet {n}'s order {order!r} is not a whole number from 1")
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= 280:
            raise refused("SavedThread model", f"tweet {n}'s character_count {count!r} is not 0 to 280")
    return tweets


def saved_thread(rec: SourceRecord) -> list[Row]:
    v = require_object(rec.value, "thread")
    thread_id = rec.fields["thread_id"]
    if v.get("id") not in (None, thread_id):
        raise BadRecord("id inside the value does not match the key")
    title = v.get("title")
    if not isinstance(title, str):
        raise refused("SavedThread model", "title is a required string")
    if len(title) > 200:
        raise refused("SavedThread model", f"title is {len(title)} characters, over 200")
    tweets = _checked_tweets(v.get("tweets"))
    meta = v.get("metadata")
    meta = require_object(meta, "metadata") if meta is not None else {}
    tags = meta.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise refused("ThreadMetadata model", "tags must be a list of strings")
    user_ref = text_or_none(v.get("user_id"), field="user_id")
    tz = rec.source_tz
    counts = {name: parse_int(v.get(name), field=name, default=0) for name in ("view_count", "copy_count")}
    for name, n in counts.items():
        if n < 0:
            raise refused("SavedThread model", f"{name} is negative ({n})")
    return [
        Row(
            "threads",
            {
                "id": thread_id,
                "user_id": user_uuid(user_ref),
                "user_ref": user_ref,
                "title": title,
                "original_content": text_or_none(v.get("original_content"), field="original_content"),
                "tweets": tweets,
                "app_metadata": meta,
                "created_at": parse_dt(v.get("created_at"), tz, field="created_at"),
                "updated_at": parse_dt(v.get("updated_at"), tz, field="updated_at"),
                **counts,
                "is_favorite": parse_bool(v.get("is_favorite"), field="is_favorite"),
                "is_archived": parse_bool(v.get("is_archived"), field="is_archived"),
            },
        )
    ]


def thread_in_list(rec: SourceRecord) -> list[Reference]:
    """A saved thread is listed, by its id, in its user's threadr:user_threads:<user_id>."""
    v = require_object(rec.value, "thread")
    return [Reference(f"threadr:user_threads:{v.get('user_id')}", rec.fields["thread_id"])]


def thread_list(rec: SourceRecord) -> list[Reference]:
    """A user's thread list (a JSON array of thread ids) names saved threads."""
    if not isinstance(rec.value, list):
        raise BadRecord(f"a user's thread list: expected a JSON array of thread ids, got {type(rec.value).__name__}")
    return [Reference(f"threadr:thread:{t}") for t in rec.value]


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


ANALYTICS_REQUIRED = ("thread_id", "user_id", "created_at", "title", "tweet_count", "total_character_count", "posted_at")
TWEET_METRICS_REQUIRED = ("tweet_id", "position", "content", "character_count", "posted_at")
CONTENT_TYPES = ("educational", "news", "personal", "promotional", "entertainment", "technical", "other")


def thread_analytics(rec: SourceRecord) -> list[Row]:
    v = require_object(rec.value, "thread analytics")
    missing = [f for f in ANALYTICS_REQUIRED if v.get(f) is None]
    if missing:
        raise refused("ThreadAnalytics model", f"{', '.join(missing)} required")
    if v.get("content_type") is not None:
        one_of(v["content_type"], CONTENT_TYPES, model="ThreadAnalytics model", field="content_type")
    for n, metric in enumerate(v.get("tweet_metrics") or [], 1):
        lacking = [f for f in TWEET_METRICS_REQUIRED if not isinstance(metric, dict) or metric.get(f) is None]
        if lacking:
            raise refused("TweetMetrics model", f"tweet_metrics {n}: {', '.join(lacking)} required")
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


def analytics_in_list(rec: SourceRecord) -> list[Reference]:
    """A thread's analytics are listed, by thread id, in analytics:<user_id>:threads."""
    return [Reference(f"analytics:{rec.fields['user_id']}:threads", rec.fields["thread_id"])]


PERIODS = ("hour", "day", "week", "month", "all_time")


def analytics_timeseries(rec: SourceRecord) -> list[Row]:
    f = rec.fields
    ref, metric = f["user_id"], f["metric"]
    # On Python 3.11 an f-string of MetricPeriod.DAY gives 'MetricPeriod.DAY' (older Pythons: 'day'):
    # both name the same period
    period = one_of(f["period"].rsplit(".", 1)[-1].lower(), PERIODS, model="MetricPeriod enum", field="period")
    user_id = user_uuid(ref)
    points = []
    for member, score in rec.value:
        try:
            point = require_object(jsoncodec.loads(member), "time series member")
        except jsoncodec.JSONDecodeError as exc:
            raise BadRecord(f"time series member is not JSON: {exc}") from None
        if point.get("timestamp") is None or "value" not in point:
            raise refused("TimeSeriesDataPoint model", "timestamp and value are required")
        if point.get("period") is not None:
            one_of(point["period"], PERIODS, model="TimeSeriesDataPoint model", field="period")
        points.append(Row(
            "analytics_timeseries",
            {
                # each member is a point, however many share a timestamp
                "id": stable_id("timeseries", ref, metric, period, member),
                "user_id": user_id,
                "user_ref": ref,
                "metric": metric,
                "period": period,
                "point_at": parse_dt(point["timestamp"], rec.source_tz, field="timestamp"),
                # (null: a NaN or an infinity posted, which pydantic writes so; the app's reader skips it)
                "value": None if point["value"] is None else parse_number(point["value"], field="value"),
            },
        ))
    return points


# --- low: sessions, events, login failures -------------------------------------------------


def session(rec: SourceRecord) -> list[Row]:
    v = require_object(rec.value, "session")
    ref = rec.fields["user_id"]
    tz = rec.source_tz
    token_hash = v.get("access_token_hash")
    if token_hash is not None and (not isinstance(token_hash, int) or isinstance(token_hash, bool)):
        # the app stores Python's hash() of the token: an int (per process, so it cannot be recomputed)
        raise BadRecord(f"access_token_hash: expected Python's hash() of the token, an int, got {type(token_hash).__name__}")
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
                "access_token_hash": token_hash,
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

# An ip in a key may be empty: SecurityUtils.get_client_ip returns "" for a forwarded header
# that starts with a comma, and the app names its keys after it all the same.
PATTERNS = (
    Pattern("premium_ip", "threadr:premium:ip:*", r"threadr:premium:ip:(?P<ip>.*)", "string", C,
            "legacy premium grant by client ip (`None`: webhook grant without ip)",
            table="subscriptions", transform=premium_by_ip, source="redis_ip_premium", ttl="days*86400 + 7 d",
            validation=("expires_at parses", "one entitlement per grant (the ip and email keys of a purchase)",
                        "ip=None stored as NULL"),
            # (the inverse of _lookup_ip: a webhook grant's ip key says None)
            row_key=KeyTemplate("threadr:premium:ip:{ip}", null="None")),
    Pattern("premium_email", "threadr:premium:email:*", r"threadr:premium:email:(?P<email>.+)", "string", C,
            "legacy premium grant by email (same value as the ip key of the purchase)",
            table="subscriptions", transform=premium_by_email, source="redis_email_premium", ttl="days*86400 + 7 d",
            validation=("expires_at parses", "deduplicated with premium_ip by the grant's whole value"),
            row_key=KeyTemplate("threadr:premium:email:{email}")),  # (the key's email as written: any case)
    Pattern("subscription", "threadr:subscription:user:*", r"threadr:subscription:user:(?P<customer>.+)", "string", C,
            "Stripe subscription by user id or customer email",
            table="subscriptions", transform=stripe_subscription, source="redis_user_subscription", ttl="1 y or period end + 7 d",
            validation=("status kept ('cancelled' -> 'canceled', as written in status_raw)",
                        "one row per key: a subscription kept under two keys is two records"),
            depends_on=("user",), references=subscription_index),
    # the app adds members and removes them only on a change of status: stale members are its design
    Pattern("subscriptions_active", "threadr:subscriptions:active", r"threadr:subscriptions:active", "set", C,
            "ids of active subscriptions", skip=CROSS_CHECK, value_format="set",
            references=members_of("threadr:subscription:user:"), max_dangling_ratio=1.0, member_wise=True),
    Pattern("user_email_index", "threadr:user:email:*", r"threadr:user:email:(?P<email>.+)", "string", H,
            "email -> user id index: whom an email names", table="legacy_id_map", transform=user_email,
            value_format="text", source="redis_user_email_index", ttl="1-2 y",
            validation=("names a user that exists",), references=user_of_email),
    Pattern("user", "threadr:user:*", r"threadr:user:(?P<user_id>[^:]+)", "string", H,
            "registered user with bcrypt password hash",
            table="users", also_writes=("legacy_id_map",), transform=registered_user, source="redis_user", ttl="1-2 y",
            validation=("password_hash byte for byte", "role and status as the User model allows",
                        "listed in its email index"), references=user_in_index, utc_naive=True),
    Pattern("newsletter", "threadr:email:*", r"threadr:email:(?P<email>.+)", "string", H,
            "newsletter subscriber", table="newsletter_subscribers", transform=newsletter_subscriber,
            source="redis_email_subscription", ttl="2 y", validation=("listed in threadr:emails:list",),
            references=newsletter_in_list),
    # members outlive their records (the set's TTL is renewed by every new subscriber)
    Pattern("newsletter_list", "threadr:emails:list", r"threadr:emails:list", "set", H,
            "all newsletter emails", skip=CROSS_CHECK, value_format="set", references=members_of("threadr:email:"),
            max_dangling_ratio=1.0, member_wise=True),
    Pattern("usage_stats", "threadr:usage:stats", r"threadr:usage:stats", "hash", M,
            "global counters", table="usage_stats", transform=usage_stats, source="redis_usage_stats", ttl="365 d",
            value_format="hash", validation=("every field an integer",), member_wise=True),
    Pattern("usage_log", "threadr:usage:log:*", r"threadr:usage:log:(?P<ip>.*):(?P<epoch>\d+(?:\.\d+)?)", "string", L,
            "one row per thread generation (not added to counters)", table="usage_events", transform=usage_event,
            source="redis_usage_log", ttl="7 d"),
    Pattern("usage_counter", "threadr:usage:*",
            r"threadr:usage:(?P<kind>ip|email|user):(?P<subject>.*):(?P<period>daily|monthly):"
            r"(?P<bucket>\d{4}-\d{2}(?:-\d{2})?)",
            "string", H, "daily and monthly usage counter per ip, email or user", value_format="int",
            table="usage_counters", transform=usage_counter, source="redis_usage", ttl="1 d/30 d (daily), 31 d/365 d (monthly)",
            validation=("non-negative integer", "merged with GREATEST within its period")),
    Pattern("thread", "threadr:thread:*", rf"threadr:thread:(?P<thread_id>{UUID})", "string", H,
            "saved thread with its tweets", table="threads", transform=saved_thread, source="redis_thread", ttl="365 d",
            validation=("tweets byte for byte", "unicode and emoji intact", "as the SavedThread model allows",
                        "listed in its user's thread list"), depends_on=("user",), references=thread_in_list,
            max_dangling_ratio=1.0, utc_naive=True),  # a view renews a thread's TTL, not its list's
    # a list keeps ids of threads that expired since (their TTL slides, the list's does not)
    Pattern("user_threads", "threadr:user_threads:*", r"threadr:user_threads:(?P<user_id>.+)", "string", H,
            "thread ids per user", skip=CROSS_CHECK, references=thread_list, max_dangling_ratio=1.0),
    Pattern("thread_stats", "threadr:thread_stats:*", r"threadr:thread_stats:(?P<user_id>.+)", "string", M,
            "per-user thread counters", table="thread_stats", transform=thread_stats, source="redis_thread_stats",
            ttl="30 d", validation=("counters merged with GREATEST",), depends_on=("user",)),
    # a thread id comes from the posted body and may hold colons; a user id holds none
    Pattern("thread_analytics", "analytics:*:thread:*", r"analytics:(?P<user_id>[^:]+):thread:(?P<thread_id>.+)", "string",
            M, "per-thread analytics totals", table="thread_analytics", transform=thread_analytics,
            source="redis_thread_analytics", ttl="90 d", depends_on=("thread", "user"),
            validation=("as the ThreadAnalytics model allows", "listed in analytics:<user>:threads"),
            references=analytics_in_list, utc_naive=True),
    Pattern("analytics_timeseries", "analytics:*:timeseries:*",
            r"analytics:(?P<user_id>.+):timeseries:(?P<metric>[^:]+):(?P<period>[^:]+)", "zset", M,
            "metric time series, one row per point", value_format="zset", table="analytics_timeseries",
            transform=analytics_timeseries, source="redis_analytics_timeseries",
            validation=("period 'MetricPeriod.DAY' normalised to 'day'", "one row per member"), depends_on=("user",),
            utc_naive=True, member_wise=True),
    # sorted sets without TTL, whose records expire after 90 days
    Pattern("analytics_threads", "analytics:*:threads", r"analytics:(?P<user_id>.+):threads", "zset", M,
            "thread ids per user by creation time", skip=CROSS_CHECK, value_format="zset",
            references=members_of("analytics:{user_id}:thread:"), max_dangling_ratio=1.0, member_wise=True),
    Pattern("session", "threadr:session:*", r"threadr:session:(?P<user_id>.+)", "string", L,
            "login session", table="sessions", transform=session, source="redis_session", ttl="~1 h", depends_on=("user",),
            utc_naive=True),
    Pattern("failed_login", "threadr:failed_login:*", r"threadr:failed_login:(?P<rest>.+)", "string", L,
            "failed login attempts per email and ip (kept so lockouts survive the cutover)",
            table="login_failures", transform=login_failure, source="redis_failed_login", ttl="1.5 h",
            validation=("key splits as <email>:<client_ip> from the value",), utc_naive=True),
    Pattern("ratelimit", "threadr:ratelimit:*", r"threadr:ratelimit:(?P<ip>.*)", "string", L,
            "per-ip request counter", skip=EPHEMERAL),
    Pattern("cache_url", "threadr:cache:url:*", r"threadr:cache:url:(?P<url>.+)", "string", L,
            "generated thread cached by url", skip=EPHEMERAL),
    Pattern("cache_text", "threadr:cache:text:*", r"threadr:cache:text:(?P<hash>.+)", "string", L,
            "generated thread cached by text hash", skip=EPHEMERAL),
)

TABLES = (
    TableRule("subscriptions", coalesce=("ip", "email", "user_id")),
    TableRule("users", version="updated_at"),
    TableRule("legacy_id_map"),
    TableRule("newsletter_subscribers"),
    TableRule("usage_counters", greatest=("count",)),
    TableRule("threads", version="updated_at"),
    TableRule("usage_stats", greatest=("value",)),
    TableRule("thread_stats", greatest=("created", "viewed", "updated", "deleted", "copied"), coalesce=("user_id",)),
    TableRule("thread_analytics", coalesce=("user_id",)),
    TableRule("analytics_timeseries", coalesce=("user_id",)),
    # a login session that ends (its TTL, a logout) is kept, marked, as the login history
    TableRule("sessions", coalesce=("user_id",), on_delete="mark"),
    TableRule("usage_events"),
    TableRule("login_failures"),
)

# Rows that name a user by a legacy id the deterministic UUID cannot cover (emails) are
# linked through legacy_id_map once the users are in, whatever order the keys arrived in.
LINKS = (
    Link("subscriptions", "customer_ref", into="user_id"),
    Link("subscriptions", "email", into="user_id"),
    Link("threads", "user_ref", into="user_id"),
    Link("thread_stats", "user_ref", into="user_id"),
    Link("thread_analytics", "user_ref", into="user_id"),
    Link("analytics_timeseries", "user_ref", into="user_id"),
    Link("sessions", "user_ref", into="user_id"),
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

# Its target tables' DDL: migrator/apps/threadr/schema.sql, shipped as package data.
SCHEMA = files("migrator.apps.threadr").joinpath("schema.sql").read_text()

THREADR = Mapping("threadr", PATTERNS, rules=TABLES, links=LINKS, linked_patterns=("user",), figures=FIGURES,
                  schema=(SCHEMA,), hooks=Hooks(seed_demo=seed_demo, audit=(PremiumTally,), parity_reads=PARITY_READS))
