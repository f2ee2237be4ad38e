"""The benchmark as one command, on a small keyspace: every mode measured, ratios, CPU and bars
printed (its figures are not asserted: timings belong to the bench, not to tests)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from amqp.exceptions import NotFound
from celery import Celery

from conftest import ADMIN_URL
from helpers import migrate
from migrator.apps.threadr import THREADR
from migrator.apps.threadr.demo import seed_demo
from migrator.core.schema import written_tables

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import costs  # noqa: E402


def test_the_bench_measures_every_mode_and_prints_the_bars():
    done = subprocess.run(  # (on a redis-server of its own: no --redis-url)
        [sys.executable, "scripts/bench.py", "--keys", "4000", "--workers", "1,2", "--no-hostile", "--rounds", "2",
         "--seed-sample", "1000", "--latency-seconds", "3", "--wide", "20000", "--follow-seconds", "1"],
        cwd=ROOT, env={**os.environ, "MIGRATOR_BENCH_ADMIN_URL": ADMIN_URL,
                       "MIGRATOR_QUEUE_PREFIX": f"benchtest{os.getpid()}."},  # it deletes its queues
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    modes = ("floor", "seed (sample, extrapolated)", "local", "verify (of local's run)", "1 worker", "2 workers")
    rows = {m.group(1): m.group(0) for m in re.finditer(
        r"^\| (" + "|".join(map(re.escape, modes)) + r") \|.*$", out, re.M)}
    assert set(rows) == set(modes), out
    for mode, row in rows.items():
        cells = [c.strip() for c in row.strip("|").split("|")]
        keys, rate, seconds = int(cells[1].replace(",", "")), int(cells[3].replace(",", "")), float(cells[6])
        assert keys > 0 and seconds > 0 and rate > 0, row
        # CPU per key by process, the headline: four parts and their sum
        parts = re.fullmatch(r"([\d.]+) \+ ([\d.]+) \+ ([\d.]+) \+ ([\d.]+) = ([\d.]+)", cells[2])
        assert parts, row
        assert abs(sum(map(float, parts.groups()[:4])) - float(parts.group(5))) <= 0.5, row
        assert re.fullmatch(r"\d+\.\d{3}, \d+\.\d\d, \d+\.\d\d", cells[-1]), row  # Redis calls per key
    assert "coord." in rows["1 worker"]  # the coordinator and the worker apart
    # where PostgreSQL's time goes: the same rows with and without each part, and the migrator beside them
    for variant in ("same-work floor", "+ journal trigger", "+ seal trigger", "plain INSERT, no upsert", "without secondary indexes",
                    "unlogged tables (no WAL)", "the migrator: local", "the migrator: 2 workers"):
        assert re.search(rf"^\| {re.escape(variant)}.* \| [\d.]+ \| \d+\.\d\d \|$", out, re.M), (variant, out)
    # every mode but verify ran --rounds times, as each same-work variant did: its row is its run with the
    # least CPU in all, and each run's total is printed
    ran = re.search(r"^Each mode ran 2 times \(verify and the hostile run once\): .* CPU µs per key in all of each run: (.*)\.$",
                    out, re.M)
    assert ran, out
    totals = {m: [float(x) for x in runs.split(", ")] for m, runs in re.findall(r"([a-z0-9 ]+?) ([\d., ]+)(?:; |$)", ran.group(1))}
    assert list(totals) == ["floor", "seed", "local", "1 worker", "2 workers"] and all(len(t) == 2 for t in totals.values()), ran
    for mode in ("floor", "local", "1 worker", "2 workers"):
        assert float(rows[mode].split("|")[3].rsplit("=", 1)[1]) == min(totals[mode]), (mode, totals, rows[mode])
    # PostgreSQL's bar takes the least of a mode's runs, as the same-work floor is the least of its rounds
    for mode in ("local", "2 workers"):
        least = re.search(rf"^\| the migrator: {mode} \(the least of 2 runs: ([\d.]+), ([\d.]+)\) \| ([\d.]+) \|", out, re.M)
        assert least and float(least.group(3)) == min(map(float, least.groups()[:2])), out
        assert re.search(rf"^- {mode}: PostgreSQL CPU per key .*: " + re.escape(least.group(3)) + r" \(the least of 2 runs",
                         out, re.M), out
    total = re.search(r"^- 2 workers: total CPU per key .*: (yes|NO) \(([\d.]+) \(the least of 2 runs: .*\) against 40/23 of "
                      r"the floor's ([\d.]+) \(the least of 2 runs", out, re.M)
    assert total and float(total.group(2)) == min(totals["2 workers"]) and float(total.group(3)) == min(totals["floor"]), out
    for mode in ("local", "2 workers"):  # the source's levers: its SCAN passes, and one pass instead
        assert re.search(rf"^Redis, {mode}: \d+\.\d SCAN passes' worth of calls .* one pass instead would leave about "
                         r"[\d.]+ of its [\d.]+ µs per key \([\d.]+x the floor's\)\. Calls per key: [A-Z]+ [\d.]+", out, re.M), out
    assert re.search(r"^`follow --local` while [\d,]+ distinct string keys were rewritten at 5,000/s .* lag at worst "
                     r"[\d.]+ s", out, re.M), out
    bars = re.findall(r"^- (.*): (yes|NO) \(", out, re.M)
    assert [name for name, _ in bars] == [
        "local: Redis CPU per key <= 1.3x the floor's", "2 workers: Redis CPU per key <= 1.3x the floor's",
        "1 worker: Redis CPU per key <= 1.3x the floor's",
        "local: PostgreSQL CPU per key <= 1.25x the same-work floor's",
        "2 workers: PostgreSQL CPU per key <= 1.25x the same-work floor's",
        "1 worker: PostgreSQL CPU per key <= 1.25x the same-work floor's",
        "2 workers >= 1.0x the floor's keys/s",
        "2 workers: total CPU per key <= 40 µs in a quiet machine's terms", "every mode >= 10x seed",
        "verify >= 0.5x its run's keys/s", "follow >= 5,000 changes/s with lag under 1 s"], out
    # the capacity model beside the bench's own workers, and projected past one machine
    for workers in (1, 2):
        assert re.search(rf"^\| {workers} \| \d+ \| [\d,]+ \| [\d,]+ \((redis|workers|postgresql|machine)\) \| \d+\.\d\d \| \d+\.\d\d \|$",
                         out, re.M), out
    assert len(re.findall(r"^\| (1|6|30) \| \d+ \| [\d,]+ \(\w+\) \|( [\d.]+ (min|h) \|){3}$", out, re.M)) == 3, out
    large = re.search(r"One valid thread alone.*: peak RSS ([\d.]+) MB at 1 MiB, ([\d.]+) MB at 64 MiB", out)
    assert large and float(large.group(2)) > float(large.group(1)) > 0, out  # measured, not asserted against a bar
    wide = re.search(r"One valid time series alone.*: peak RSS ([\d.]+) MB at 1,000 members, ([\d.]+) MB at 20,000 "
                     r"members: (\d+\.\d\d)x", out)
    assert wide and float(wide.group(1)) > 0 and float(wide.group(2)) > 0, out
    assert re.search(r"^\| `run --local --max-keys-per-sec \d+` \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", out, re.M), out
    with Celery(broker=os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")) as app, \
            app.connection_for_write() as conn:
        with pytest.raises(NotFound):  # it left no queue of its own behind on the broker
            conn.default_channel.queue_declare(f"benchtest{os.getpid()}.low", passive=True)


def test_the_bench_measures_follow_alone():
    done = subprocess.run(
        [sys.executable, "scripts/bench.py", "--keys", "4000", "--only", "follow", "--follow-seconds", "1"],
        cwd=ROOT, env={**os.environ, "MIGRATOR_BENCH_ADMIN_URL": ADMIN_URL,
                       "MIGRATOR_QUEUE_PREFIX": f"benchtest{os.getpid()}."},
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line]
    assert lines[0].startswith("Machine: ") and "load average" in lines[0], done.stdout
    assert re.fullmatch(r"`follow --local` while [\d,]+ distinct string keys were rewritten at 5,000/s .* lag at worst "
                        r"[\d.]+ s.* CPU µs per change: [\d.]+ \+ [\d.]+ \+ [\d.]+ \+ [\d.]+ = [\d.]+, .*", lines[1]), lines
    assert re.fullmatch(r"follow >= 5,000 changes/s with lag under 1 s: (yes|NO) \(.*\)", lines[2]), lines
    assert len(lines) == 3 and "| mode |" not in done.stdout  # no other mode measured


def test_against_measures_this_checkout_beside_an_earlier_commit_and_leaves_no_worktree():
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    done = subprocess.run(
        [sys.executable, "scripts/against.py", "--against", "HEAD", "--keys", "2000", "--rounds", "1"],
        cwd=ROOT, env={**os.environ, "MIGRATOR_BENCH_ADMIN_URL": ADMIN_URL}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = dict(re.findall(r"^(this checkout|HEAD|ratio) +(\d.*)$", done.stdout, re.M))
    assert set(rows) == {"this checkout", "HEAD", "ratio"}, done.stdout
    for name in ("this checkout", "HEAD"):  # own, PostgreSQL, Redis: each counted (figures not asserted)
        assert [float(x) > 0 for x in rows[name].split()] == [True] * 3, done.stdout
    assert len(rows["ratio"].split()) == 3
    assert subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout == worktrees


def test_the_same_work_floor_meets_each_trigger_as_a_run_s_write_does(settings, r, pg):
    """Its trigger variants cost what the triggers cost a run: each is enabled alone, the seal trigger
    leaves the rows of a write that vouches for them their seals (in a session not set as a run's is, it
    unseals every row), and the journal trigger keeps the prior image of each row the write changes."""
    seed_demo(r, 5)
    assert migrate(settings)["status"] == "completed"
    tables = written_tables(THREADR)
    rows = costs.snapshot(pg, tables)
    with pg, pg.cursor() as cur:
        cur.execute(costs.RUN_SESSION)
    truncate = "TRUNCATE " + ", ".join([*tables, "migration_journal"])

    def written(variant: dict) -> tuple[int, int, int, int]:
        """(rows, rows sealed, journal entries, triggers enabled) once the rows are written twice in `variant`."""
        with pg, pg.cursor() as cur:
            cur.execute(truncate)
            dropped = costs.prepare(cur, tables, variant)
        try:
            for _ in range(2):  # the second write updates every row: what the journal keeps
                costs.write_plainly(pg, tables, rows)
            with pg, pg.cursor() as cur:
                cur.execute(" UNION ALL ".join(f"SELECT count(*), count(row_seal) FROM {t}" for t in tables))
                counts = cur.fetchall()
                cur.execute("SELECT count(*) FROM migration_journal")
                journaled = cur.fetchone()[0]
                cur.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = ANY(%s::regclass[]) AND NOT tgisinternal"
                            " AND tgenabled <> 'D'", (tables,))
                enabled = cur.fetchone()[0]
        finally:
            with pg, pg.cursor() as cur:
                costs.restore(cur, tables, variant, dropped)
        return sum(n for n, _ in counts), sum(s for _, s in counts), journaled, enabled

    plain = written({})
    total, sealed, journaled, enabled = plain
    assert total > 50 and 0 < sealed <= total and journaled == 0 and enabled == 0, plain
    assert written(costs.VARIANTS["+ seal trigger"]) == (total, sealed, 0, len(tables))
    assert written(costs.VARIANTS["+ journal trigger"]) == (total, sealed, total, len(tables))


def test_a_worker_s_cpu_counts_its_pool_processes():
    """A worker's batches run in its pool processes, not in the process the bench started: the bench
    counts the CPU of that process's whole group, children alive included."""
    import bench

    # a process that starts a child which spends half a second of CPU, then waits, alive, to be ended
    child = ("import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"
             "print('spent', flush=True)\nsys.stdin.read()")
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert parent.stdout.readline() == "spent\n"
        spent = bench._groups_cpu([parent.pid])
    finally:
        parent.communicate("", timeout=30)
    assert spent >= 0.45, spent
