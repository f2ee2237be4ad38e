"""Large collections in bounded memory: read, transformed, checked and written a part at a time,
under a savepoint of their key's, and verified the same way; their dead letters capped like a
string's, with the true size."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

import migrator.core.batch
import migrator.core.verify
from migrator.apps.threadr.demo import add_usage_stats, write_large_timeseries
from migrator.core.options import RunOptions
from migrator.views.report import build_report
from migrator.execution.runner import execute_local, plan_run
from migrator.core.source import CHUNK_READ_MEMBERS, read_keys, read_parts
from migrator.apps.threadr import THREADR
from migrator.core.values import stable_id

from helpers import by_pattern, fingerprint, migrate, verify

MIB = 1024 * 1024


def zset_size(r, key: str) -> tuple[int, int]:
    """(bytes, members) of a sorted set as the dead letters count it: each member and 8 for its score."""
    members = r.zrange(key, 0, -1)
    return sum(len(m) + 8 for m in members), len(members)


def test_a_large_time_series_and_stats_hash_are_migrated_a_part_at_a_time_verified_and_rerun_writes_nothing(
        settings, r, pg, parts):
    n = 100_000
    series = write_large_timeseries(r, n)
    add_usage_stats(r, n)
    report = migrate(settings, priorities=("medium",))
    assert report["status"] == "completed" and report["balanced"]
    found = by_pattern(report)
    assert (found["analytics_timeseries"]["migrated"], found["analytics_timeseries"]["rows"]) == (1, n)
    assert (found["usage_stats"]["migrated"], found["usage_stats"]["rows"]) == (1, n)
    # each key read in parts of CHUNK_READ_MEMBERS, by the run and by its verification
    assert parts[series.encode()] >= n // CHUNK_READ_MEMBERS and parts[b"threadr:usage:stats"] >= n // CHUNK_READ_MEMBERS
    with pg.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT point_at) FROM analytics_timeseries WHERE source_key = %s", (series,))
        assert cur.fetchone() == (n, n)
        cur.execute("SELECT count(*), sum(value) FROM usage_stats")
        assert cur.fetchone() == (n, n * (n - 1) // 2)
    pg.rollback()

    result = verify(settings, report["run_id"])
    assert result["verdict"] == "clean"
    checked = {p["pattern"]: p for p in result["patterns"]}
    for name in ("analytics_timeseries", "usage_stats"):  # one key each, its rows counted once
        assert (checked[name]["keys"], checked[name]["compared"], checked[name]["rows"]) == (1, 1, n)

    tables = fingerprint(pg)
    again = migrate(settings, priorities=("medium",))
    assert again["figures"]["rows_written"] == 0 and fingerprint(pg) == tables

    # damage in PostgreSQL is found part by part: a row deleted, one changed, one no key gives
    point = json.loads(r.zrange(series, n // 2, n // 2)[0])
    with pg.cursor() as cur:
        cur.execute("DELETE FROM usage_stats WHERE stat_name = %s", (f"counter_{n // 3:07d}",))
        assert cur.rowcount == 1
        cur.execute("UPDATE analytics_timeseries SET value = value + 1 WHERE source_key = %s AND point_at = %s"
                    " RETURNING id", (series, point["timestamp"] + "+00:00"))
        changed = cur.fetchone()[0]
        cur.execute("INSERT INTO analytics_timeseries (id, user_ref, metric, period, point_at, value, migration_run,"
                    " source_key, metadata) SELECT %s, user_ref, metric, period, point_at, 0, migration_run, source_key,"
                    " metadata FROM analytics_timeseries WHERE id = %s", (stable_id("planted"), changed))
    pg.commit()
    result = verify(settings, report["run_id"])
    assert (result["missing"], result["different"], result["extra"]) == (1, 1, 1)
    checked = {p["pattern"]: p for p in result["patterns"]}
    assert checked["analytics_timeseries"]["compared"] == 1 and checked["analytics_timeseries"]["rows"] == n
    kinds = {e["kind"]: e for p in result["patterns"] for e in p["examples"]}
    assert kinds["different"]["id"] == changed and kinds["extra"]["why"] == "its key no longer gives this row"
    shown = migrator.core.verify.explain(r, pg, THREADR, kinds["different"], RunOptions())
    assert shown == [{"column": "value", "postgres": point["value"] + 1, "redis": point["value"]}]


def test_one_refused_member_late_in_a_large_time_series_dead_letters_the_key_and_keeps_none_of_its_rows(
        settings, r, pg, parts, monkeypatch):
    n = 50_000
    series = write_large_timeseries(r, n, refused_last=True)
    small = write_large_timeseries(r, 3, user="user_small")
    written: list[int] = []
    real = migrator.core.batch.Writer.write

    def counted(self, records):
        written.extend(len(rec.rows) for rec in records if rec.key == series.encode())
        return real(self, records)

    monkeypatch.setattr(migrator.core.batch.Writer, "write", counted)
    report = migrate(settings, priorities=("medium",), max_dead_ratio=1.0)
    assert report["status"] == "completed" and report["balanced"]
    found = by_pattern(report)["analytics_timeseries"]
    assert (found["scanned"], found["migrated"], found["dead"], found["rows"]) == (2, 1, 1, 3)
    assert sum(written) == n  # every valid part was written, then taken back with the key
    size, members = zset_size(r, series)
    with pg.cursor() as cur:
        cur.execute("SELECT source_key, count(*) FROM analytics_timeseries GROUP BY 1")
        assert cur.fetchall() == [(small, 3)]
        cur.execute("SELECT raw_value, error FROM migration_dead_letters")
        (raw, error), = cur.fetchall()
    assert len(raw) == MIB and bytes(raw).startswith(b'[["{\\"timestamp\\":\\"2026-01-01T00:00:00\\"')
    assert error == ("Threadr's TimeSeriesDataPoint model refuses it: timestamp and value are required (the value is "
                     f"{size:,} bytes in {members:,} members; the first 1,048,576 bytes of its JSON are kept here)")
    assert verify(settings, report["run_id"])["verdict"] == "clean"


def test_dead_letters_of_every_type_keep_at_most_a_mib_and_say_the_true_size(settings, r, pg):
    n = 100_000  # each type's JSON over a MiB
    r.hset("threadr:user:user_hash", mapping={f"field_{i:06d}": f"value_{i:06d}" for i in range(n)})
    r.sadd("threadr:user:user_set", *(f"member_{i:06d}" for i in range(n)))
    r.zadd("threadr:user:user_zset", {f"member_{i:06d}": i for i in range(n)})
    r.rpush("threadr:user:user_list", *(f"item_{i:06d}" for i in range(n)))
    r.set("threadr:user:user_string", b'{"email": "' + b"x" * (3 * MIB))
    r.hset("threadr:user:user_small", mapping={"a": "1"})
    report = migrate(settings, priorities=("high",), max_dead_ratio=1.0)
    assert report["status"] == "completed" and by_pattern(report)["user"]["dead"] == 6
    with pg.cursor() as cur:
        cur.execute("SELECT key_text, redis_type, raw_value, error FROM migration_dead_letters ORDER BY key_text")
        letters = {key: (rtype, bytes(raw), error) for key, rtype, raw, error in cur.fetchall()}
    sizes = {"hash": (n * 24, "{"), "set": (n * 13, "["), "zset": (n * 21, "["), "list": (n * 11, "[")}
    for rtype, (size, opening) in sizes.items():
        found, raw, error = letters[f"threadr:user:user_{rtype}"]
        assert found == rtype and len(raw) == MIB and raw.decode().startswith(opening)
        assert error == (f"wrong Redis type: expected string, found {rtype} (the value is {size:,} bytes in {n:,} "
                         "members; the first 1,048,576 bytes of its JSON are kept here)")
    _, raw, error = letters["threadr:user:user_string"]
    assert len(raw) == MIB and error.endswith(f"(the value is {3 * MIB + 11:,} bytes; its first 1,048,576 are kept here)")
    assert letters["threadr:user:user_small"][1:] == (b'{"a":"1"}', "wrong Redis type: expected string, found hash")


def test_a_large_index_set_is_checked_a_part_at_a_time_and_its_dangling_members_counted(settings, r, pg, parts):
    listed, gone = 3_000, 2_000
    for i in range(listed):
        email = f"reader{i}@example.com"
        r.set(f"threadr:email:{email}", json.dumps({"email": email, "subscribed_at": "2026-11-01T00:00:00"}))
    r.sadd("threadr:emails:list", *(f"reader{i}@example.com" for i in range(listed + gone)))
    report = migrate(settings, priorities=("high",))
    assert report["status"] == "completed" and report["balanced"]
    index = by_pattern(report)["newsletter_list"]
    assert (index["scanned"], index["skipped"], index["references"], index["dangling"]) == (1, 1, listed + gone, gone)
    assert by_pattern(report)["newsletter"]["dangling"] == 0  # every record is in the index
    assert parts[b"threadr:emails:list"] > 1


def test_a_large_collection_deleted_mid_way_counts_expired_and_keeps_nothing_it_wrote(settings, r, pg, monkeypatch):
    series = write_large_timeseries(r, 20_000)
    real = migrator.core.batch.read_parts

    def deleted_after_three_parts(client, first):
        for n, part in enumerate(real(client, first), 1):
            yield part
            if n == 3:
                r.delete(series)

    monkeypatch.setattr(migrator.core.batch, "read_parts", deleted_after_three_parts)
    report = migrate(settings, priorities=("medium",))
    assert report["status"] == "completed" and report["balanced"]
    found = by_pattern(report)["analytics_timeseries"]
    assert (found["scanned"], found["expired"], found["migrated"], found["dead"]) == (1, 1, 0, 0)
    with pg.cursor() as cur:
        cur.execute("SELECT (SELECT count(*) FROM analytics_timeseries), (SELECT count(*) FROM migration_dead_letters)")
        assert cur.fetchone() == (0, 0)


def test_read_parts_gives_every_member_of_each_type_once_a_part_at_a_time(r):
    n = 2 * CHUNK_READ_MEMBERS + 500
    r.hset("h", mapping={f"f{i}": str(i) for i in range(n)})
    r.sadd("s", *(f"m{i}" for i in range(n)))
    r.rpush("l", *(f"i{i}" for i in range(n)))
    # a run of equal scores across a part's end: the sorted set's parts go on by (score, how many of it were read)
    r.zadd("z", {f"m{i:05d}": (i if i < 900 else 900 if i < 2400 else i) for i in range(n)})
    r.zadd("small", {"a": 1})
    reads = read_keys(r, [(b"h", "hash"), (b"s", "set"), (b"l", "list"), (b"z", "zset"), (b"small", "zset")])
    assert [read.truncated for read in reads] == [True, True, True, True, False]
    got = {read.key: [part.raw for part in read_parts(r, read)] for read in reads}
    assert len(got[b"h"]) > 1 and {k: v for part in got[b"h"] for k, v in part.items()} == r.hgetall("h")
    assert len(got[b"s"]) > 1 and {m for part in got[b"s"] for m in part} == r.smembers("s")
    assert [len(part) for part in got[b"l"]] == [1000, 1000, 500]
    assert [m for part in got[b"l"] for m in part] == r.lrange("l", 0, -1)
    assert [len(part) for part in got[b"z"]] == [1000, 1000, 500]
    assert [m for part in got[b"z"] for m in part] == r.zrange("z", 0, -1, withscores=True)  # Redis's own order
    assert got[b"small"] == [[(b"a", 1.0)]]


def test_a_collection_pattern_says_whether_it_is_member_wise_and_one_that_is_not_is_read_whole(settings, r, pg, parts):
    series_pattern = next(p for p in THREADR.patterns if p.name == "analytics_timeseries")
    with pytest.raises(ValueError, match="a zset pattern that is read declares member_wise"):
        replace(series_pattern, member_wise=None)
    whole = replace(THREADR, patterns=tuple(replace(p, member_wise=False) if p is series_pattern else p
                                            for p in THREADR.patterns))
    series = write_large_timeseries(r, 5_000)
    opts = RunOptions(priorities=("medium",))
    run_id = plan_run(r, pg, whole, opts, settings.redis_url)
    execute_local(r, settings.postgres, whole, run_id, opts)
    report = build_report(pg, whole, run_id)
    assert report["status"] == "completed" and by_pattern(report)["analytics_timeseries"]["rows"] == 5_000
    assert series.encode() not in parts  # read whole, by the run and by its verification
