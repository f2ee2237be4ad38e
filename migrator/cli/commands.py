"""What each `migrator` command does, as plain functions over the library (the CLI only parses).

Each returns a process exit code: 0 success, 1 the work ran but did not succeed (a run that
failed or did not balance), 2 it could not start (settings, connections, schema).
"""
from __future__ import annotations

import json
import signal
import sys
from dataclasses import asdict
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import redis
from rich.console import Group

from migrator.cutover import switch as cutover
from migrator.execution import executor
from migrator.core import ledger
from migrator.core import metrics
from migrator.core import notifications
from migrator.core import registry
from migrator.views import report as report_mod
from migrator.views import progress as progress_mod
from migrator.views import status as status_mod
from migrator.core.config import ConfigError, Settings, reason
from migrator.core.errors import TRANSIENT, reconnect
from migrator.cutover.dualwrite import WriteStrategy, configured_strategy
from migrator.core.log import attach_log_file
from migrator.core.runstate import TERMINAL, NotNow
from migrator.core.mapping import Mapping, Priority
from migrator.core.options import RunOptions
from migrator.execution.cancel import cancel_run
from migrator.core.rollback import RollbackFailed, rollback_run
from migrator.views.html_report import write_html
from migrator.execution.runner import plan_run, requeue, resume_point
from migrator.core.validate import render_validation, validate_run
from migrator.core.verify import explain, masked, strictly, verify_in_memory
from migrator.core.verify import render as render_verification
from migrator.views.audit import audit_keyspace, render_audit, write_audit
from migrator.views.backup import backup, restore_instructions
from migrator.views.mapping_doc import build_mapping_document, latest_audit, write_mapping_document
from migrator.views.mapping_init import write_starting_file
from migrator.views.preflight import exit_code, render_checks, run_checks
from migrator.core.redact import redact_text
from migrator.core.writer import describe
from migrator.core.schema import database_url_for, empty_tables, ensure_database, init_db, require_schema
from migrator.core.source import cluster_masters, key_client, node_client

OK, FAILED, CANNOT_START = 0, 1, 2


def _ledger(settings: Settings, run_id: str | None = None, mapping: Mapping | None = None) -> Any:
    """A connection to a database that has the current schema, and the mapping's with every table of it
    journaled when given (a command that writes its tables or rolls them back), else the error says: run
    init-db; and, given a run id, holds that run (else a LookupError names the runs it holds): asked
    before a command plans or touches anything."""
    conn = settings.postgres()
    try:
        require_schema(conn, mapping)
        if run_id is not None:
            with conn, conn.cursor() as cur:
                ledger.require_run(cur, run_id)
    except Exception:
        conn.close()
        raise
    return conn


def _run_ledger(settings: Settings, run_id: str, spec: str | None) -> tuple[Any, Mapping]:
    """_ledger for a command that writes a run's tables or rolls them back: the run's own mapping
    (registry.for_run), its tables each journaled (else: run init-db)."""
    conn = _ledger(settings, run_id)
    try:
        mapping = _mapping_of(conn, run_id, spec)
        require_schema(conn, mapping)
    except Exception:
        conn.close()
        raise
    return conn, mapping


def _dump(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2, default=str) + "\n")


def cmd_init_db(settings: Settings, mapping: Mapping, out: TextIO = sys.stdout) -> int:
    conn = settings.postgres()
    try:
        for version, action in init_db(conn, mapping):
            out.write(f"{version}: {action}\n")
    finally:
        conn.close()
    return OK


def _announce(run_id: str, opts: RunOptions, output_dir: Path, out: TextIO, err: TextIO) -> None:
    # on a terminal the progress display has stderr: log lines go to the run's log file alone
    log_path = attach_log_file(output_dir / f"migration_{run_id}.log", only=err.isatty())
    metrics.coordinating(run_id)
    out.write(f"run {run_id}{' (dry run)' if opts.dry_run else ''}\n")
    out.flush()
    err.write(f"migrator: logging to {log_path}\n")


def _log_on_a_terminal(path: Path, err: TextIO) -> None:
    """On a terminal the progress display has stderr: log lines go to `path` alone (said on stderr)."""
    if err.isatty():
        err.write(f"migrator: logging to {attach_log_file(path, only=True)}\n")
        err.flush()


def _final_report(conn: Any, mapping: Mapping, run_id: str, output_dir: Path, as_json: bool, out: TextIO) -> int:
    """Print the report (and the monitoring figures), write migration_report_<run>.json; the exit code."""
    report = report_mod.build_report(conn, mapping, run_id)
    report["monitoring"] = report_mod.monitoring(conn, mapping)
    path = report_mod.write_report(report, output_dir)
    if as_json:
        _dump(report, out)
    else:
        out.write(report_mod.render(report) + f"\nreport written to {path}\n")
    return OK if report["status"] in ("completed", "dry_run") and report["balanced"] else FAILED


def _executor(settings: Settings, *, local: bool, jobs: int = 1) -> executor.Executor:
    """Where a command's work goes, chosen once: here with --local (`jobs` at once), else to the
    Celery workers; reached now (a ConfigError with the fix when the source, or the broker, does not
    answer)."""
    chosen = executor.load("local", settings, jobs=jobs) if local else executor.load("celery", settings)
    chosen.connect()
    return chosen


def cmd_run(settings: Settings, mapping: Mapping, opts: RunOptions, *, local: bool = False, jobs: int = 1,
            spec: str | None = None, detach: bool = False, as_json: bool = False, output_dir: Path = Path("."),
            out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Plan the run and have it executed: here with --local, else by the Celery workers, watched
    from the ledger until it ends (unless `detach`); then print and write its report."""
    opts.check_scope(mapping)
    runs = _executor(settings, local=local, jobs=jobs)
    client = settings.redis()
    try:
        conn = _ledger(settings, mapping=mapping)
        try:
            if not runs.answering():
                err.write("migrator: no worker answers on the broker yet; the batches wait in their queues until one "
                          f"starts: {runs.worker_command()}\n")
            run_id = plan_run(client, conn, mapping, opts, settings.redis_url, spec)
        finally:
            conn.close()
    finally:
        client.close()
    _announce(run_id, opts, output_dir, out, err)
    if runs.background:
        runs.carry_on(mapping, run_id, opts, opts.priority_order()[0])
        if detach:
            out.write(f"detached; follow it with: migrator status {run_id} --watch\n")
            return OK
        watch(settings.postgres, run_id, out=err)
    else:
        with progress_mod.watching(settings.postgres, progress_mod.run_drawing(run_id), err):  # its progress on `err` while it runs here
            runs.carry_on(mapping, run_id, opts, opts.priority_order()[0])
    return _report_anew(settings, mapping, run_id, output_dir, as_json, out)


def _report_anew(settings: Settings, mapping: Mapping, run_id: str, output_dir: Path, as_json: bool,
                 out: TextIO) -> int:
    """`_final_report` on a new connection: the server may have restarted while the run went on."""
    conn = settings.postgres()
    try:
        return _final_report(conn, mapping, run_id, output_dir, as_json, out)
    finally:
        conn.close()


# Tries to reach PostgreSQL again when the watcher lost it (a restart): backoff 0.5 s, 1 s, ... 30 s,
# about a minute in all; the run goes on on the workers meanwhile.
WATCH_RETRIES = 7


def watch(connect: Callable[[], Any], run_id: str, *, interval: float = 1.0, every: float = progress_mod.LINE_SECONDS,
          out: TextIO = sys.stderr, terminal: bool | None = None) -> dict[str, Any]:
    """Show progress until the run ends (progress_mod.Display: in place, with the status view under
    the bars, on a terminal; else a line every `every` seconds and the status view at the end); the
    run's status (status.run_progress). A lost connection (PostgreSQL restarting) is made again, so
    the run's real outcome is still seen."""
    display = progress_mod.Display(out, terminal=terminal, every=every)
    conn = connect()
    try:
        while True:
            try:
                progress = status_mod.run_progress(conn, run_id)
                # a follow session has no batches to count keys by: its own view (lag, reconciliations)
                measured = None if progress["follow"] is not None else progress_mod.measure(conn, run_id)
            except TRANSIENT as exc:
                display.close()
                out.write(f"migrator: lost the ledger ({reason(exc)}); connecting again, for up to a minute\n")
                conn.close()
                conn = reconnect(connect, WATCH_RETRIES)
                display = progress_mod.Display(out, terminal=terminal, every=every)
                continue
            ended = progress["status"] in TERMINAL
            if measured is None:
                display.show(status_mod.view(progress), status_mod.render(progress), final=ended)
            else:
                display.show(Group(progress_mod.view(measured), status_mod.view(progress)), progress_mod.line(measured),
                             final=ended)
            if ended:
                if not display.terminal and measured is not None:
                    out.write(status_mod.render(progress) + "\n")  # the whole view once, at the end
                return progress
            time.sleep(min(interval, every))
    finally:
        display.close()
        conn.close()


def cmd_status(settings: Settings, run_id: str, *, as_json: bool, watch_it: bool, out: TextIO = sys.stdout) -> int:
    conn = _ledger(settings, run_id)
    try:
        progress = None if watch_it else status_mod.run_progress(conn, run_id)
    finally:
        conn.close()
    if watch_it:
        progress = watch(settings.postgres, run_id, out=out)
    if as_json:
        _dump(progress, out)
    elif not watch_it:
        out.write(status_mod.render(progress) + "\n")
    return FAILED if progress["status"] in ("failed", "rolled_back", "rollback_failed", "cancelled") else OK


def cmd_batches(settings: Settings, run_id: str, *, failed_only: bool, stale_only: bool = False, as_json: bool,
                out: TextIO = sys.stdout) -> int:
    """A run's batches (--failed: failed and stale ones; --stale: stale ones), and any failure of
    a priority's finalize step, each with the command that recovers it."""
    conn = _ledger(settings, run_id)
    try:
        with conn, conn.cursor() as cur:
            rows = [b for b in ledger.batches(cur, run_id)
                    if (b["stale"] if stale_only else b["status"] == "failed" or b["stale"]) or not (failed_only or stale_only)]
            stuck = status_mod.finalize_failures(cur, run_id)
    finally:
        conn.close()
    if as_json:
        _dump({"batches": [{k: v for k, v in b.items() if k != "pattern_counts"} for b in rows], "finalize": stuck}, out)
    else:
        out.write(status_mod.render_batches(rows, run_id) + "\n")
        out.write("".join(f"priority {f['priority']}: {f['detail']}\n" for f in stuck))
    return OK


def cmd_requeue(settings: Settings, run_id: str, batch_ids: list[int], spec: str | None = None,
                out: TextIO = sys.stdout) -> int:
    """Put batches back (the given ones, or every failed or stale one) and send the run on to the
    workers from the first priority that has not validated."""
    runs = _executor(settings, local=False)
    conn, mapping = _run_ledger(settings, run_id, spec)
    try:
        reopened = requeue(conn, run_id, batch_ids or None)
        if reopened:
            opts, priority = resume_point(conn, run_id)
            runs.carry_on(mapping, run_id, opts, priority)
    finally:
        conn.close()
    if not reopened:
        out.write("nothing to requeue: no such batch, or no failed batch in this run\n")
        return FAILED
    out.write(f"requeued {len(reopened)} batch(es): {', '.join(str(b) for b, _ in reopened)}; "
              f"follow with: migrator status {run_id} --watch\n")
    return OK


def cmd_resume(settings: Settings, run_id: str, spec: str | None = None, *, local: bool = False, jobs: int = 1,
               as_json: bool = False, output_dir: Path = Path("."), out: TextIO = sys.stdout,
               err: TextIO = sys.stderr) -> int:
    """Carry a run on from the ledger (with the mapping it was made with) from the first priority
    that has not validated: sent to the workers, or executed here with --local (its progress shown
    on `err`) and then reported like `run --local`."""
    runs = _executor(settings, local=local, jobs=jobs)
    conn, mapping = _run_ledger(settings, run_id, spec)
    try:
        opts, priority = resume_point(conn, run_id)
    finally:
        conn.close()
    if priority is None:
        out.write(f"run {run_id} has nothing left to do\n")
        return OK
    if runs.background:  # the workers carry it on; `migrator status RUN --watch` follows it
        runs.carry_on(mapping, run_id, opts, priority)
        out.write(f"resumed run {run_id} at priority {priority.label}\n")
        return OK
    out.write(f"resuming run {run_id} at priority {priority.label}\n")
    with progress_mod.watching(settings.postgres, progress_mod.run_drawing(run_id), err):  # its progress on `err` while it runs here
        runs.carry_on(mapping, run_id, opts, priority)
    return _report_anew(settings, mapping, run_id, output_dir, as_json, out)


def cmd_report(settings: Settings, run_id: str, spec: str | None = None, *, as_json: bool = False,
               output_dir: Path = Path("."), html: bool = False, out: TextIO = sys.stdout) -> int:
    conn = _ledger(settings, run_id)
    try:
        mapping = _mapping_of(conn, run_id, spec)
        code = _final_report(conn, mapping, run_id, output_dir, as_json, out)
        if html:
            out.write(f"HTML report written to {write_html(conn, mapping, run_id, output_dir)}\n")
        return code
    finally:
        conn.close()


def _verification(settings: Settings, client: Any, conn: Any, mapping: Mapping, run_id: str,
                  priorities: list[Priority], local: bool, jobs: int, err: TextIO,
                  max_keys_per_sec: int | None = None) -> dict[str, Any]:
    """Verify a run's `priorities`: here with --local, else on the workers when one answers, and
    here otherwise (saying why); the verification's result. A role that may not write the ledger
    verifies here, in memory, and nothing is recorded. `max_keys_per_sec`: its cap on Redis in
    place of the run's (0: none)."""
    with conn, conn.cursor() as cur:
        reader = ledger.verification_reader(cur)
    if reader is not None:
        err.write(f"migrator: not recorded: role {reader} cannot write the ledger (verifying here, in memory)\n")
        return verify_in_memory(client, conn, mapping, run_id, priorities, max_keys_per_sec)
    verifier = _verifier(settings, local, jobs, err)
    # its progress on `err` while it runs (here or on the workers: both write it to the ledger)
    with progress_mod.watching(settings.postgres, progress_mod.verify_drawing(conn, run_id), err):
        return verifier.verify(mapping, run_id, priorities, max_keys_per_sec)


def _verifier(settings: Settings, local: bool, jobs: int, err: TextIO) -> executor.Executor:
    """Where a verification runs: here with --local; else on the workers when one answers, and here
    when none does or the broker cannot be reached (saying why)."""
    here = executor.load("local", settings, jobs=jobs)
    if local:
        return here
    try:
        workers = _executor(settings, local=False)
    except ConfigError as exc:
        err.write(f"migrator: verifying here (--local): {exc}\n")
        return here
    if not workers.answering():
        err.write("migrator: no worker answers on the broker; verifying here (--local)\n")
        return here
    return workers


def _mapping_of(conn: Any, run_id: str, spec: str | None) -> Mapping:
    """The mapping run `run_id` was made with (registry.for_run)."""
    with conn, conn.cursor() as cur:
        return registry.for_run(ledger.require_run(cur, run_id), spec)


def _run_to_check(conn: Any, run_id: str | None, priorities: list[str]) -> tuple[str, RunOptions, list[Priority]]:
    """The run (default: the latest), its options, and the priorities asked for (default: all it
    migrated); refused, naming the choices, when the run or a priority is not there."""
    with conn, conn.cursor() as cur:
        run_id = run_id or ledger.latest_run(cur)
        if run_id is None:
            raise LookupError("no run to check yet; migrate first with `migrator run`")
        opts = RunOptions.from_json(ledger.require_run(cur, run_id)["options"])
    migrated = opts.priority_order()
    chosen = [Priority.parse(p) for p in priorities] or migrated
    outside = [p.label for p in chosen if p not in migrated]
    if outside:
        raise ValueError(f"run {run_id} did not migrate priority {', '.join(outside)}; choose --priority from: "
                         f"{', '.join(p.label for p in migrated)}")
    return run_id, opts, chosen


def cmd_verify(settings: Settings, run_id: str | None, spec: str | None, priorities: list[str], *, local: bool = False,
               jobs: int = 2, show_diffs: int = 0, as_json: bool = False, output_dir: Path = Path("."),
               max_keys_per_sec: int | None = None, strict: bool = False, out: TextIO = sys.stdout,
               err: TextIO = sys.stderr) -> int:
    """Compare every key of a run's mapping with its rows: exit 0 clean, 1 differences (or, `strict`, rows
    behind their key), 2 could not finish."""
    client, conn = settings.redis(), _ledger(settings)
    try:
        run_id, opts, chosen = _run_to_check(conn, run_id, priorities)
        _log_on_a_terminal(output_dir / f"verification_{run_id}.log", err)
        mapping = _mapping_of(conn, run_id, spec)
        result = _verification(settings, client, conn, mapping, run_id, chosen, local, jobs, err, max_keys_per_sec)
        for p in result.get("patterns", []):
            # up to `show_diffs` rows of each kind (missing, different, extra, changed), explained
            shown = [e for kind in ("missing", "different", "extra", "changed")
                     for e in [e for e in p["examples"] if e["kind"] == kind][:show_diffs]]
            for example in shown:
                example["diff"] = explain(client, conn, mapping, example, opts)
            p["examples"] = shown
    finally:
        conn.close()
        client.close()
    if strict:
        result = strictly(result)
    shown = masked(result)
    _dump(shown, out) if as_json else out.write(render_verification(shown) + "\n")
    return {"clean": OK, "counted": OK, "differences": FAILED, "stale": FAILED}.get(result["verdict"], CANNOT_START)


def cmd_validate(settings: Settings, run_id: str | None, spec: str | None, priorities: list[str], *,
                 local: bool = False, jobs: int = 2, as_json: bool = False, max_keys_per_sec: int | None = None,
                 out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Validate a run (the latest one when `run_id` is None) again, now: the checks it got as it
    ran, over a new verification."""
    client, conn = settings.redis(), _ledger(settings)
    try:
        run_id, _, chosen = _run_to_check(conn, run_id, priorities)
        mapping = _mapping_of(conn, run_id, spec)
        result = validate_run(conn, mapping, run_id, chosen,
                              lambda chosen: _verification(settings, client, conn, mapping, run_id, chosen, local, jobs,
                                                           err, max_keys_per_sec))
    finally:
        conn.close()
        client.close()
    _dump(result, out) if as_json else out.write(render_validation(result) + "\n")
    return OK if result["ok"] else FAILED


def cmd_rollback(settings: Settings, run_id: str, spec: str | None = None, out: TextIO = sys.stdout,
                 err: TextIO = sys.stderr) -> int:
    """Undo a run that is not running; exit 1 when the rollback failed (the run says why)."""
    conn, mapping = _run_ledger(settings, run_id, spec)
    try:
        with conn, conn.cursor() as cur:
            status = ledger.require_run(cur, run_id)["status"]
        if status == "rolled_back":
            out.write(f"run {run_id} was rolled back already; nothing to do\n")
            return OK
        if status in ("planned", "running"):
            raise NotNow(f"run {run_id} is still running; rolling it back now would race its batches. Stop it and "
                         f"roll it back: migrator cancel {run_id} --rollback")
        if status == "cancelling":
            raise NotNow(f"run {run_id} is being cancelled; wait for `migrator cancel {run_id}` to end (or run it "
                         f"again), then: migrator rollback {run_id}")
        return _roll_back(conn, mapping, run_id, out, err)
    finally:
        conn.close()


def cmd_cancel(settings: Settings, run_id: str, spec: str | None = None, *, rollback: bool, wait_s: float,
               out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Stop a running run (its queued batches revoked, running ones stopped at their next
    sub-batch), then roll it back if asked; otherwise say how to."""
    conn = _ledger(settings, run_id)
    try:
        with conn, conn.cursor() as cur:
            run = ledger.require_run(cur, run_id)
        mapping = registry.for_run(run, spec) if rollback else None  # (refused before anything is stopped)
        shown = [-1]

        def progress(live: int) -> None:
            if live and live != shown[0]:
                err.write(f"migrator: waiting for {live} running batch(es) to stop at their next sub-batch\n")
            shown[0] = live

        if run["status"] in ("planned", "running", "cancelling"):
            revoked = _revoke(settings, conn, run_id)
            if revoked:
                err.write(f"migrator: revoked {revoked} queued batch task(s)\n")
        left = cancel_run(conn, run_id, wait_s=wait_s, progress=progress)
        out.write(f"run {run_id} cancelled" + (f" ({left} batch(es) had not stopped yet; nothing of theirs can commit)"
                                              if left else "") + "\n")
        if not rollback:
            out.write(f"what it committed stays. Undo it: migrator rollback {run_id}   or carry on: migrator resume "
                      f"{run_id}\n")
            return OK
        return _roll_back(conn, mapping, run_id, out, err)
    finally:
        conn.close()


def _revoke(settings: Settings, conn: Any, run_id: str) -> int:
    """Revoke a run's queued batch tasks on the workers (a run sent to Celery); their count."""
    with conn, conn.cursor() as cur:
        queued = ledger.queued_tasks(cur, run_id)
    if not queued:
        return 0  # a --local run, or nothing left
    return _executor(settings, local=False).revoke(queued)


def _roll_back(conn: Any, mapping: Mapping, run_id: str, out: TextIO, err: TextIO) -> int:
    """Undo a run that is not running, saying what was undone (exit 0) or why it could not be (1)."""
    try:
        summary = rollback_run(conn, mapping, run_id)
    except RollbackFailed as exc:
        err.write(f"migrator: run {run_id}: {exc}\n")
        return FAILED
    _write_rollback(summary, out)
    out.write(f"run {run_id} rolled back\n")
    return OK


def _write_rollback(summary: dict[str, dict[str, int]], out: TextIO) -> None:
    for table, n in summary.items():
        if n["deleted"] or n["restored"]:
            out.write(f"{table}: {n['deleted']} inserted rows deleted, {n['restored']} changed rows restored\n")


def cmd_check(settings: Settings, mapping: Mapping, *, need_workers: bool, timeout: float, as_json: bool,
              out: TextIO = sys.stdout) -> int:
    """Preflight: one line per check with its verdict and fix; exit 1 when any check fails."""
    results = run_checks(settings, need_workers=need_workers, timeout=timeout, mapping=mapping)
    _dump([asdict(r) for r in results], out) if as_json else out.write(render_checks(results) + "\n")
    return exit_code(results)


def cmd_backup(settings: Settings, mapping: Mapping, directory: Path, out: TextIO = sys.stdout) -> int:
    """pg_dump of the target and an RDB snapshot of the source, checked, with how to restore them."""
    result = backup(settings, directory, name=mapping.name)
    for dump in (result.sql, *result.rdb):
        out.write(f"{dump.path}  {dump.size:,} bytes\n")
    out.write("\n" + restore_instructions(result) + "\n")
    return OK


def cmd_audit(settings: Settings, mapping: Mapping, *, show_pii: bool, memory_sample: int, scan_count: int,
              output_dir: Path, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Phase 1: one pass over the keyspace; the report is written and shown. Exit 1 on a stop condition."""
    client = settings.redis()
    try:
        report = audit_keyspace(client, mapping, show_pii=show_pii, memory_sample=memory_sample, scan_count=scan_count)
    finally:
        client.close()
    path = write_audit(report, output_dir)
    _dump(report, out) if as_json else out.write(render_audit(report) + f"\naudit written to {path}\n")
    return FAILED if report["stop_conditions"] else OK


def cmd_mapping(mapping: Mapping, *, audit_dir: Path, output_dir: Path, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Phase 2: the mapping document, with volumes from the newest audit in `audit_dir` if there is one."""
    audit = latest_audit(audit_dir)
    doc = build_mapping_document(mapping, audit)
    path = write_mapping_document(doc, output_dir)
    if as_json:
        _dump(doc, out)
    else:
        for entry in doc["patterns"]:
            volume = f"{entry['volumes']['keys']:>9,} keys" if entry.get("volumes") else " " * 14
            out.write(f"{entry['priority']:8} {entry['name']:22} {entry['table'] or '(skipped)':24} "
                      f"{entry['complexity']:6} {volume}\n")
        if audit is None:
            out.write(f"no audit in {audit_dir}: volumes left out (run `migrator audit` first to include them)\n")
    out.write(f"mapping document written to {path}\n")
    return OK


def cmd_mapping_init(settings: Settings, path: Path, *, force: bool, out: TextIO = sys.stdout) -> int:
    """A starting mapping file from an audit of the live keyspace (refused over an existing file unless `force`)."""
    client = settings.redis()
    try:
        patterns, left_out = write_starting_file(client, path, force=force)
    except FileExistsError as exc:
        raise ConfigError(str(exc)) from None
    finally:
        client.close()
    out.write(f"wrote {path}: {patterns} pattern(s), one per key shape found. Edit it (docs/mapping-file.md), then:\n"
              f"  migrator init-db --mapping {path}\n  migrator run --local --mapping {path}\n")
    if left_out:
        out.write(f"left out: {left_out:,} key(s) of shapes past the first 100 the audit tells apart are in no pattern "
                  "(a run counts them unmapped); `migrator audit` lists them: add a pattern for each shape\n")
    return OK


def cmd_parity(settings: Settings, hours: float, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    conn = _ledger(settings)
    try:
        seen = cutover.parity(conn, hours)
    finally:
        conn.close()
    if as_json:
        _dump(seen, out)
    elif not seen:
        out.write(f"no shadow reads in the last {hours:g} h: run the app's DualWriteService with shadow_rate > 0\n")
    for operation, p in ({} if as_json else seen).items():
        out.write(f"{operation:22} {p['matched']:>8}/{p['reads']:<8} parity {p['parity']:.4%}\n")
        for example in p["mismatches"]:
            out.write(f"    redis {example['redis']}  postgres {example['postgres']}\n")
    return OK


def cmd_cutover(settings: Settings, mapping: Mapping, to: str | None, *, min_parity: float, min_reads: int, hours: float,
                max_lag: float = 1.0, out: TextIO = sys.stdout) -> int:
    """Switch the app's strategy: refused unless the run validated and parity holds; --back always allowed."""
    plain = settings.redis()
    client = key_client(plain)  # (the repair queue's key may live on any master of a cluster)
    conn = _ledger(settings)
    try:
        if to is None:
            if configured_strategy(conn) is WriteStrategy.POSTGRES_ONLY:  # (Redis has missed every write since)
                out.write("cutover --back refused: the strategy is postgres_only, under which Redis is not written: "
                          "its answers would miss every write since, and nothing here copies them back. `migrator "
                          "cutover --to postgres-primary` writes Redis again while PostgreSQL answers (a key written "
                          "under postgres_only stays behind in Redis until the app writes it again)\n")
                return FAILED
            cutover.set_strategy(conn, WriteStrategy.DUAL_WRITE, "cutover --back")
            out.write("strategy is dual_write again: Redis answers, both stores are written\n")
            return OK
        decision = cutover.judge_cutover(client, conn, mapping.hooks.parity_reads, min_parity=min_parity, min_reads=min_reads, hours=hours,
                                        max_lag=max_lag, source=plain)
        if not decision.allowed:
            out.write("cutover refused:\n" + "".join(f"  - {r}\n" for r in decision.reasons))
            return FAILED
        strategy = WriteStrategy(to.replace("-", "_"))
        cutover.set_strategy(conn, strategy, f"cutover --to {to}")
        out.write(f"strategy is {strategy.value}: services following the setting switch within seconds\n")
        return OK
    finally:
        conn.close()
        client.close()
        plain.close()


def cmd_health(settings: Settings, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    client, conn = settings.redis(), settings.postgres()
    try:
        report = cutover.health(client, conn)
    finally:
        conn.close()
        client.close()
    if as_json:
        _dump(report, out)
    else:
        for store in ("redis", "postgres"):
            s = report[store]
            out.write(f"{store:9} {'up' if s['ok'] else 'DOWN'}  {s.get('latency_ms', s.get('error'))}\n")
        out.write(f"strategy {report.get('strategy')}, pending repairs {report.get('pending_repairs')}\n")
    return OK if report["ok"] else FAILED


def cmd_seed_demo(settings: Settings, mapping: Mapping, users: int, *, fresh: bool, malformed: int = 0,
                  out: TextIO = sys.stdout) -> int:
    seed = mapping.hooks.seeder(mapping.name)  # before anything is flushed
    client = settings.redis()
    try:
        if client.dbsize() and not fresh:
            out.write("the Redis database is not empty; pass --fresh to empty it first (it is flushed!) "
                      "or point --redis-url at an empty database\n")
            return CANNOT_START
        if fresh:
            client.flushdb()
        started = time.monotonic()
        counts = seed(client, users, malformed=malformed)
    finally:
        client.close()
    out.write(f"seeded {sum(counts.values()):,} keys for {users:,} users in {time.monotonic() - started:.1f} s\n")
    for name, n in sorted(counts.items()):
        out.write(f"  {name:22} {n:>9,}\n")
    return OK


def cmd_demo(settings: Settings, mapping: Mapping, users: int, database: str, opts: RunOptions,
             out: TextIO = sys.stdout) -> int:
    """Create the demo database, apply the schema, seed the demo keyspace, migrate, report."""
    opts.check_scope(mapping)  # before the demo's Redis database is flushed
    admin = settings.postgres()
    try:
        if ensure_database(admin, database):
            out.write(f"created database {database}\n")
    finally:
        admin.close()
    demo = Settings(settings.redis_url, database_url_for(settings.database_url, database), settings.broker_url)

    def empty() -> int:
        # the demo's own database: rows of an earlier demo keyspace would be rows no key gives
        conn = demo.postgres()
        try:
            empty_tables(conn, [*mapping.table_names(), *ledger.TABLES])
        finally:
            conn.close()
        return OK

    for step in (lambda: cmd_init_db(demo, mapping, out), empty,
                 lambda: cmd_seed_demo(demo, mapping, users, fresh=True, out=out),
                 lambda: cmd_run(demo, mapping, opts, local=True, out=out)):
        code = step()
        if code != OK:
            return code
    return OK


def _notifications_ready(client: Any, nodes: list[str], configure: bool, out: TextIO) -> None:
    """Every server publishes the keyspace notifications follow needs, or a ConfigError with the fix
    (with `configure`: turned on here, where CONFIG SET is allowed)."""

    for node in nodes:
        server = node_client(client, node) if node else client
        where = f" on {node}" if node else ""
        try:
            value = notifications.current(server)
            lacking = notifications.missing(value)
            if lacking and configure:
                out.write(f"{notifications.SETTING}{where} was {value!r}; set to {notifications.configure(server)!r}\n")
            elif lacking:
                raise ConfigError(f"{notifications.SETTING}{where} is {value!r}, without {lacking}: changes would not "
                                  f"be seen; {notifications.advice(value)}")
        except redis.ResponseError:  # CONFIG renamed or refused: a managed service
            raise ConfigError(f"cannot read {notifications.SETTING}{where} (CONFIG is refused: a managed service?); "
                              f"make sure it holds {notifications.NEEDED}: {notifications.advice('')}") from None
        finally:
            if server is not client:
                server.close()


def cmd_follow(settings: Settings, mapping: Mapping, *, spec: str | None = None, local: bool, jobs: int,
               configure: bool, reconcile_every: float, output_dir: Path = Path("."), out: TextIO = sys.stdout,
               err: TextIO = sys.stderr) -> int:
    """Keep PostgreSQL current from the keyspace notifications until SIGINT or SIGTERM; then drain,
    record, and end the session (exit 1 when it ended with changes not applied)."""
    from migrator.execution.follow import Follower, end_session, start_session
    from migrator.execution.reconcile import reconcile

    client = settings.redis()
    try:
        conn = _ledger(settings, mapping=mapping)
        try:
            nodes = cluster_masters(client) or [""]
            _notifications_ready(client, nodes, configure, out)
            applies = _executor(settings, local=local)
            if not applies.answering():
                raise ConfigError(f"no worker answers on the broker; start one ({applies.worker_command()}) or "
                                  "follow here with --local")
            run_id = start_session(client, conn, mapping, settings.redis_url, spec, "local" if local else "celery",
                                   [n for n in nodes if n])
        finally:
            conn.close()
        out.write(f"follow session {run_id}: applying changes until Ctrl-C (or SIGTERM); "
                  f"`migrator status {run_id}` shows its lag\n")
        out.flush()
        _log_on_a_terminal(output_dir / f"follow_{run_id}.log", err)
        apply = applies.applier(mapping, run_id)
        follower = Follower(settings.postgres, run_id, apply,
                            lambda reason: reconcile(client, settings.postgres, mapping, run_id, follower.dirty, reason),
                            jobs=jobs, reconcile_every=reconcile_every)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: follower.stop.set())
        db = client.connection_pool.connection_kwargs.get("db", 0)
        error = None
        try:
            notifications.Subscriptions(client, db, mapping.prefixes([p for p in mapping.patterns if p.migrated]),
                                        follower, follower.stop, configure).start(nodes)
            with progress_mod.watching(settings.postgres, progress_mod.follow_drawing(run_id), err):
                error = follower.run()
        except Exception as exc:
            follower.stop.set()
            error = redact_text(describe(exc))
            raise
        finally:
            conn = settings.postgres()
            try:
                end_session(conn, run_id, error)
            finally:
                conn.close()
        out.write(f"follow session {run_id} {'stopped: ' + error if error else 'ended: every change applied'}; "
                  f"`migrator rollback {run_id}` would undo it\n")
        return FAILED if error else OK
    finally:
        client.close()
