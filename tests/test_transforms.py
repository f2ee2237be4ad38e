"""Each pattern's grammar and transform with the quirks of Threadr's keyspace (pure: no services)."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from migrator.core.mapping import BadRecord, SourceRecord, literal_prefix
from migrator.core.source import decode
from migrator.apps.threadr.mapping import THREADR, user_uuid

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
    # each key says its own lookup: the other key of the purchase may name a later grant by now
    assert (by_ip["ip"], by_ip["email"]) == ("2001:db8::1", None)  # NULL: the writer's COALESCE keeps the other's
    assert (by_email["ip"], by_email["email"]) == (None, "ann@x.io")
    assert rows_for("threadr:premium:ip:2001:db8::1", grant())[0].unknown == ("email",)
    assert rows_for("threadr:premium:email:ann@x.io", grant())[0].unknown == ("ip",)
    assert {k: v for k, v in by_ip.items() if k not in ("ip", "email")} == \
        {k: v for k, v in by_email.items() if k not in ("ip", "email")}
    assert by_ip["amount_cents"] == 499 and by_ip["status"] == "active"
    # both datetime spellings, naive -> UTC, aware results only
    assert by_ip["granted_at"] == datetime(2026, 11, 20, 10, 0, 0, 123456, tzinfo=timezone.utc)
    assert by_ip["premium_expires_at"] == datetime(2026, 12, 20, 10, 0, 0, 123456, tzinfo=timezone.utc)


def test_premium_ip_none_belongs_to_no_ip_and_placeholder_is_kept():
    _, none = one("threadr:premium:ip:None", grant(client_ip=None))
    assert none["ip"] is None and none["grant_client_ip"] is None
    _, zero = one("threadr:premium:ip:0.0.0.0", grant(client_ip="0.0.0.0"))
    assert zero["ip"] == "0.0.0.0"


@pytest.mark.parametrize("key, value", [
    ("threadr:premium:ip:None", grant(client_ip=None)),  # a webhook grant: the key says None, the row NULL
    ("threadr:premium:ip:2001:db8::1", grant()),
    ("threadr:premium:email:Ann.Lee@Example.ORG", grant(email="Ann.Lee@Example.ORG")),  # as typed: any case
    ("threadr:premium:email:a:b@x.io", grant(email="a:b@x.io")),
])
def test_a_premium_row_spells_the_key_it_came_from(key, value):
    """What `migrator follow` looks for before it retires a grant's row whose other key went."""
    pattern, _ = THREADR.classify(key)
    assert pattern.row_key.render(rows_for(key, value)[0].values) == key
    assert THREADR.sharing("subscriptions") == (THREADR.named("premium_ip")[0], THREADR.named("premium_email")[0])
    assert THREADR.sharing("users") == ()  # (one pattern writes it: nothing to look for)


def test_two_grants_sharing_a_payment_reference_are_two_records():
    """payment_reference is free text the app reuses (webhook retries, admin grants): a grant is
    identified by its whole value, which its ip and email keys share and no other grant does."""
    _, ann = one("threadr:premium:email:ann@x.io", grant())
    _, bob = one("threadr:premium:email:bob@x.io", grant(email="bob@x.io", granted_at="2026-11-20T10:00:05"))
    assert ann["payment_reference"] == bob["payment_reference"] and ann["id"] != bob["id"]
    _, again = one("threadr:premium:ip:2001:db8::1", grant())
    assert again["id"] == ann["id"]


def test_expired_grant_keeps_its_expiry_with_a_status_the_clock_does_not_change_and_manual_grant_without_reference_gets_stable_id():
    manual = grant(expires_at="2026-11-01T00:00:00",
                   payment_info={"payment_reference": None, "granted_at": "x", "granted_by": "admin", "client_ip": None,
                                 "source": "manual", "timestamp": "2026-10-01", "test_account": True})
    _, a = one("threadr:premium:email:ann@x.io", manual)
    _, b = one("threadr:premium:email:ann@x.io", manual)
    # (a status from the clock would turn once premium_expires_at passed, and verify would call the row different)
    assert a["status"] == "active" and a["premium_expires_at"] < datetime.now(timezone.utc)
    assert a["payment_reference"] is None and a["id"] == b["id"]


def test_grant_with_an_empty_expiry_is_refused_with_that_reason():
    with pytest.raises(BadRecord, match="expires_at is empty"):
        one("threadr:premium:ip:1.2.3.4", grant(expires_at=""))


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


def test_cancelled_with_two_ls_is_stripes_canceled_and_any_status_the_app_writes_is_kept():
    _, row = one("threadr:subscription:user:user_abc", subscription(status="cancelled"))
    assert (row["status"], row["status_raw"]) == ("canceled", "cancelled")
    # SubscriptionInfo has no enum on status: whatever Stripe or the app wrote is data
    for status in ("past_due", "trialing", "incomplete_expired", "unpaid", "paused", "something_new"):
        assert one("threadr:subscription:user:user_abc", subscription(status=status))[1]["status"] == status
    with pytest.raises(BadRecord, match="SubscriptionInfo refuses it: features"):
        one("threadr:subscription:user:user_abc", subscription(features="all"))


def test_one_subscription_under_two_keys_is_two_records_and_a_scripts_fields_are_kept():
    _, by_user = one("threadr:subscription:user:user_abc", subscription())
    _, by_email = one("threadr:subscription:user:Ann@x.io", subscription())
    assert by_user["stripe_subscription_id"] == by_email["stripe_subscription_id"] and by_user["id"] != by_email["id"]
    # dual_write_service's shape: fewer fields, periods with microseconds, a field of its own
    _, dual = one("threadr:subscription:user:user_abc", {
        "subscription_id": "dual_write_user_abc_1764265603.5", "plan_name": "premium", "status": "active",
        "current_period_start": "2026-11-27 17:46:43.202998", "current_period_end": "2026-12-27 17:46:43.202998",
        "tier_level": 2, "thread_limit": -1, "features": ["unlimited_threads"], "source": "dual_write"})
    assert dual["extra"] == {"source": "dual_write"} and dual["cancel_at_period_end"] is None
    assert dual["current_period_end"] == datetime(2026, 12, 27, 17, 46, 43, 202998, tzinfo=timezone.utc)
    _, nobody = one("threadr:subscription:user:None", subscription())  # a Stripe customer without email
    assert nobody["customer_ref"] is None and nobody["user_id"] is None


def user_value(**over):
    value = {"user_id": "user_abc", "email": "Ann@X.io", "password_hash": "$2b$12$" + "a" * 53, "role": "premium",
             "status": "active", "created_at": "2026-01-01T00:00:00", "updated_at": "2026-02-01 00:00:00.5",
             "last_login_at": None, "login_count": 3, "failed_login_attempts": 0, "last_failed_login": None,
             "is_email_verified": True, "email_verification_token": None, "password_reset_token": None,
             "password_reset_expires": None, "metadata": {"plan": "x"}}
    value.update(over)
    return value


def test_user_keeps_its_hash_and_its_email_index_says_whom_the_email_names():
    rows = rows_for("threadr:user:user_abc", user_value())
    user = rows[0].values
    assert user["password_hash"] == "$2b$12$" + "a" * 53
    assert user["updated_at"] == datetime(2026, 2, 1, 0, 0, 0, 500000, tzinfo=timezone.utc)
    assert {r.values["legacy_id"]: r.values["entity_id"] for r in rows[1:]} == {"user_abc": user["id"]}
    # the email -> user link comes from the app's own index: the user it names, races included
    (index,) = rows_for("threadr:user:email:ann@x.io", b"user_abc")
    assert (index.table, index.values["legacy_id"], index.values["entity_id"]) == ("legacy_id_map", "ann@x.io", user["id"])
    # a user of the app's PostgreSQL fallback has a UUID for an id: linked through the map too
    uuid_ref = "0b6f2f5e-3a34-4a4b-9a1e-2c3d4e5f6a7b"
    assert rows_for(f"threadr:user:{uuid_ref}", user_value(user_id=uuid_ref))[1].values["legacy_id"] == uuid_ref


def test_what_the_user_model_refuses_is_a_dead_letter_with_its_rule():
    with pytest.raises(BadRecord, match="User model refuses it: role 'superadmin' is not one of user, premium, admin"):
        rows_for("threadr:user:user_abc", user_value(role="superadmin"))
    with pytest.raises(BadRecord, match="User model refuses it: created_at is required"):
        rows_for("threadr:user:user_abc", user_value(created_at=None))


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
    # a 200-character title is the app's; what SavedThread refuses is a dead letter with its rule
    assert one("threadr:thread:8a1f2c3d-0000-4000-8000-000000000001", {**value, "title": "t" * 200})[1]["title"] == "t" * 200
    for over, rule in [({"title": "t" * 203}, "title is 203 characters, over 200"),
                       ({"tweets": []}, "tweets must be a list of at least one tweet"),
                       ({"tweets": [{**tweets[0], "content": "x" * 281}]}, "tweet 1 is 281 characters, over 280"),
                       ({"view_count": -1}, "view_count is negative")]:
        with pytest.raises(BadRecord, match=f"SavedThread model refuses it: {rule}"):
            one("threadr:thread:8a1f2c3d-0000-4000-8000-000000000001", {**value, **over})


def test_timeseries_normalises_metric_period_and_reads_each_member():
    # TimeSeriesDataPoint.json(): compact, a float value, the enum's value as period
    members = [(json.dumps({"timestamp": "2026-11-2%dT00:00:00" % d, "value": d * 1.5, "period": "day"},
                           separators=(",", ":")).encode(), 0.0) for d in (1, 2)]
    # two points at one instant are two members, and two rows
    members.append((b'{"timestamp":"2026-11-22T00:00:00","value":523.0,"period":"day"}', 0.0))
    rows = rows_for("analytics:user_abc:timeseries:impressions:MetricPeriod.DAY", members)
    assert [r.values["period"] for r in rows] == ["day", "day", "day"]
    assert [r.values["value"] for r in rows] == [1.5, 3.0, 523.0] and len({r.values["id"] for r in rows}) == 3
    with pytest.raises(BadRecord, match="TimeSeriesDataPoint model refuses it: period 'fortnight'"):
        rows_for("analytics:user_abc:timeseries:impressions:day", [(b'{"timestamp":"2026-11-22T00:00:00","value":1,'
                                                                     b'"period":"fortnight"}', 1.0)])
    with pytest.raises(BadRecord, match="not JSON"):
        rows_for("analytics:user_abc:timeseries:impressions:day", [(b"{", 1.0)])
    # a NaN posted: pydantic writes the point's value null; it is a point of the series, its value NULL
    nan = rows_for("analytics:user_abc:timeseries:engagement_rate:day",
                   [(b'{"timestamp":"2026-11-22T00:00:00","value":0.5,"period":"day"}', 0.0),
                    (b'{"timestamp":"2026-11-23T00:00:00","value":null,"period":"day"}', 0.0)])
    assert [r.values["value"] for r in nan] == [0.5, None]
    with pytest.raises(BadRecord, match="timestamp and value are required"):
        rows_for("analytics:user_abc:timeseries:impressions:day", [(b'{"timestamp":"2026-11-22T00:00:00"}', 1.0)])


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
                                              "last_activity": "2026-11-27T17:10:00",
                                              "access_token_hash": -8_765_432_109_876_543_210})
    assert sess["last_activity"] - sess["login_at"] == timedelta(minutes=10)
    # Python's hash() of the token: a signed 64-bit int beyond 2^53, kept exactly
    assert sess["access_token_hash"] == -8_765_432_109_876_543_210
    with pytest.raises(BadRecord, match="access_token_hash: expected Python's hash"):
        one("threadr:session:user_abc", {"user_id": "user_abc", "access_token_hash": "h"})
    _, stats = one("threadr:thread_stats:user_abc", {"created": 3, "viewed": 9})
    assert (stats["created"], stats["viewed"], stats["copied"]) == (3, 9, 0)
    analytics = {"thread_id": "t1", "user_id": "user_abc", "created_at": "2026-11-27T17:00:00", "title": "T",
                 "tweet_count": 2, "total_character_count": 80, "engagement_rate": 2.5,
                 "posted_at": "2026-11-27T17:00:00+00:00", "totals": {"likes": 2}}
    _, ana = one("analytics:user_abc:thread:t1", analytics)
    assert ana["analytics"]["totals"] == {"likes": 2}
    # a thread id posted by a client may hold colons
    _, posted = one("analytics:user_abc:thread:ext:thread:42", {**analytics, "thread_id": "ext:thread:42"})
    assert (posted["user_ref"], posted["thread_id"]) == ("user_abc", "ext:thread:42")
    with pytest.raises(BadRecord, match="ThreadAnalytics model refuses it: tweet_count, total_character_count required"):
        one("analytics:user_abc:thread:t1", {k: v for k, v in analytics.items() if not k.startswith(("tweet_", "total_"))})


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

    from migrator.core.values import ID_NAMESPACE, stable_id

    many = [("n", str(i)) for i in range(64)]  # every variant digit (8, 9, a, b) comes up
    for parts in [("premium", "cs_test_1"), ("user", "user_abc"), ("usage", "ip", "2001:db8::1", "daily", "2026-11-27"),
                  ("ü", "🚀"), *many]:
        assert stable_id(*parts) == str(uuid.uuid5(ID_NAMESPACE, "\x1f".join(parts)))
    assert {stable_id(*parts)[19] for parts in many} == set("89ab")
    # parts that hold the separator ("a\x1fb", "c" and "a", "b\x1fc" joined alike: one key's row overwrote
    # the other's) give ids of their own
    assert stable_id("pair", "a\x1fb", "c") != stable_id("pair", "a", "b\x1fc")
    assert stable_id("pair", "a\x1fb", "c") == stable_id("pair", "a\x1fb", "c") != stable_id("pair", "a", "b", "c")


def test_newsletter_keeps_a_scripts_fields_and_each_key_as_written():
    _, app = one("threadr:email:dana@example.com", {"email": "dana@example.com", "subscribed_at": "2026-11-01T00:00:00",
                                                    "client_ip": "unknown", "user_agent": "", "referrer": "", "source": "web_app"})
    assert (app["user_agent"], app["referrer"], app["extra"]) == ("", "", {})
    _, script = one("threadr:email:Dana@Example.com", {"user_id": "u-1", "subscribed_at": "2026-11-01T00:00:00",
                                                       "source": "dual_write", "plan": "free"})
    assert script["extra"] == {"user_id": "u-1", "plan": "free"} and script["id"] != app["id"]


def refs(key: str, value) -> list:
    pattern, fields = THREADR.classify(key)
    raw = value if isinstance(value, bytes) or pattern.value_format in ("set", "zset") else json.dumps(value).encode()
    return pattern.references(SourceRecord(key, fields, decode(raw, pattern.value_format), None, NOW, ZoneInfo("UTC")))


def test_index_patterns_and_records_name_what_must_be_there():
    """Indexes name records; records name the index that must list them (checked in Redis)."""
    from migrator.core.mapping import Reference

    assert refs("threadr:user:email:ann@x.io", b"user_abc") == [Reference("threadr:user:user_abc")]
    assert refs("threadr:user:user_abc", user_value()) == [Reference("threadr:user:email:Ann@X.io", "user_abc")]
    assert refs("threadr:user_threads:user_abc", ["t1", "t2"]) == [Reference("threadr:thread:t1"), Reference("threadr:thread:t2")]
    assert refs("threadr:subscriptions:active", [b"user_abc", b"None"]) == [
        Reference("threadr:subscription:user:None"), Reference("threadr:subscription:user:user_abc")]
    assert refs("analytics:user_abc:threads", [(b"t1", 1.0)]) == [Reference("analytics:user_abc:thread:t1")]
    assert refs("threadr:subscription:user:user_abc", subscription()) == [
        Reference("threadr:subscriptions:active", "user_abc")]
    assert refs("threadr:subscription:user:user_abc", subscription(status="past_due")) == []
    with pytest.raises(BadRecord, match="expected a JSON array"):
        refs("threadr:user_threads:user_abc", {"t1": 1})

