"""Figures an operator can trust: exact row counts, one keys/s and elapsed time for `status` and
`report`, elapsed time without the wait before a requeue, dead letters grouped by reason."""
from __future__ import annotations

import json
import re
from pathlib import Path

from psycopg2 import sql

from migrator.views import figures as figures_mod
from migrator.core import ledger
from migrator.apps.threadr.demo import seed_demo
from migrator.core.options import RunOptions
from migrator.execution.runner import plan_run
from migrator.views.status import run_progress
from migrator.apps.threadr import THREADR

from test_cli import migrator, urls

EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")
IPV4 = re.compile(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b")


def run_local(settings, out_dir: Path, *flags: str) -> dict:
    done = migrator("run", "--local", "--json", "--output-dir", str(out_dir), *flags, *urls(settings))
    assert done.stdout, done.stderr
    return json.loads(done.stdout.split("\n", 1)[1])


def as_json(*args: str) -> dict:
    done = migrator(*args)
    assert done.returncode in (0, 1) and done.stdout, done.stderr
    return json.loads(done.stdout)


def exact_counts(pg) -> dict[str, int]:
    out = {}
    with pg.cursor() as cur:
        for table in THREADR.table_names():
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
            out[table] = cur.fetchone()[0]
    pg.rollback()
    return out


def active_seconds_in_sql(pg, run_id: str) -> dict[str | None, float]:
    """Per priority (None: the whole run), the union of the batches' spans, by PostgreSQL's own range_agg."""
    with pg.cursor() as cur:
        cur.execute(
            "SELECT priority, sum(upper(span) - lower(span)) FROM ("
            " SELECT priority, unnest(range_agg(tstzrange(started_at, finished_at))) AS span FROM migration_batches"
            " WHERE run_id = %s AND started_at IS NOT NULL GROUP BY GROUPING SETS ((priority), ())) spans GROUP BY priority",
            (run_id,))
        out = {p: d.total_seconds() for p, d in cur.fetchall()}
    pg.rollback()
    return out


def test_report_counts_rows_exactly_right_after_the_writes(settings, r, pg, tmp_path):
    seed_demo(r, 80)
    run_id = run_local(settings, tmp_path)["run_id"]
    # A session that stays open, as a Celery worker's does, sends its statistics at most once a
    # second (else after 10 s idle): the second of two quick commits is not yet in
    # pg_stat_user_tables when the report is asked for, straight after.
    for table in ("usage_events", "sessions"):
        with pg.cursor() as cur:
            cur.execute(sql.SQL("DELETE FROM {t} WHERE id IN (SELECT id FROM {t} ORDER BY id LIMIT 5)")
                        .format(t=sql.Identifier(table)))
        pg.commit()
    report = as_json("report", run_id, "--json", "--output-dir", str(tmp_path), "--database-url", settings.database_url)
    exact = exact_counts(pg)
    tables = report["monitoring"]["tables"]
    assert {t["table"]: t["rows"] for t in tables} == exact
    assert exact["usage_events"] > 0 and exact["sessions"] > 0
    # PostgreSQL's cumulative statistics are kept apart, named for what they are
    assert all(set(t) == {"table", "rows", "bytes", "stats_may_lag"} for t in tables)
    text = migrator("report", run_id, "--output-dir", str(tmp_path), "--database-url", settings.database_url).stdout
    assert f"usage_events {exact['usage_events']:,} rows" in text and f"sessions {exact['sessions']:,} rows" in text


def test_status_and_report_show_the_same_figures(settings, r, pg, tmp_path):
    seed_demo(r, 150, malformed=6)
    run = run_local(settings, tmp_path, "--ranges", "4", "--jobs", "2")  # batches side by side
    run_id = run["run_id"]
    status = as_json("status", run_id, "--json", "--database-url", settings.database_url)
    report = as_json("report", run_id, "--json", "--output-dir", str(tmp_path), "--database-url", settings.database_url)
    written = json.loads((tmp_path / f"migration_report_{run_id}.json").read_text())
    figures = status["figures"]
    assert figures == report["figures"] == written["figures"] == run["figures"]
    # elapsed: the time during which a batch was running, per priority and overall
    union = active_seconds_in_sql(pg, run_id)
    assert set(figures["priorities"]) == {"critical", "high", "medium", "low"}
    for label, f in [*figures["priorities"].items(), (None, figures)]:
        assert abs(f["elapsed_s"] - union[label]) < 0.001, label
        assert f["keys_per_s"] == round(f["keys_scanned"] / union[label], 1), label
    with pg.cursor() as cur:
        cur.execute("SELECT priority, sum(keys_scanned), sum(rows_written) FROM migration_batches WHERE run_id = %s"
                    " AND status = 'done' GROUP BY priority", (run_id,))
        per_priority = {p: (int(k), int(w)) for p, k, w in cur.fetchall()}
        cur.execute("SELECT extract(epoch FROM finished_at - started_at) FROM migration_runs WHERE id = %s", (run_id,))
        wall = float(cur.fetchone()[0])
    pg.rollback()
    assert {p: (f["keys_scanned"], f["rows_written"]) for p, f in figures["priorities"].items()} == per_priority
    assert figures["rows_written"] == sum(w for _, w in per_priority.values()) > 0
    assert figures["keys_scanned"] == report["totals"]["scanned"] == r.dbsize()
    assert abs(figures["wall_clock_s"] - wall) < 0.001 and figures["wall_clock_s"] >= figures["elapsed_s"]
    # a pattern's seconds are its share of its priority's elapsed time, at its priority's rate
    for label, f in figures["priorities"].items():
        mine = [p for p in report["patterns"] if p["priority"] == label]
        assert abs(sum(p["seconds"] for p in mine) - f["elapsed_s"]) < 0.001 * len(mine)
        assert {p["keys_per_s"] for p in mine if p["seconds"]} == {f["keys_per_s"]}
    # the text of both commands prints the same lines
    status_text = migrator("status", run_id, "--database-url", settings.database_url).stdout
    report_text = migrator("report", run_id, "--output-dir", str(tmp_path), "--database-url", settings.database_url).stdout
    for line in figures_mod.render(figures):
        assert line in status_text.splitlines() and line in report_text.splitlines(), line


def test_elapsed_time_leaves_out_the_wait_before_a_requeue(settings, r, pg, tmp_path):
    seed_demo(r, 60)
    victim = sorted(r.scan_iter("threadr:user:user_*"))[0].decode()
    # One high batch fails (a stand-in for a fault that needs a person); the others finish.
    with pg.cursor() as cur:
        cur.execute("CREATE FUNCTION refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                    " IF NEW.source_key = %s THEN RAISE EXCEPTION 'disk full'; END IF; RETURN NEW; END $$", (victim,))
        cur.execute("CREATE TRIGGER refuse_one BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION refuse_one()")
    pg.commit()
    try:
        failed = run_local(settings, tmp_path, "--ranges", "4", "--jobs", "1", "--no-rollback", "--continue-on-error")
    finally:
        with pg.cursor() as cur:
            cur.execute("DROP TRIGGER refuse_one ON users")
            cur.execute("DROP FUNCTION refuse_one()")
        pg.commit()
    run_id = failed["run_id"]
    assert failed["status"] == "failed" and failed["batches"]["failed"] == 1
    # An hour passes before someone requeues it: the first attempt's stamps move back an hour.
    with pg.cursor() as cur:
        cur.execute("UPDATE migration_batches SET started_at = started_at - interval '1 hour',"
                    " finished_at = finished_at - interval '1 hour' WHERE run_id = %s", (run_id,))
        cur.execute("UPDATE migration_runs SET started_at = started_at - interval '1 hour',"
                    " finished_at = finished_at - interval '1 hour' WHERE id = %s", (run_id,))
        reopened = ledger.reopen_batches(cur, run_id)
    pg.commit()
    assert [p for _, p in reopened] == ["high"]
    done = migrator("resume", run_id, "--local", "--json", "--output-dir", str(tmp_path), *urls(settings))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.split("\n", 1)[1])
    assert report["status"] == "completed"
    figures = report["figures"]
    high = figures["priorities"]["high"]  # three batches an hour ago, one now
    assert figures["wall_clock_s"] >= 3600
    assert figures["elapsed_s"] < 60 and high["elapsed_s"] < 60
    union = active_seconds_in_sql(pg, run_id)
    assert abs(high["elapsed_s"] - union["high"]) < 0.001 and abs(figures["elapsed_s"] - union[None]) < 0.001
    assert high["keys_per_s"] == round(high["keys_scanned"] / union["high"], 1)
    assert sum(p["seconds"] for p in report["patterns"] if p["priority"] == "high") < 60
    status = as_json("status", run_id, "--json", "--database-url", settings.database_url)
    assert status["figures"] == figures


def test_dead_letters_are_grouped_by_reason_without_any_address_in_sight(settings, r, pg, tmp_path):
    seed_demo(r, 40)
    # one systematic fault: 300 counters whose values are not numbers, each its own value
    pipe = r.pipeline()
    for i in range(300):
        value = [f"visitor{i}@example.com", f"198.51.100.{i % 250}", f"{i} visits"][i % 3]
        pipe.set(f"threadr:usage:ip:203.0.113.{i % 250}:daily:2026-11-{1 + i // 250:02d}", value)
    for i in range(12):  # and a few of the wrong type
        pipe.hset(f"threadr:usage:email:typed{i}@example.org:monthly:2026-11", "count", i)
    pipe.execute()
    for i in range(3):  # rows PostgreSQL refuses: its message quotes the whole row, email and address
        r.set(f"threadr:failed_login:boss{i}@example.net:198.51.100.{i}", json.dumps({
            "attempts": -1, "last_attempt": "2026-11-27T17:00:00", "email": f"boss{i}@example.net",
            "client_ip": f"198.51.100.{i}"}))
    run = run_local(settings, tmp_path, "--max-dead-ratio", "1")  # (a systematic fault, let through: see the reasons)
    run_id = run["run_id"]
    counters = next(p for p in run["patterns"] if p["pattern"] == "usage_counter")
    assert counters["dead"] == 312
    assert counters["dead_reasons"] == [{"reason": "value '…' is not an integer as INCR writes one", "count": 300},
                                        {"reason": "wrong Redis type: expected string, found hash", "count": 12}]
    failures = next(p for p in run["patterns"] if p["pattern"] == "failed_login")
    assert failures["dead_reasons"] == [{"reason": 'CheckViolation: new row for relation "login_failures" violates'
                                                   ' check constraint "login_failures_attempts_check"'
                                                   ' (Failing row contains (…))', "count": 3}]
    line = ('usage_counter: 312 dead — 300 × "value \'…\' is not an integer as INCR writes one"; '
            '12 × "wrong Redis type: expected string, found hash"')
    report_text = migrator("report", run_id, "--output-dir", str(tmp_path), "--database-url", settings.database_url).stdout
    status_text = migrator("status", run_id, "--database-url", settings.database_url).stdout
    assert f"  {line}" in report_text.splitlines() and f"    {line}" in status_text.splitlines()
    status = as_json("status", run_id, "--json", "--database-url", settings.database_url)
    dead = {d["pattern"]: (d["dead"], d["dead_reasons"]) for p in status["priorities"] for d in p["dead_letters"]}
    assert dead == {"usage_counter": (312, counters["dead_reasons"]), "failed_login": (3, failures["dead_reasons"]),
                    "thread": (1, dead["thread"][1])}  # (and the demo's thread its model refuses)
    # A reason that names an address outside quotes (a message of PostgreSQL's or of a future
    # transform) is printed masked.
    with pg.cursor() as cur:
        cur.execute("UPDATE migration_dead_letters SET error = 'mailbox typed-owner@example.org refused'"
                    " WHERE run_id = %s AND redis_type = 'hash'", (run_id,))
    pg.commit()
    outputs = [migrator("report", run_id, "--output-dir", str(tmp_path), "--database-url", settings.database_url).stdout,
               migrator("report", run_id, "--json", "--output-dir", str(tmp_path),
                        "--database-url", settings.database_url).stdout,
               (tmp_path / f"migration_report_{run_id}.json").read_text(),
               migrator("status", run_id, "--database-url", settings.database_url).stdout,
               migrator("status", run_id, "--json", "--database-url", settings.database_url).stdout]
    for out in outputs:
        assert '12 × "mailbox t***@e*** refused"' in out or '"reason": "mailbox t***@e*** refused"' in out
        assert not EMAIL.search(out) and not IPV4.search(out) and "$2b$" not in out, out


def test_a_batch_still_running_counts_until_now(settings, r, pg):
    seed_demo(r, 10)
    client = settings.redis()
    run_id = plan_run(client, pg, THREADR, RunOptions(ranges=2), settings.redis_url)
    client.close()
    with pg.cursor() as cur:  # one batch started ten seconds ago and has not finished
        cur.execute("UPDATE migration_batches SET status = 'running', started_at = now() - interval '10 seconds'"
                    " WHERE id = (SELECT min(id) FROM migration_batches WHERE run_id = %s)", (run_id,))
    pg.commit()
    figures = run_progress(pg, run_id)["figures"]
    assert 10 <= figures["elapsed_s"] < 70 and figures["priorities"]["critical"]["elapsed_s"] == figures["elapsed_s"]
    assert figures["keys_scanned"] == 0 and figures["keys_per_s"] == 0.0
