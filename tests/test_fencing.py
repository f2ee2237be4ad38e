"""Operator actions and faults against a run in the middle of its work, on two real workers:
rollback refused while it runs, cancel, a batch redelivered after a rollback, a frozen worker
whose batch is taken over and whose late commit is refused, a failed finalize step, a failed
rollback. Each ends in the reference tables or in a refused command with its way out."""
from __future__ import annotations

import json
import os
import signal
import time

import psycopg2
import pytest

from migrator.execution import finalize
from migrator.apps.threadr.demo import seed_demo
from migrator.core.options import RunOptions
from migrator.views.status import run_progress
from migrator.apps.threadr import THREADR

from helpers import cli, content_fingerprint, fingerprint, migrate, start_on_workers, wait_for_end


def start(settings, pg, **options) -> str:
    client = settings.redis()
    try:
        return start_on_workers(settings, client, pg, THREADR, RunOptions(**options))
    finally:
        client.close()


def until(pg, query: str, params: tuple, what: str, timeout: float = 90) -> tuple:
    """Poll the ledger until `query` returns a row; that row."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with pg.cursor() as cur:
            cur.execute(query, params)
            row = cur.fetchone()
        pg.rollback()
        if row:
            return row
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout} s")


def quiet(pg, run_id: str) -> None:
    """Until no batch of the run is running any more (fenced ones included)."""
    until(pg, "SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM migration_batches WHERE run_id = %s AND status = 'running')",
          (run_id,), "end of the running batches")


def run_rows(pg, run_id: str) -> int:
    with pg.cursor() as cur:
        cur.execute(" UNION ALL ".join(f"SELECT count(*) FROM {t} WHERE migration_run = %(run)s"
                                       for t in THREADR.table_names()), {"run": run_id})
        n = sum(row[0] for row in cur.fetchall())
    pg.rollback()
    return n


def reference(settings, r, pg, users: int) -> dict:
    """Tables an undisturbed in-process run makes of the demo keyspace; then emptied again."""
    seed_demo(r, users)
    done = migrate(settings)
    assert done["status"] == "completed"
    expected = content_fingerprint(pg)
    with pg.cursor() as cur:
        cur.execute("TRUNCATE " + ", ".join(THREADR.table_names()))
    pg.commit()
    return expected


def test_rollback_of_a_running_run_is_refused_and_cancel_then_rollback_leaves_the_tables_as_before(
        settings, r, pg, workers):
    """The trial's data loss: a rollback racing a live run. It is refused with the command to use;
    cancel --rollback stops the run and leaves every table as it was, rows of earlier runs
    restored; a batch delivered again afterwards commits nothing."""
    seed_demo(r, 300)
    assert migrate(settings)["status"] == "completed"
    with pg.cursor() as cur:  # the app's own rows, there before: the run updates some, rollback restores them
        for table in THREADR.table_names():
            cur.execute(f"UPDATE {table} SET migration_run = NULL, source_key = NULL, metadata = '{{}}'")
    pg.commit()
    r.flushdb()
    seed_demo(r, 1500)
    before = fingerprint(pg)
    run_id = start(settings, pg, ranges=8, batch_size=50)
    until(pg, "SELECT 1 FROM migration_batches WHERE run_id = %s AND status = 'done'", (run_id,), "batch done")
    assert run_rows(pg, run_id) > 0  # it has committed batches

    refused = cli(settings, "rollback", run_id)
    assert refused.returncode == 2, refused.stderr
    assert "is still running" in refused.stderr and f"migrator cancel {run_id} --rollback" in refused.stderr
    assert "Traceback" not in refused.stderr

    stopped = cli(settings, "cancel", run_id, "--rollback")
    assert stopped.returncode == 0, stopped.stderr
    assert f"run {run_id} cancelled" in stopped.stdout and f"run {run_id} rolled back" in stopped.stdout
    quiet(pg, run_id)
    time.sleep(2)  # batches still queued or fenced mid-way come and go
    assert run_progress(pg, run_id)["status"] == "rolled_back"
    assert fingerprint(pg) == before and run_rows(pg, run_id) == 0

    # a batch of the run delivered again (a visibility timeout, a duplicate): refused at its start
    from workers.tasks import migrate_batch_task

    with pg.cursor() as cur:
        cur.execute("SELECT id FROM migration_batches WHERE run_id = %s AND status <> 'done' ORDER BY id LIMIT 1",
                    (run_id,))
        (batch_id,) = cur.fetchone()  # (a batch done before the cancel is found done: harmless too)
    pg.rollback()
    from celeryconfig import PRIORITY_QUEUES

    redelivered = migrate_batch_task.apply_async(kwargs={"priority": "critical", "range": "1/8", "batch_id": batch_id,
                                                         "run_id": run_id}, queue=PRIORITY_QUEUES["critical"])
    assert redelivered.get(timeout=60)["status"].startswith("fenced")
    assert fingerprint(pg) == before
    again = cli(settings, "rollback", run_id)
    assert again.returncode == 0 and "rolled back already" in again.stdout


def test_cancel_stops_the_run_and_resume_carries_it_to_the_reference_tables(settings, r, pg, workers):
    expected = reference(settings, r, pg, 1200)
    run_id = start(settings, pg, ranges=8, batch_size=50)
    until(pg, "SELECT 1 FROM migration_batches WHERE run_id = %s AND status = 'running' AND attempts > 0", (run_id,),
          "batch running")
    stopped = cli(settings, "cancel", run_id)
    assert stopped.returncode == 0, stopped.stderr
    assert f"migrator rollback {run_id}" in stopped.stdout and f"migrator resume {run_id}" in stopped.stdout
    quiet(pg, run_id)
    progress = run_progress(pg, run_id)
    assert progress["status"] == "cancelled" and progress["error"] == "cancelled by the operator"
    with pg.cursor() as cur:
        cur.execute("SELECT count(*) FROM migration_batches WHERE run_id = %s AND status <> 'done'", (run_id,))
        assert cur.fetchone()[0] > 0  # it stopped before its end
    pg.rollback()
    assert cli(settings, "cancel", run_id).returncode == 2  # nothing of it runs now: said so

    resumed = cli(settings, "resume", run_id)
    assert resumed.returncode == 0, resumed.stderr
    progress = wait_for_end(pg, run_id)
    assert progress["status"] == "completed", progress
    assert content_fingerprint(pg) == expected


def test_a_frozen_worker_shows_stale_and_its_batch_is_taken_over_with_nothing_of_it_committed(settings, r, pg, workers):
    """A worker that stops answering (here SIGSTOP: its sessions stay open, as a host cut off from
    the network leaves them) keeps its batch `running`: status says stale instead of an ETA,
    `requeue` sends the batch to the other worker, which ends the lost session (its transaction
    rolls back and lets go of its rows) and runs the batch; the frozen one, woken, finds it done.
    The tables are the reference's."""
    expected = reference(settings, r, pg, 1500)
    run_id = start(settings, pg, ranges=2, batch_size=50, priorities=("high",))
    batch_id, worker = until(pg, "SELECT id, worker FROM migration_batches WHERE run_id = %s AND status = 'running'"
                             " AND attempts = 1 AND worker IS NOT NULL ORDER BY id LIMIT 1", (run_id,), "batch running")
    frozen = int(worker.rsplit(":", 1)[1])
    time.sleep(0.3)  # inside the batch: sub-batches written, nothing committed
    os.kill(frozen, signal.SIGSTOP)
    try:
        until(pg, "SELECT 1 FROM migration_batches WHERE id = %s AND heartbeat_at < clock_timestamp() - interval '6 s'",
              (batch_id,), "stale heartbeat", timeout=30)
        status = cli(settings, "status", run_id)
        assert "STALE" in status.stdout and f"batch {batch_id} stale: no heartbeat for" in status.stdout
        assert "eta" not in status.stdout.split("high", 1)[1].splitlines()[0]
        listed = cli(settings, "batches", run_id, "--stale")
        assert f"migrator requeue {run_id} --batch {batch_id}" in listed.stdout, listed.stdout
        assert str(batch_id) in cli(settings, "batches", run_id, "--failed").stdout

        requeued = cli(settings, "requeue", run_id, "--batch", str(batch_id))
        assert requeued.returncode == 0, requeued.stderr
        until(pg, "SELECT 1 FROM migration_batches WHERE id = %s AND status = 'done' AND attempts = 2", (batch_id,),
              "batch taken over and done")
    finally:
        os.kill(frozen, signal.SIGCONT)
    progress = wait_for_end(pg, run_id)
    assert progress["status"] == "completed", progress
    quiet(pg, run_id)
    time.sleep(2)  # the woken worker retries on a new session, and finds the batch done
    with pg.cursor() as cur:
        cur.execute("SELECT attempts, status FROM migration_batches WHERE id = %s", (batch_id,))
        assert cur.fetchone() == (2, "done")
    pg.rollback()
    log = (workers.logdir / "w1.log").read_text() + (workers.logdir / "w2.log").read_text()
    assert '"event": "lost_session_ended"' in log
    rest = migrate(settings, priorities=("critical", "medium", "low"))
    assert rest["status"] == "completed"
    assert content_fingerprint(pg) == expected


def test_a_failed_finalize_step_is_shown_with_the_command_that_runs_it_again(settings, r, pg, monkeypatch, tmp_path):
    seed_demo(r, 60)
    real = finalize.link_rows

    def broken(conn, mapping, run_id):
        raise RuntimeError("legacy_id_map is locked by a long transaction")

    monkeypatch.setattr(finalize, "link_rows", broken)
    failed = migrate(settings)
    run_id = failed["run_id"]
    assert failed["status"] == "failed"
    expected = f"finalize of priority critical failed: RuntimeError: legacy_id_map is locked by a long transaction; " \
               f"once its cause is fixed, run it again: migrator resume {run_id}"
    assert failed["error"] == expected
    assert expected in cli(settings, "status", run_id).stdout
    assert expected in cli(settings, "batches", run_id, "--failed").stdout
    assert run_rows(pg, run_id) > 0  # nothing is known to be wrong with its rows: kept

    monkeypatch.setattr(finalize, "link_rows", real)
    resumed = cli(settings, "resume", run_id, "--local", "--output-dir", str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    assert run_progress(pg, run_id)["status"] == "completed"


def test_a_failed_rollback_says_so_keeps_everything_and_can_be_run_again(settings, r, pg):
    before = fingerprint(pg)
    seed_demo(r, 60)
    run_id = migrate(settings)["run_id"]
    written = fingerprint(pg)
    with pg.cursor() as cur:  # a privilege revoked, a trigger of the app's: the rollback's DELETE fails
        cur.execute("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'deletes are refused here'; END $$")
        cur.execute("CREATE TRIGGER refuse BEFORE DELETE ON users FOR EACH ROW EXECUTE FUNCTION refuse()")
    pg.commit()
    try:
        failed = cli(settings, "rollback", run_id)
        assert failed.returncode == 1
        assert "the rollback failed" in failed.stderr and "deletes are refused here" in failed.stderr
        assert f"run `migrator rollback {run_id}` again" in failed.stderr
        shown = json.loads(cli(settings, "status", run_id, "--json").stdout)
        assert shown["status"] == "rollback_failed" and "deletes are refused here" in shown["error"]
        assert fingerprint(pg) == written  # all or nothing
    finally:
        with pg.cursor() as cur:
            cur.execute("DROP TRIGGER refuse ON users")
            cur.execute("DROP FUNCTION refuse()")
        pg.commit()
    again = cli(settings, "rollback", run_id)
    assert again.returncode == 0, again.stderr
    assert run_progress(pg, run_id)["status"] == "rolled_back" and fingerprint(pg) == before


def test_a_batch_begun_before_a_cancel_cannot_commit_after_the_resume(settings, r, pg):
    """A batch that began before a cancel and commits after a resume would mix two lives of a
    run: the fence it took at its start no longer holds."""
    from migrator.core import lease
    from migrator.core import runstate
    seed_demo(r, 30)
    from migrator.execution.runner import plan_run

    client = settings.redis()
    run_id = plan_run(client, pg, THREADR, RunOptions(priorities=("high",)), settings.redis_url)
    client.close()
    with pg.cursor() as cur:
        cur.execute("SELECT id FROM migration_batches WHERE run_id = %s", (run_id,))
        (batch_id,) = cur.fetchone()
    pg.rollback()
    spec, held = lease.claim(pg, batch_id)
    with pg.cursor() as cur:
        runstate.transition(cur, run_id, "cancelling")
        runstate.transition(cur, run_id, "cancelled")
        runstate.transition(cur, run_id, "running")  # resumed
    pg.commit()
    with pg.cursor() as cur, pytest.raises(runstate.Fenced, match="stopped and resumed"):
        lease.still_ours(cur, held)
    pg.rollback()
    lease.release(pg, batch_id)


def test_the_commit_of_a_batch_another_worker_took_over_is_refused(settings, r, pg):
    """Where the lost session cannot be ended (no privilege to), the takeover waits for its rows,
    and the lost worker's commit, when it comes back, is refused: its attempt is not the batch's."""
    from migrator.core import lease
    from migrator.core import runstate
    from migrator.execution.runner import plan_run

    seed_demo(r, 30)
    client = settings.redis()
    run_id = plan_run(client, pg, THREADR, RunOptions(priorities=("high",)), settings.redis_url)
    client.close()
    with pg.cursor() as cur:
        cur.execute("SELECT id FROM migration_batches WHERE run_id = %s", (run_id,))
        (batch_id,) = cur.fetchone()
    pg.rollback()
    _, lost = lease.claim(pg, batch_id)
    other = psycopg2.connect(settings.database_url)
    try:
        with other, other.cursor() as cur:  # its heartbeat stopped long ago
            cur.execute("UPDATE migration_batches SET heartbeat_at = now() - interval '1 hour' WHERE id = %s", (batch_id,))
        _, taken = lease.claim(other, batch_id)  # (ends the lost session: reconnect as the lost worker would)
        assert taken.attempt == lost.attempt + 1 and not taken.locked
    finally:
        other.close()
    late = psycopg2.connect(settings.database_url)
    try:
        with late.cursor() as cur, pytest.raises(runstate.Fenced, match="taken over by another worker"):
            lease.still_ours(cur, lost)
    finally:
        late.close()
