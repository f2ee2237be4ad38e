"""Progress by keys as a person sees it: keys walked of the planned estimate, keys/s, elapsed and ETA,
moving within a running batch; redrawn in place on a terminal with the log lines in the run's log
file, one line per interval elsewhere; and the status, batches and report tables drawn by rich. The same
for a verification (keys walked of the estimate, moving within a range) and a follow session (its
lag and rates)."""
from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import signal
import threading

from migrator.apps.threadr import THREADR
from migrator.apps.threadr.demo import seed_demo
from migrator.core.mapping import Priority
from migrator.core.options import RunOptions
from migrator.execution.runner import execute_local, plan_run, verify_local
from migrator.views import progress

import test_follow
from helpers import migrator

# A Redis server of this module's own, as follow's tests have (notify-keyspace-events is server-wide)
settings, notify = test_follow.settings, test_follow.notify

LINE = re.compile(r"^run (?P<run>[0-9a-f-]{36}) (?P<status>\w+): run (?P<share>\d+)% (?P<walked>[\d,]+)/(?P<estimate>[\d,?]+) keys"
                  r" \((?P<elapsed>\d+:\d\d:\d\d) / (?P<eta>[\d:-]+)\) (?P<rate>[\d,.]+|-)/s; critical ")


def test_a_throttled_batch_shows_keys_moving_before_its_range_ends_one_line_per_interval(settings, r, pg):
    """One range, slowed by --max-keys-per-sec so it lasts a few heartbeats: the ledger shows its keys
    walked growing while it still runs, and the lines (not a terminal) say so with keys/s and an ETA."""
    seed_demo(r, 20)
    r.mset({f"legacy:{n}": "1" for n in range(3000)})  # unmapped: walked and skipped
    planned = r.dbsize()
    opts = RunOptions(priorities=("critical",), ranges=1, max_keys_per_sec=1000)
    client, conn = settings.redis(), settings.postgres()
    run_id = plan_run(client, conn, THREADR, opts, settings.redis_url)
    seen: list[dict] = []
    shown = io.StringIO()
    watcher = settings.postgres()
    done = threading.Event()

    def look() -> None:
        while not done.is_set():
            seen.append(progress.measure(watcher, run_id))
            done.wait(0.2)

    looking = threading.Thread(target=look)
    looking.start()
    try:
        with progress.watching(settings.postgres, progress.run_drawing(run_id), shown, every=0.5, terminal=False):
            execute_local(client, settings.postgres, THREADR, run_id, opts)
    finally:
        done.set()
        looking.join()
        watcher.close()
        conn.close()
        client.close()
    # within the range: some keys walked, not all, the batch still running
    mid = [m for m in seen if m["status"] == "running" and m["priorities"][0]["ranges_done"] == 0
           and 0 < m["priorities"][0]["walked"] < planned]
    assert mid, [(m["status"], m["priorities"]) for m in seen]
    assert mid[-1]["run"]["keys_per_s"] and mid[-1]["run"]["eta_s"] and mid[-1]["priorities"][0]["estimate"] == planned
    lines = shown.getvalue().splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert len(lines) >= 2 and all(parsed), lines
    assert all(m["run"] == run_id and m["estimate"] == f"{planned:,}" for m in parsed)
    assert any(0 < int(m["walked"].replace(",", "")) < planned and m["rate"] != "-" and m["eta"] != "-:--:--"
               for m in parsed), lines
    last = parsed[-1]
    assert last["status"] == "completed" and last["share"] == "100" and last["eta"] == "0:00:00"
    assert "estimate: DBSIZE at plan" in lines[-1]


def on_a_terminal(settings, tmp_path, *args: str) -> str:
    """`migrator ARGS` on a pseudo-terminal, as a person sees it (exit 0): all it wrote there."""
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "MIGRATOR_LOG_JSON"}
    child = subprocess.Popen([sys.executable, "-m", "migrator.cli.main", *args, "--output-dir", str(tmp_path),
                              "--redis-url", settings.redis_url, "--database-url", settings.database_url],
                             stdin=follower, stdout=follower, stderr=follower, env={**env, "COLUMNS": "160"})
    os.close(follower)
    screen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        try:
            chunk = os.read(leader, 65536) if ready else b""
        except OSError:  # the child closed the terminal
            chunk = b""
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    assert child.wait(60) == 0
    return screen.decode()


def test_on_a_terminal_the_view_is_redrawn_in_place_and_log_lines_go_to_the_log_file(settings, r, pg, tmp_path):
    seed_demo(r, 30)
    text = on_a_terminal(settings, tmp_path, "run", "--local", "--priority", "critical")
    run_id = re.search(r"run ([0-9a-f-]{36})", text)[1]
    assert "\x1b[2K" in text or "\x1b[1A" in text  # erased and redrawn, not scrolled
    assert "keys walked / estimate" in text and "keys/s" in text and "ETA" in text and "critical" in text
    assert "estimate: DBSIZE at plan" in text
    # the batches' log lines are in the run's log file, not on the terminal
    logged = (tmp_path / f"migration_{run_id}.log").read_text()
    assert '"event": "batch_done"' in logged and "batch_done" not in text and "batch_started" not in text
    assert "TOTAL" in text  # the report follows


def test_on_a_terminal_verify_draws_its_progress_and_its_log_lines_go_to_the_verification_log_file(settings, r, pg,
                                                                                                   tmp_path):
    seed_demo(r, 30)
    opts = RunOptions(priorities=("critical",), ranges=2)
    client = settings.redis()
    try:
        run_id = plan_run(client, pg, THREADR, opts, settings.redis_url)
        execute_local(client, settings.postgres, THREADR, run_id, opts)
    finally:
        client.close()
    text = on_a_terminal(settings, tmp_path, "verify", run_id, "--local")
    path = tmp_path / f"verification_{run_id}.log"
    assert f"migrator: logging to {path}" in text.replace("\r\n", "\n")
    logged = path.read_text()
    assert '"event": "verify_range_done"' in logged and '"event": "verification_done"' in logged
    assert "verify_range_done" not in text and "verification_done" not in text and "verification_planned" not in text
    assert "clean" in text.lower()  # the verification's result follows

def test_status_batches_and_report_tables_are_drawn_by_rich_with_every_figure(settings, r, pg, tmp_path):
    seed_demo(r, 20)
    done = migrator("run", "--local", "--priority", "critical", "--output-dir", str(tmp_path), "--redis-url",
                    settings.redis_url, "--database-url", settings.database_url, env={"MIGRATOR_PROGRESS_SECONDS": "60"})
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.split()[1]
    # not a terminal: the progress is a line at the end, beside the JSON log lines
    lines = [line for line in done.stderr.splitlines() if line.startswith("run ")]
    assert len(lines) == 1 and LINE.match(lines[0])["status"] == "completed", done.stderr
    report = done.stdout
    head = next(line for line in report.splitlines() if line.lstrip().startswith("pattern"))
    assert head.split() == ["pattern", "priority", "table", "read", "migrated", "rows", "skipped", "dead", "expired",
                            "dangling", "seconds", "keys/s", "ok"]
    total = next(line for line in report.splitlines() if line.startswith("TOTAL")).split()
    figures = json.loads(migrator("report", run_id, "--json", "--output-dir", str(tmp_path), "--database-url",
                                  settings.database_url).stdout)["totals"]
    assert total == ["TOTAL", *(f"{figures[k]:,}" for k in ("scanned", "migrated", "rows", "skipped", "dead", "expired",
                                                           "dangling")), *total[8:10], "yes"]
    status = migrator("status", run_id, "--database-url", settings.database_url).stdout
    row = next(line for line in status.splitlines() if line.startswith("critical")).split()
    assert row[:2] == ["critical", "1/1"] and "validated" in row
    batches = migrator("batches", run_id, "--database-url", settings.database_url).stdout.splitlines()
    assert batches[0].split()[:3] == ["id", "priority", "node"] and batches[2].split()[1:5] == ["critical", "-", "1/1", "done"]


VERIFY_LINE = re.compile(r"^verification (?P<id>\d+) of run (?P<run>[0-9a-f-]{36}) (?P<status>\w+): verify critical "
                         r"(?P<share>\d+)% (?P<walked>[\d,]+)/(?P<estimate>[\d,?]+) keys \((?P<elapsed>\d+:\d\d:\d\d) / "
                         r"(?P<eta>[\d:-]+)\) (?P<rate>[\d,.]+|-)/s, ranges (?P<done>\d+)/(?P<ranges>\d+) ")


def test_a_throttled_verification_shows_keys_moving_within_its_range_one_line_per_interval(settings, r, pg):
    """A run throttled by --max-keys-per-sec, verified again: its one range lasts a few heartbeats,
    and the ledger shows its keys walked growing before the range ends; the lines say so."""
    seed_demo(r, 20)
    r.mset({f"legacy:{n}": "1" for n in range(3000)})
    planned = r.dbsize()
    opts = RunOptions(priorities=("critical",), ranges=1, max_keys_per_sec=1000)
    client, conn = settings.redis(), settings.postgres()
    run_id = plan_run(client, conn, THREADR, opts, settings.redis_url)
    execute_local(client, settings.postgres, THREADR, run_id, opts)
    drawing = progress.verify_drawing(conn, run_id)  # after the run's own verification
    seen: list[dict] = []
    shown = io.StringIO()
    watcher = settings.postgres()
    done = threading.Event()
    after = None

    def look() -> None:
        while not done.is_set():
            seen.append(progress.measure_verification(watcher, run_id, after))
            done.wait(0.2)

    with conn, conn.cursor() as cur:
        cur.execute("SELECT max(id) FROM migration_verifications WHERE run_id = %s", (run_id,))
        after = cur.fetchone()[0]
    looking = threading.Thread(target=look)
    looking.start()
    try:
        with progress.watching(settings.postgres, drawing, shown, every=0.5, terminal=False):
            result = verify_local(client, settings.postgres, THREADR, run_id, [Priority.parse("critical")])
    finally:
        done.set()
        looking.join()
        watcher.close()
        conn.close()
        client.close()
    assert result["verdict"] == "clean", result
    assert after is not None
    mid = [m for m in seen if m is not None and m["status"] == "running" and m["verify"]["ranges_done"] == 0
           and 0 < m["verify"]["walked"] < planned]
    assert mid, seen
    assert mid[-1]["verify"]["keys_per_s"] and mid[-1]["verify"]["eta_s"] and mid[-1]["verify"]["estimate"] == planned
    lines = shown.getvalue().splitlines()
    parsed = [VERIFY_LINE.match(line) for line in lines]
    assert len(lines) >= 2 and all(parsed), lines
    assert all(m["run"] == run_id and int(m["id"]) > after and m["estimate"] == f"{planned:,}" for m in parsed)
    assert any(0 < int(m["walked"].replace(",", "")) < planned and m["rate"] != "-" and m["eta"] != "-:--:--"
               for m in parsed), lines
    last = parsed[-1]
    assert last["status"] == "done" and last["share"] == "100" and last["eta"] == "0:00:00" and last["done"] == "1"
    assert int(last["walked"].replace(",", "")) == planned


FOLLOW_LINE = re.compile(r"^follow session (?P<run>[0-9a-f-]{36}) (?P<status>\w+): lag (?P<lag>[\d.]+) s, "
                         r"(?P<pending>[\d,]+) pending, (?P<events>[\d,.]+) events/s, (?P<applied>[\d,.]+) applied/s, "
                         r"(?P<keys>[\d,]+) keys applied, reconnects (?P<reconnects>\d+), reconciliations (?P<rec>\d+) ")


def test_follow_not_on_a_terminal_writes_its_figures_one_line_per_interval(settings, r, pg, notify, tmp_path,
                                                                           monkeypatch):
    seed_demo(r, 5)
    monkeypatch.setenv("MIGRATOR_PROGRESS_SECONDS", "1")
    following = test_follow.Following(settings, tmp_path, "--local")
    try:
        for n in range(20):
            r.set(f"legacy:{n}", "1")  # unmapped: events, not applied
        users = sorted(r.scan_iter("user:*"))[:3]
        for key in users:
            test_follow.changed_user(r, key, name="moved")
        test_follow.wait_for(lambda: [m for m in map(FOLLOW_LINE.match, following.output().splitlines())
                                      if m and int(m["keys"].replace(",", "")) >= len(users)], 60)
    finally:
        assert following.stop(signal.SIGTERM) == 0
    lines = [m for m in map(FOLLOW_LINE.match, (tmp_path / "follow.out").read_text().splitlines()) if m]
    assert len(lines) >= 2 and all(m["run"] == following.run_id for m in lines)
    assert int(lines[-1]["rec"]) >= 1 and lines[-1]["status"] in ("running", "completed")
