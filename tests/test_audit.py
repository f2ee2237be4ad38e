"""The data audit (one SCAN pass over a real Redis) and the mapping document built from it."""
from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime, timedelta, timezone

import pytest
import redis

from migrator.views.audit import (
    AUDIT_PREFIX,
    Tally,
    USED_MEMORY_LIMIT,
    _Auditor,
    audit_keyspace,
    key_shape,
    render_audit,
    stop_conditions,
    ttl_bucket,
    write_audit,
)
from migrator.core.config import ConfigError
from migrator.apps.threadr.audit import PREMIUM_USERS_LIMIT, PremiumTally
from migrator.apps.threadr.demo import seed_demo
from migrator.core.mapping import Link, Mapping, Pattern, Priority, Row
from migrator.views.mapping_doc import MAPPING_PREFIX, build_mapping_document, latest_audit, write_mapping_document
from migrator.core.merge import TableRule
from migrator.apps.threadr import THREADR

NOW = datetime(2026, 11, 27, 12, 0, 0)  # naive, as the app wrote datetimes
CRITICAL_MIGRATED = {p.name for p in THREADR.patterns if p.migrated and p.priority == Priority.CRITICAL}


def by_name(report: dict) -> dict[str, dict]:
    return {p["pattern"]: p for p in report["patterns"]}


def expected(seeded: dict[str, int]) -> dict[str, int]:
    """Keys per pattern as the audit counts them: a record the app's model refuses is still a key
    of its pattern."""
    keys = {name: n for name, n in seeded.items() if name not in ("unmapped", "refused")}
    keys["thread"] += seeded.get("refused", 0)
    return keys


def test_counts_per_pattern_match_the_seeded_keyspace_and_dbsize(r):
    seeded = seed_demo(r, 400, now=NOW)
    report = audit_keyspace(r, THREADR, memory_sample=100, now=NOW)
    patterns = by_name(report)
    assert {name: patterns[name]["keys"] for name in seeded if name not in ("unmapped", "refused")} == expected(seeded)
    assert report["unmapped"]["keys"] == seeded["unmapped"] > 0
    assert report["total_keys"] == report["dbsize"] == r.dbsize() == sum(seeded.values())
    assert sum(report["ttl_buckets"].values()) == r.dbsize()
    for p in report["patterns"]:
        assert p["wrong_type"] == 0 and set(p["by_type"]) <= {p["redis_type"]}, p["pattern"]
        assert (p["estimated_bytes"] > 0) == (p["keys"] > 0), p["pattern"]
    # about memory_sample keys get MEMORY USAGE, plus the first key of each pattern
    assert 50 <= report["memory_sample"]["sampled"] <= 100 + len(THREADR.patterns) + 1
    # a time series zset becomes one row per member: more records than keys
    series = patterns["analytics_timeseries"]
    assert series["records"] > series["keys"] > 0
    assert report["by_priority"]["medium"]["records"] > report["by_priority"]["medium"]["keys"]
    assert report["by_table"]["newsletter_subscribers"]["keys"] == seeded["newsletter"]
    assert report["by_table"]["usage_counters"]["keys"] == seeded["usage_counter"]
    assert report["stop_conditions"] == []


def test_cluster_is_audited_per_master_every_key_once(cluster):
    rc = redis.RedisCluster(host="127.0.0.1", port=cluster[0])
    seeded = seed_demo(rc, 100, now=NOW)
    node = redis.Redis(port=cluster[1])  # any node: the audit finds the masters
    report = audit_keyspace(node, THREADR, now=NOW)
    assert report["redis"]["nodes"] == 3
    assert report["total_keys"] == report["dbsize"] == sum(seeded.values())
    patterns = by_name(report)
    assert {name: patterns[name]["keys"] for name in seeded if name not in ("unmapped", "refused")} == expected(seeded)
    rc.flushall()
    rc.close()
    node.close()


def test_a_key_gone_between_scan_and_type_is_counted_as_vanished(r):
    auditor = _Auditor(THREADR, every=1, now=NOW.replace(tzinfo=timezone.utc), show_pii=False)
    r.set("threadr:user:user_here", "{}")
    auditor.reply(r, [b"threadr:user:user_gone", b"threadr:user:user_here"])  # as if SCAN had named both
    user = auditor.tallies["user"]
    assert (user.keys, user.vanished, user.records, dict(user.by_type)) == (2, 1, 1, {"string": 1})
    assert sum(user.ttl.values()) == 1 and user.sampled == 1
    assert auditor.tallies["thread"] == Tally()


def test_wrong_type_keys_are_counted_under_their_pattern(r):
    # malformed k % 7 == 1: hash user keys, == 2: list thread keys, == 6: a set where an index is a string
    seed_demo(r, 50, malformed=12, now=NOW)
    patterns = by_name(audit_keyspace(r, THREADR, now=NOW))
    assert (patterns["user"]["wrong_type"], patterns["user"]["by_type"]["hash"]) == (2, 2)
    assert (patterns["thread"]["wrong_type"], patterns["thread"]["by_type"]["list"]) == (2, 2)
    assert (patterns["user_threads"]["wrong_type"], patterns["user_threads"]["by_type"]["set"]) == (1, 1)
    assert sum(p["wrong_type"] for p in patterns.values()) == 5
    assert patterns["user"]["records"] == patterns["user"]["keys"] - 2  # a wrong-typed key writes no row


def test_unmapped_shapes_mask_emails_and_ips_unless_asked(r):
    pii = ("bob@example.com", "203.0.113.7", "2001:db8::5", "ann@example.org")
    r.set("legacy:bob@example.com:prefs", "1")
    r.set("legacy:ann@example.org:prefs", "1")
    r.set("blocklist:203.0.113.7", "1")
    r.set("blocklist:2001:db8::5", "1")
    r.sadd("team:14b70f5b-ccc9-457c-8fe1-86a5de64d756:members", "user_1")
    report = audit_keyspace(r, THREADR, now=NOW)
    shapes = {s["shape"]: s for s in report["unmapped"]["shapes"]}
    assert {name: s["keys"] for name, s in shapes.items()} == {"legacy:*:prefs": 2, "blocklist:*": 2, "team:*:members": 1}
    assert "b***@e***" in " ".join(shapes["legacy:*:prefs"]["examples"])
    dumped, rendered = json.dumps(report), render_audit(report)
    for secret in pii:
        assert secret not in dumped and secret not in rendered
    assert not re.search(r"\b\d{1,3}(\.\d{1,3}){3}\b", dumped)  # nor the server's own address
    assert "legacy:*:prefs" in rendered and "critical data pattern missing" in rendered

    shown = audit_keyspace(r, THREADR, show_pii=True, now=NOW)
    examples = {e for s in shown["unmapped"]["shapes"] for e in s["examples"]}
    assert {"legacy:bob@example.com:prefs", "blocklist:203.0.113.7", "blocklist:2001:db8::5"} <= examples
    # nothing of the mapping's critical data is there: each missing pattern is a stop condition
    missing = [w for w in report["stop_conditions"] if w.startswith("critical data pattern missing")]
    assert len(missing) == len(CRITICAL_MIGRATED) and all(any(n in w for w in missing) for n in CRITICAL_MIGRATED)


def test_control_characters_in_key_names_are_escaped_so_each_shape_stays_one_line(r):
    for key in (b"legacy:line\nbreak", b"legacy:tab\there", b"legacy:\x1b[31mred", b"legacy:cr\rreturn"):
        r.set(key, "1")
    report = audit_keyspace(r, THREADR, show_pii=True, now=NOW)
    shown = {e for s in report["unmapped"]["shapes"] for e in s["examples"]}
    assert {"legacy:line\\nbreak", "legacy:tab\\there", "legacy:\\x1b[31mred", "legacy:cr\\rreturn"} <= shown
    rendered = render_audit(report)
    lines = [line for line in rendered.splitlines() if "legacy:" in line]
    assert lines and all(not re.search(r"[\x00-\x1f\x7f]", line) for line in lines)
    assert sum("legacy:line\\nbreak" in line for line in lines) >= 1 and "\r" not in rendered and "\x1b" not in rendered


def test_key_shape_generalises_ids_and_keeps_names():
    assert key_shape("team:14b70f5b-ccc9-457c-8fe1-86a5de64d756") == "team:*"
    assert key_shape("jobs:queue:12345:retry") == "jobs:queue:*:retry"
    assert key_shape("a.b@c.io") == "*"
    assert key_shape("threadr:feature_flags") == "threadr:feature_flags"


def grant(expires: datetime, reference: str | None, *, iso: bool = True) -> str:
    info = {"payment_reference": reference, "granted_by": "stripe_webhook"} if reference else None
    return json.dumps({"granted_at": str(NOW - timedelta(days=30)), "plan": "premium", "duration_days": 30,
                       "expires_at": expires.isoformat() if iso else str(expires), "payment_info": info})


def test_premium_grants_active_expired_and_distinct_purchases(r):
    paid = grant(NOW + timedelta(days=10), "cs_A")
    r.set("threadr:premium:ip:198.51.100.1", paid)  # one purchase, both keys
    r.set("threadr:premium:email:a@x.io", paid)
    r.set("threadr:premium:ip:198.51.100.2", grant(NOW - timedelta(days=1), "cs_B", iso=False))
    r.set("threadr:premium:email:c@x.io", grant(NOW + timedelta(hours=1), None))
    r.set("threadr:premium:email:d@x.io", "not json")
    r.set("threadr:premium:ip:None", json.dumps({"expires_at": "soon"}))
    r.set("threadr:premium:ip:0.0.0.0", json.dumps({"expires_at": 1e20}))  # an epoch past year 9999
    sub = {"subscription_id": "sub_1", "current_period_end": (NOW + timedelta(days=20)).isoformat()}
    r.set("threadr:subscription:user:user_1", json.dumps({**sub, "status": "active"}))
    r.set("threadr:subscription:user:e@x.io", json.dumps({**sub, "status": "cancelled"}))
    r.set("threadr:subscription:user:f@x.io", json.dumps({**sub, "status": ["active"]}))  # counted, not a crash
    premium = audit_keyspace(r, THREADR, now=NOW)["premium"]
    assert {k: v for k, v in premium.items() if k not in ("patterns", "summary")} == {
        "grants_active": 3, "grants_expired": 1, "unparseable": 3, "distinct_purchases": 2, "active_purchases": 1,
        "unreferenced_active_grants": 1, "subscriptions_active": 1, "subscriptions_inactive": 2, "premium_users": 3,
    }
    assert set(premium["patterns"]) == CRITICAL_MIGRATED
    # an hour later the unreferenced grant has lapsed too
    later = audit_keyspace(r, THREADR, now=NOW + timedelta(hours=2))["premium"]
    assert (later["grants_active"], later["grants_expired"], later["premium_users"]) == (2, 2, 2)


def test_ttl_buckets_per_pattern_and_overall(r):
    r.set("threadr:thread_stats:user_1", "{}")
    r.set("threadr:thread_stats:user_2", "{}", ex=30 * 60)
    r.set("threadr:thread_stats:user_3", "{}", ex=2 * 86_400)
    r.set("legacy:archive", "1", ex=400 * 86_400)
    report = audit_keyspace(r, THREADR, now=NOW)
    assert by_name(report)["thread_stats"]["ttl_buckets"] == {
        "none": 1, "<1h": 1, "<1d": 0, "<7d": 1, "<30d": 0, "<365d": 0, ">=365d": 0}
    assert report["unmapped"]["ttl_buckets"][">=365d"] == 1
    assert report["ttl_buckets"] == {"none": 1, "<1h": 1, "<1d": 0, "<7d": 1, "<30d": 0, "<365d": 0, ">=365d": 1}


def test_ttl_bucket_edges():
    assert [ttl_bucket(ms) for ms in (-1, 0, 3_599_999, 3_600_000, 86_400_000, 365 * 86_400_000)] == \
        ["none", "<1h", "<1h", "<1d", "<7d", ">=365d"]


def test_stop_condition_thresholds():
    critical = [p for p in THREADR.patterns if p.name == "premium_ip"]
    assert stop_conditions(used_memory=USED_MEMORY_LIMIT, missing_critical=[]) == []
    memory, missing = stop_conditions(used_memory=USED_MEMORY_LIMIT + 1, missing_critical=critical)
    tally = PremiumTally(THREADR)
    tally.subscriptions_active = PREMIUM_USERS_LIMIT
    assert tally.stop_conditions() == []
    tally.subscriptions_active += 1
    (staged,) = tally.stop_conditions()
    assert "consider a staged migration (--priority critical first)" in staged and "50,001" in staged
    assert "plan for extended migration time; throttle" in memory
    assert missing.startswith("critical data pattern missing: investigate") and "threadr:premium:ip:*" in missing


def test_huge_collections_are_sized_without_reading_their_members(r):
    pipe = r.pipeline(transaction=False)
    for start in range(0, 100_000, 10_000):
        pipe.sadd("threadr:emails:list", *(f"reader{i}@example.com" for i in range(start, start + 10_000)))
        pipe.zadd("analytics:user_1:timeseries:impressions:day", {f'{{"value": {i}}}': i for i in range(start, start + 10_000)})
    pipe.execute()
    started = time.monotonic()
    patterns = by_name(audit_keyspace(r, THREADR, now=NOW))
    assert time.monotonic() - started < 2  # reading 200k members would not be
    members = patterns["newsletter_list"]
    assert (members["keys"], members["by_type"], members["records"]) == (1, {"set": 1}, 0)  # skipped: no rows
    assert members["estimated_bytes"] > 1_000_000
    series = patterns["analytics_timeseries"]
    assert (series["keys"], series["records"]) == (1, 100_000) and series["estimated_bytes"] > 1_000_000


def test_audit_report_file_is_written_and_parseable(r, tmp_path):
    seed_demo(r, 20, now=NOW)
    report = audit_keyspace(r, THREADR, now=NOW)
    path = write_audit(report, tmp_path / "reports")
    assert path.name == f"{AUDIT_PREFIX}20261127_120000.json"
    assert json.loads(path.read_text()) == report
    assert latest_audit(tmp_path / "reports") == report


def test_mapping_document_covers_every_pattern_with_dependencies_and_audited_volumes(r):
    seed_demo(r, 30, now=NOW)
    audit = audit_keyspace(r, THREADR, now=NOW)
    doc = build_mapping_document(THREADR, audit)
    patterns = {p["name"]: p for p in doc["patterns"]}
    assert list(patterns) == [p["pattern"] for p in audit["patterns"]]
    assert set(patterns) == {p.name for p in THREADR.patterns}
    assert "user" in patterns["thread"]["dependencies"]
    # no declared dependency, but its table links rows to users: migrated first, linked later
    assert patterns["premium_ip"]["dependencies"] == ["user"] == patterns["premium_ip"]["deferred_dependencies"]
    assert patterns["user"]["dependencies"] == []
    for entry in audit["patterns"]:
        volumes = patterns[entry["pattern"]]["volumes"]
        assert (volumes["keys"], volumes["estimated_bytes"]) == (entry["keys"], entry["estimated_bytes"])
    assert patterns["usage_counter"]["merge_rule"]["greatest"] == ["count"]
    assert patterns["ratelimit"]["complexity"] == "low" and patterns["ratelimit"]["merge_rule"] is None
    assert patterns["analytics_timeseries"]["complexity"] == "high"
    assert [step["priority"] for step in doc["migration_order"]] == ["critical", "high", "medium", "low"]
    subscriptions = next(t for t in doc["tables"] if t["table"] == "subscriptions")
    assert subscriptions["patterns"] == ["premium_ip", "premium_email", "subscription"]
    assert doc["audit"]["total_keys"] == audit["total_keys"]
    assert build_mapping_document(THREADR, None)["patterns"][0]["volumes"] is None


def test_mapping_document_reads_any_mapping():
    def nothing(_rec) -> list[Row]:
        return []

    mapping = Mapping("notes-app", (
        Pattern("note", "n:*", r"n:(?P<id>\w+)", "zset", Priority.HIGH, "notes", value_format="zset",
                table="notes", transform=nothing, member_wise=True),
        Pattern("account", "acct:*", r"acct:(?P<user_id>\w+)", "string", Priority.HIGH, "accounts",
                table="accounts", transform=nothing, validation=("email unique",)),
        Pattern("flag", "flag:*", r"flag:(?P<name>\w+)", "string", Priority.LOW, "flags", value_format="text",
                table="flags", transform=nothing),
    ), rules=(TableRule("notes"), TableRule("accounts", version="updated_at"), TableRule("flags")),
        links=(Link("notes", "owner", into="account_id"),), linked_patterns=("account",))
    doc = build_mapping_document(mapping, None)
    patterns = {p["name"]: p for p in doc["patterns"]}
    assert doc["linked_patterns"] == ["account"] and patterns["note"]["link_columns"] == ["owner"]
    assert patterns["note"]["dependencies"] == ["account"] and patterns["note"]["deferred_dependencies"] == []
    assert [patterns[n]["complexity"] for n in ("note", "account", "flag")] == ["high", "medium", "low"]
    assert patterns["account"]["validation"] == ["email unique"]
    assert patterns["account"]["merge_rule"]["version"] == "updated_at"


def test_latest_audit_picks_the_newest_timestamp_not_the_newest_file(tmp_path):
    assert latest_audit(tmp_path / "absent") is None
    stamps = [datetime(2026, 11, d, 9, 30, tzinfo=timezone.utc) for d in (25, 27, 26)]
    paths = [write_audit({"generated_at": at.isoformat(), "n": i}, tmp_path) for i, at in enumerate(stamps)]
    for age, path in enumerate(reversed(paths)):  # mtimes say the opposite of the names
        os.utime(path, (1_000_000 + age, 1_000_000 + age))
    (tmp_path / f"{AUDIT_PREFIX}latest.json").write_text("{}")
    write_mapping_document({"generated_at": datetime(2027, 1, 1, tzinfo=timezone.utc).isoformat()}, tmp_path)
    assert latest_audit(tmp_path)["n"] == 1
    assert [p.name for p in tmp_path.glob(f"{MAPPING_PREFIX}*")] == [f"{MAPPING_PREFIX}20270101_000000.json"]
    (tmp_path / f"{AUDIT_PREFIX}20261128_000000.json").write_text('{"cut off')
    with pytest.raises(ConfigError, match=re.escape("run the audit again")):
        latest_audit(tmp_path)
