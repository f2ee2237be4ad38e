"""Each pattern's grammar and transform with the quirks of Threadr's keyspace (pure: no services)."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from migrator.mapping import BadRecord, SourceRecord, literal_prefix
from migrator.source import decode
from migrator.threadr import THREADR, user_uuid

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)


def rows_for(key: str, value, tz: str = "UTC"):
    pattern, fields = THREADR.classify(key)
    assert pattern is not None and pattern.migrated, key
    raw = value if isinstance(value, (bytes, dict, list)) and pattern.value_format != "json" else (
        value if isinstance(value, bytes) else json.dumps(value).encode())
    rec = SourceRecord(key, fields, decode(raw, pattern.value_format), None, NOW, ZoneInfo(tz))
    return pattern.transform(rec)


def one(key: str, value, **kw):
    rows = rows_for(key, value, **kw)
    return rows[0].table, rows[0].values


@pytest.mark.parametrize("key, pattern, fields", [
    ("threadr:premium:ip:2001:db8::1", "premium_ip", {"ip": "2001:db8::1"}),
    ("threadr:premium:ip:None", "premium_ip", {"ip": "None"}),
    ("threadr:premium:email:a:b@x.io", "premium_email", {"email": "a:b@x.io"}),
    ("threadr:subscription:user:ann@x.io", "subscription", {"customer": "ann@x.io"}),
    ("threadr:subscriptions:active", "subscriptions_active", {}),
    ("threadr:user:user_AbC-_9", "user", {"user_id": "user_AbC-_9"}),
    ("threadr:user:email:ann@x.io", "user_email_index", {"email": "ann@x.io"}),
    ("threadr:email:ann@x.io", "newsletter", {"email": "ann@x.io"}),
    ("threadr:emails:list", "newsletter_list", {}),
    ("threadr:usage:stats", "usage_stats", {}),
    ("threadr:usage:ip:2001:db8::1:daily:2026-11-27", "usage_counter",
     {"kind": "ip", "subject": "2001:db8::1", "period": "daily", "bucket": "2026-11-27"}),
    ("threadr:usage:email:o:dd@x.io:monthly:2026-11", "usage_counter",
     {"kind": "email", "subject": "o:dd@x.io", "period": "monthly", "bucket": "2026-11"}),
    ("threadr:usage:log:2001:db8::1:1764265603.123456", "usage_log", {"ip": "2001:db8::1", "epoch": "1764265603.123456"}),
    ("threadr:failed_login:a@x.io:2001:db8::2", "failed_login", {"rest": "a@x.io:2001:db8::2"}),
    ("analytics:user_1:timeseries:impressions:MetricPeriod.DAY", "analytics_timeseries",
     {"user_id": "user_1", "metric": "impressions", "period": "MetricPeriod.DAY"}),
    ("analytics:user_1:thread:abc", "thread_analytics", {"user_id": "user_1", "thread_id": "abc"}),
    ("analytics:user_1:threads", "analytics_threads", {"user_id": "user_1"}),
    ("threadr:thread_stats:user_1", "thread_stats", {"user_id": "user_1"}),
    ("threadr:user_threads:user_1", "user_threads", {"user_id": "user_1"}),
    ("threadr:ratelimit:10.0.0.1", "ratelimit", {"ip": "10.0.0.1"}),
    ("threadr:cache:text:0123456789abcdef", "cache_text", {"hash": "0123456789abcdef"}),
])
def test_grammar_owns_each_key_shape(key, pattern, fields):
    found, got = THREADR.classify(key)
    assert found is not None and found.name == pattern
    assert got == fields


@pytest.mark.parametrize("key", ["team:42:members", "threadr:thread:not-a-uuid", "threadr:usage:ip:1.2.3.4:weekly:2026-11",
                                 "threadr:premium:", "threadrx:user:u"])
def test_keys_outside_every_grammar_are_unmapped(key):
    assert THREADR.classify(key) == (None, {})


@pytest.mark.parametrize("grammar, prefix", [
    ("threadr:usage:(?P<kind>ip|email):(?P<s>.+)", "threadr:usage:"),  # alternation inside a group
    ("a|b", ""), ("a[|]|b", ""), ("a[(]b|c", ""),  # alternation at the top, past a class
    ("ab?c", "a"), ("abc{2}", "ab"), ("ab*", "a"), ("ab+", "a"),  # a quantified character is not certain
    (r"a\.b", "a"), ("(?i)abc", ""), ("exact:key", "exact:key"),
])
def test_literal_prefix_is_never_longer_than_what_every_match_starts_with(grammar, prefix):
    assert literal_prefix(grammar) == prefix


@pytest.mark.parametrize("key", [
    "threadr:premium:ip:1.2.3.4", "threadr:user:email:a@x.io", "threadr:usage:user:user_1:daily:2026-11-27",
    "analytics:u:threads", "analytics:u:thread:t", "threadr:cache:url:x", "team:42", "threadr:usage:stats", "",
])
def test_prefix_filter_never_drops_a_key_its_scope_owns(key):
    """Per priority: a key whose owner is in scope always passes the startswith test."""
    owner, _ = THREADR.classify(key)
    for priority in {p.priority for p in THREADR.patterns}:
        scope = THREADR.select([priority])
        if owner is not None and owner in scope:
            assert key.encode().startswith(THREADR.prefixes(scope)), (key, priority)


def grant(**over):
    value = {
        "granted_at": "2026-11-20T10:00:00.123456", "expires_at": "2026-12-20 10:00:00.123456", "plan": "premium",
        "duration_days": 30, "client_ip": "2001:db8::1", "email": "ann@x.io",
        "payment_info": {"payment_reference": "cs_test_1", "granted_at": "2026-11-20T10:00:00", "granted_by": "stripe_webhook",
                         "client_ip": "2001:db8::1", "stripe_session_id": "cs_test_1", "amount": 499, "currency": "usd"},
    }
    value.update(over)
    return value


def test_premium_ip_and_email_keys_of_one_purchase_are_one_entitlement():
    _, by_ip = one("threadr:premium:ip:2001:db8::1", grant())
    _, by_email = one("threadr:premium:email:ann@x.io", grant())
    assert by_ip["id"] == by_email["id"]
    # each key knows both lookups of its purchase: the two rows are the same row
    assert (by_ip["ip"], by_ip["email"]) == (by_email["ip"], by_email["email"]) == ("2001:db8::1", "ann@x.io")
    assert by_ip == by_email
    # a hand-written grant without client_ip: only its ip key knows the ip, the email key leaves it out
    _, manual = one("threadr:premium:email:ann@x.io", {k: v for k, v in grant().items() if k != "client_ip"})
    assert "ip" not in manual and manual["email"] == "ann@x.io"
    _, no_email = one("threadr:premium:ip:None", grant(client_ip=None, email=None))
    assert (no_email["ip"], no_email["email"]) == (None, None)
    assert by_ip["amount_cents"] == 499 and by_ip["status"] == "active"
    # both datetime spellings, naive -> UTC, aware results only
    assert by_ip["granted_at"] == datetime(2026, 11, 20, 10, 0, 0, 123456, tzinfo=timezone.utc)
    assert by_ip["premium_expires_at"] == datetime(2026, 12, 20, 10, 0, 0, 123456, tzinfo=timezone.utc)


def test_premium_ip_none_belongs_to_no_ip_and_placeholder_is_kept():
    _, none = one("threadr:premium:ip:None", grant(client_ip=None))
    assert none["ip"] is None and none["grant_client_ip"] is None
    _, zero = one("threadr:premium:ip:0.0.0.0", grant(client_ip="0.0.0.0"))
    assert zero["ip"] == "0.0.0.0"


def test_expired_grant_is_migrated_as_expired_and_manual_grant_without_reference_gets_stable_id():
    manual = grant(expires_at="2026-11-01T00:00:00",
                   payment_info={"payment_reference": None, "granted_at": "x", "granted_by": "admin", "client_ip": None,
                                 "source": "manual", "timestamp": "2026-10-01", "test_account": True})
    _, a = one("threadr:premium:email:ann@x.io", manual)
    _, b = one("threadr:premium:email:ann@x.io", manual)
    assert a["status"] == "expired" and a["payment_reference"] is None and a["id"] == b["id"]


def test_source_timezone_applies_to_naive_datetimes():
    _, row = one("threadr:premium:ip:1.2.3.4", grant(), tz="Europe/Berlin")
    assert row["granted_at"] == datetime(2026, 11, 20, 9, 0, 0, 123456, tzinfo=timezone.utc)


def subscription(**over):
    value = {"subscription_id": "sub_1", "plan_name": "threadr_pro", "plan_display_name": "Pro", "tier_level": 2,
             "status": "active", "current_period_start": "2026-11-01T00:00:00", "current_period_end": "2026-12-01 00:00:00",
             "cancel_at_period_end": False, "thread_limit": -1, "features": ["a"], "is_annual": False,
             "monthly_price": 1999, "annual_price": 19990}
    value.update(over)
    return value


def test_stripe_subscription_by_user_id_and_by_email():
    _, by_user = one("threadr:subscription:user:user_abc", subscription())
    assert by_user["user_id"] == user_uuid("user_abc") and by_user["customer_ref"] == "user_abc"
    assert by_user["premium_expires_at"] == datetime(2026, 12, 1, tzinfo=timezone.utc)
    _, by_email = one("threadr:subscription:user:Ann@x.io", subscription(subscription_id="sub_2"))
    assert by_email["user_id"] is None and by_email["customer_ref"] == "Ann@x.io"


def test_cancelled_with_two_ls_is_stripes_canceled_and_unknown_status_is_refused():
    _, row = one("threadr:subscription:user:user_abc", subscription(status="cancelled"))
    assert (row["status"], row["status_raw"]) == ("canceled", "cancelled")
    for status in ("past_due", "trialing", "incomplete_expired", "unpaid", "paused"):
        assert one("threadr:subscription:user:user_abc", subscription(status=status))[1]["status"] == status
    with pytest.raises(BadRecord, match="not a Stripe subscription status"):
        one("threadr:subscription:user:user_abc", subscription(status="bogus"))


def user_value(**over):
    value = {"user_id": "user_abc", "email": "Ann@X.io", "password_hash": "$2b$12$" + "a" * 53, "role": "premium",
             "status": "active", "created_at": "2026-01-01T00:00:00", "updated_at": "2026-02-01 00:00:00.5",
             "last_login_at": None, "login_count": 3, "failed_login_attempts": 0, "last_failed_login": None,
             "is_email_verified": True, "email_verification_token": None, "password_reset_token": None,
             "password_reset_expires": None, "metadata": {"plan": "x"}}
    value.update(over)
    return value


def test_user_keeps_its_hash_and_maps_both_legacy_ids():
    rows = rows_for("threadr:user:user_abc", user_value())
    user = rows[0].values
    assert user["password_hash"] == "$2b$12$" + "a" * 53
    assert user["updated_at"] == datetime(2026, 2, 1, 0, 0, 0, 500000, tzinfo=timezone.utc)
    legacy = {r.values["legacy_id"]: r.values["entity_id"] for r in rows[1:]}
    assert legacy == {"user_abc": user["id"], "ann@x.io": user["id"]}


def test_user_whose_value_disagrees_with_its_key_is_refused():
    with pytest.raises(BadRecord, match="does not match the key"):
        rows_for("threadr:user:user_abc", user_value(user_id="user_other"))
    with pytest.raises(BadRecord, match="password_hash"):
        rows_for("threadr:user:user_abc", user_value(password_hash=None))
    with pytest.raises(BadRecord, match="login_count"):
        rows_for("threadr:user:user_abc", user_value(login_count="many"))


def test_usage_counters_daily_and_monthly():
    _, daily = one("threadr:usage:ip:2001:db8::1:daily:2026-11-27", b"7")
    assert (daily["subject"], daily["period_start"].isoformat(), daily["count"]) == ("2001:db8::1", "2026-11-27", 7)
    _, monthly = one("threadr:usage:user:user_abc:monthly:2026-11", b"12")
    assert monthly["period_start"].isoformat() == "2026-11-01"
    with pytest.raises(BadRecord):
        one("threadr:usage:ip:1.2.3.4:daily:2026-11-27", b"-1")
    with pytest.raises(BadRecord):
        one("threadr:usage:ip:1.2.3.4:daily:2026-13-45", b"1")


def test_thread_keeps_tweets_with_unicode_and_emoji():
    tweets = [{"id": "t1", "content": "Ünïcödé ✓ 🚀 日本語", "order": 1, "character_count": 17}]
    value = {"id": "8a1f2c3d-0000-4000-8000-000000000001", "user_id": "user_abc", "title": "T", "original_content": "body",
             "tweets": tweets, "metadata": {"tags": ["x"]}, "created_at": "2026-11-27T17:46:43.199965",
             "updated_at": "2026-11-27 17:46:43.202998", "view_count": 1, "copy_count": 0, "is_favorite": True, "is_archived": False}
    table, row = one("threadr:thread:8a1f2c3d-0000-4000-8000-000000000001", value)
    assert table == "threads" and row["tweets"] == tweets
    with pytest.raises(BadRecord, match="tweets"):
        one("threadr:thread:8a1f2c3d-0000-4000-8000-000000000001", {**value, "tweets": "oops"})


def test_timeseries_normalises_metric_period_and_reads_each_member():
    members = [(json.dumps({"timestamp": "2026-11-2%dT00:00:00" % d, "value": d * 1.5, "period": "MetricPeriod.DAY"}).encode(), 0.0)
               for d in (1, 2)]
    rows = rows_for("analytics:user_abc:timeseries:impressions:MetricPeriod.DAY", members)
    assert [r.values["period"] for r in rows] == ["day", "day"]
    assert [r.values["value"] for r in rows] == [1.5, 3.0]
    with pytest.raises(BadRecord, match="not JSON"):
        rows_for("analytics:user_abc:timeseries:impressions:day", [(b"{", 1.0)])


def test_failed_login_splits_email_and_ipv6_from_its_value():
    value = {"attempts": 3, "last_attempt": "2026-11-27T17:00:00", "email": "a:b@x.io", "client_ip": "2001:db8::2"}
    _, row = one("threadr:failed_login:a:b@x.io:2001:db8::2", value)
    assert (row["email"], row["client_ip"], row["attempts"]) == ("a:b@x.io", "2001:db8::2", 3)
    with pytest.raises(BadRecord, match="cannot be split"):
        one("threadr:failed_login:other@x.io:2001:db8::2", value)


def test_usage_stats_hash_becomes_one_row_per_counter():
    rows = rows_for("threadr:usage:stats", {b"total_threads": b"10", b"threads_2026-11-27": b"2"})
    assert {r.values["stat_name"]: r.values["value"] for r in rows} == {"total_threads": 10, "threads_2026-11-27": 2}
    with pytest.raises(BadRecord):
        rows_for("threadr:usage:stats", {b"total_threads": b"ten"})


def test_usage_event_session_stats_and_analytics():
    _, event = one("threadr:usage:log:2001:db8::1:1764265603.5",
                   {"timestamp": "2026-11-27T17:46:43", "client_ip": "2001:db8::1", "email": None, "date": "2026-11-27", "month": "2026-11"})
    assert event["occurred_at"] == datetime(2026, 11, 27, 17, 46, 43, tzinfo=timezone.utc) and event["email"] is None
    _, sess = one("threadr:session:user_abc", {"user_id": "user_abc", "email": "a@x.io", "role": "user", "status": "active",
                                              "login_timestamp": "2026-11-27 17:00:00", "client_ip": "1.2.3.4",
                                              "last_activity": "2026-11-27T17:10:00", "access_token_hash": "h"})
    assert sess["last_activity"] - sess["login_at"] == timedelta(minutes=10)
    _, stats = one("threadr:thread_stats:user_abc", {"created": 3, "viewed": 9})
    assert (stats["created"], stats["viewed"], stats["copied"]) == (3, 9, 0)
    _, ana = one("analytics:user_abc:thread:t1", {"posted_at": "2026-11-27T17:00:00", "totals": {"likes": 2}})
    assert ana["analytics"]["totals"] == {"likes": 2}


@pytest.mark.parametrize("raw, fmt, reason", [
    (b'{"email": "x@', "json", "not valid JSON"),
    (b"\xff\xfe\x00bad", "json", "not valid UTF-8"),
    (b"abc", "int", "not an integer"),
    ({b"\xff": b"1"}, "hash", "not valid UTF-8"),
])
def test_decode_refuses_broken_values_with_a_reason(raw, fmt, reason):
    with pytest.raises(BadRecord, match=reason):
        decode(raw, fmt)


def test_wrong_shapes_are_bad_records_not_crashes():
    with pytest.raises(BadRecord, match="expected a JSON object"):
        one("threadr:premium:ip:1.2.3.4", [1, 2])
    with pytest.raises(BadRecord, match="expires_at"):
        one("threadr:premium:ip:1.2.3.4", grant(expires_at="soon"))
    with pytest.raises(BadRecord, match="expires_at"):
        one("threadr:premium:ip:1.2.3.4", grant(expires_at=None))


def test_stable_ids_are_rfc4122_uuid5_so_they_never_drift():
    import uuid

    from migrator.values import ID_NAMESPACE, stable_id

    many = [("n", str(i)) for i in range(64)]  # every variant digit (8, 9, a, b) comes up
    for parts in [("premium", "cs_test_1"), ("user", "user_abc"), ("usage", "ip", "2001:db8::1", "daily", "2026-11-27"),
                  ("ü", "🚀"), *many]:
        assert stable_id(*parts) == str(uuid.uuid5(ID_NAMESPACE, "\x1f".join(parts)))
    assert {stable_id(*parts)[19] for parts in many} == set("89ab")
