"""`migrator`: the command line. It parses arguments and calls `migrator.cli.commands`; nothing else."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import redis

from migrator.cli import commands
from migrator.core import metrics
from migrator import version
from migrator.core.config import BROKER_ERRORS, ConfigError, Settings, service_failure
from migrator.core.log import configure
from migrator.core.mapping import Priority
from migrator.core.options import VALIDATIONS, RunOptions
from migrator.core import registry
DESCRIPTION = """\
Move a live application's data from Redis into PostgreSQL: idempotent, balanced
(every key scanned is migrated, skipped with a reason, dead-lettered or expired), and
exactly reversible.

Typical session:
  migrator init-db                     # create the target schema (safe to repeat)
  migrator run --local --dry-run       # everything but keep nothing: numbers equal a real run
  migrator run                         # migrate on Celery workers (or --local: here, no broker)
  migrator status RUN_ID --watch       # progress per priority, from the ledger
  migrator verify RUN_ID               # every key compared with its rows: exit 0 clean, 1 differences
  migrator batches RUN_ID --failed     # what failed and why; then: migrator requeue RUN_ID --failed
  migrator report RUN_ID --json        # the balance again, for scripts
  migrator cancel RUN_ID --rollback    # stop a run that is running, then undo it
  migrator rollback RUN_ID             # put PostgreSQL back exactly as it was before RUN_ID

Connections come from REDIS_URL, DATABASE_URL and CELERY_BROKER_URL, or the flags below.
Exit codes: 0 done, 1 the work ran but did not succeed (or a service was lost on the way), 2 it
could not start: a setting, an unreachable service (named with its host and port), or an unknown
run id, pattern, table or priority (the valid ones are listed).
"""


def _output_dir(text: str) -> Path:
    """A directory to write into, created when missing (the user named it)."""
    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot create {text}: {exc.strerror}; pick a writable directory") from None
    return path


def _jobs(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of batches; give 1 or more, e.g. --jobs 2")
    return int(text)


def _not_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of keys per second; give 0 or more, e.g. 5000")
    return int(text)


def _jobs_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", "-j", type=_jobs, default=2, metavar="N",
                   help="with --local: batches run at once, each in one of N processes with its own PostgreSQL "
                        "session (default 2; 1: one at a time, in this process)")


VERIFY_DESCRIPTION = """\
Every key of the run's mapping is read again from Redis, transformed as the run did, and
compared with its rows in PostgreSQL, range by range (on the workers, or here with --local).
It SCANs the keyspace itself (it does not read the run's spool), so it also finds the keys
written after the run's single SCAN pass, which that run did not migrate: missing rows.
Per pattern it counts:
  missing    rows a key should have become that are not there
  different  rows that differ although their key's value did not change since they were written
  extra      rows without a source key: their key is gone (not expired) or no longer gives them,
             or they were never from this keyspace
  changed    rows whose key the app wrote since the run, or whose expiry is no longer the key's
             TTL (EXPIRE, PERSIST: a session touched): reported, not a difference; run again
  dead       keys the run made dead letters (no rows expected)
Exit 0 clean, 1 differences, 2 could not finish (a range failed, a service is down).
A role that may not write the ledger (migrator_report) verifies here, in memory, one range at a
time, and records nothing (it says so: "not recorded: role ... cannot write the ledger").
"""


def _where_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--local", action="store_true",
                   help="verify here (see --jobs); default: on the Celery workers when one answers, else here")
    _jobs_flag(p)
    p.add_argument("--max-keys-per-sec", type=_not_negative, metavar="N",
                   help="cap the keys per second this verification scans or reads in Redis, all workers together "
                        "(a large collection's members count as keys), with a token bucket of its own: slower at "
                        "the app's peak, faster at night; 0: no cap (default: the run's --max-keys-per-sec, and "
                        "the run's bucket)")


def _mapping_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--mapping", metavar="MAPPING",
                   help="the keyspace's mapping: an installed one's name (an unknown name lists them), "
                        "package.module:ATTRIBUTE, or a mapping file (.toml); env MIGRATOR_MAPPING, default: the "
                        "only installed one. Commands on a run use the "
                        "mapping the run was made with (and refuse another)")


def _connection_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connections (default: environment)")
    _mapping_flag(g)
    g.add_argument("--redis-url", help="source Redis, e.g. redis://:password@host:6379/0 (env REDIS_URL)")
    g.add_argument("--database-url", help="target PostgreSQL, e.g. postgresql://user@host/db (env DATABASE_URL)")
    g.add_argument("--broker-url", help="Celery broker (env CELERY_BROKER_URL)")


def _run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to migrate")
    g.add_argument("--priority", choices=[x.label for x in Priority], action="append",
                   help="only this priority (repeatable); default: critical, high, medium, low in order")
    g.add_argument("--table", action="append", default=[], help="only patterns writing this table (repeatable)")
    g.add_argument("--pattern", action="append", default=[],
                   help="only this pattern, by name or key glob, e.g. 'app:premium:email:*', or a glob over "
                        "those, e.g. 'premium_*' (repeatable; one that names no pattern is refused, listing them)")
    g = p.add_argument_group("how")
    g.add_argument("--dry-run", action="store_true",
                   help="transform and write inside a transaction that is rolled back: real numbers, nothing kept")
    g.add_argument("--batch-size", type=int, default=RunOptions.batch_size,
                   help=f"records per sub-batch and savepoint (default {RunOptions.batch_size}; a sub-batch also ends at"
                        " 16 MB of values)")
    g.add_argument("--scan-count", type=int, default=1000, help="SCAN COUNT hint (default 1000)")
    g.add_argument("--ranges", type=int, help="cursor ranges to split the keyspace into (default: from the key count)")
    g.add_argument("--max-value-bytes", type=int, metavar="N",
                   help="an operator's cap: values larger than N bytes become dead letters, their first bytes kept "
                        "(default: no cap; a large value is read and written on its own, so memory stays bounded "
                        "by the largest value)")
    g.add_argument("--max-keys-per-sec", type=int, metavar="N",
                   help="cap the keys per second that all workers together scan or read in Redis, to spare a "
                        "production server (a token bucket shared through Redis; a run touches each key about 3 times: "
                        "once in its one SCAN pass (the other passes read the spool, which costs Redis nothing), "
                        "and two reads; 10 with --scan-each-priority; a large collection's members count as keys, "
                        "a part of 1,000 costing Redis about what 1,000 keys do; default: no cap)")
    g.add_argument("--scan-each-priority", action="store_true",
                   help="SCAN the keyspace again for each priority's batches and validation (8 passes) instead of "
                        "once: by default the first priority's SCAN keeps every key's name in a spool in PostgreSQL "
                        "(dropped when the run completes or is rolled back) that the later passes read, so a key "
                        "written after that first pass is not migrated by this run: `migrator verify` reports it "
                        "missing, `migrator follow` (or a second run) migrates it. With this flag a later priority "
                        "also takes the keys written before its own pass, at about three times the Redis CPU")
    g.add_argument("--validation", choices=VALIDATIONS, default="sealed",
                   help="how each priority is validated before the next one starts. sealed (default): its keys "
                        "are counted (from the spool: no value is read) and its rows checked against what its "
                        "batches wrote: every row carries a seal of what was sent, which any later change to the "
                        "row takes away, and each batch records how many rows it sealed and their sum; one "
                        "statement per table compares them. Should anything differ (a row changed, deleted or "
                        "added since, a row two keys give), every key of the priority is read again and compared "
                        "instead, and that decides. reread: every key is read again from Redis, transformed and "
                        "compared with its rows, as `migrator verify` does: independent of what the batches "
                        "recorded, at about twice the run's Redis reads and a third more of its PostgreSQL CPU. "
                        "`migrator verify RUN` re-reads every key whichever was chosen")
    g.add_argument("--source-timezone", default="UTC", help="zone of the app's naive datetimes (default UTC)")
    g.add_argument("--count-tolerance", type=float, default=0.01,
                   help="validation: how many more source keys a fresh count may find than the batches scanned, and "
                        "how many rows the verification may find missing or without a key, as a fraction of each "
                        "pattern's keys (live traffic the run cannot see; raise it while the app writes; default 0.01)")
    g.add_argument("--max-dead-ratio", type=float, default=0.001,
                   help="validation: a pattern whose dead letters are more than this share of its keys and more "
                        "than --max-dead-keys fails its priority (a systematic fault; default 0.001, i.e. 0.1%%)")
    g.add_argument("--max-dead-keys", type=int, default=10,
                   help="validation: dead letters a pattern may always have, whatever its size (default 10)")
    g.add_argument("--continue-on-error", action="store_true",
                   help="go on to the next priority even when a batch failed (dead letters never stop a run)")
    g.add_argument("--no-rollback", action="store_true",
                   help="keep what a failed run wrote instead of rolling it back (not recommended)")
    g.add_argument("--json", action="store_true", help="print the final report as JSON")
    g.add_argument("--output-dir", type=_output_dir, default=Path("."),
                   help="where migration_<run>.log and migration_report_<run>.json go (default: here)")


def _options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        batch_size=args.batch_size, scan_count=args.scan_count, dry_run=args.dry_run,
        priorities=tuple(args.priority or ()), tables=tuple(args.table), patterns=tuple(args.pattern),
        continue_on_error=args.continue_on_error, rollback_on_failure=not args.no_rollback,
        max_value_bytes=args.max_value_bytes, source_timezone=args.source_timezone, ranges=args.ranges,
        count_tolerance=args.count_tolerance, max_keys_per_sec=args.max_keys_per_sec,
        max_dead_ratio=args.max_dead_ratio, max_dead_keys=args.max_dead_keys,
        scan_each_priority=args.scan_each_priority, validation=args.validation,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="migrator", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    parser.add_argument("--version", action="version", version=f"migrator {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="preflight: settings, connections, versions, schema, privileges, broker, workers",
                       description="One line per check: OK, WARN or FAIL, and the fix. Exit 1 when any check fails.")
    p.set_defaults(handler=lambda a, s: commands.cmd_check(s, registry.load(a.mapping), need_workers=not a.no_workers,
                                                           timeout=a.timeout, as_json=a.json))
    _connection_flags(p)
    p.add_argument("--no-workers", action="store_true", help="do not ask for workers (a --local run needs none)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the broker and workers")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("init-db", help="create or update the target schema and run ledger (idempotent)")
    p.set_defaults(handler=lambda a, s: commands.cmd_init_db(s, registry.load(a.mapping)))
    _connection_flags(p)

    p = sub.add_parser("backup", help="pg_dump of the target and a Redis RDB snapshot, before anything is written",
                       description="Writes <mapping>_pre_migration_<ts>.sql and redis_backup_<ts>.rdb (one per master "
                                   "of a cluster), checks both, and prints how to restore them.")
    p.set_defaults(handler=lambda a, s: commands.cmd_backup(s, registry.load(a.mapping), a.dir))
    _connection_flags(p)
    p.add_argument("--dir", type=Path, default=Path("."), help="where the files go (default: here)")

    p = sub.add_parser("audit", help="phase 1: one SCAN pass: keys, types, memory, TTLs, unmapped keys, the mapping's own tallies",
                       description="Writes redis_audit_report_<ts>.json and shows it as a table. Exit 1 when a stop "
                                   "condition of the guide holds (over 50,000 premium users, over 2 GB of memory).")
    p.set_defaults(handler=lambda a, s: commands.cmd_audit(s, registry.load(a.mapping), show_pii=a.show_pii,
                                                           memory_sample=a.memory_sample, scan_count=a.scan_count,
                                                           output_dir=a.output_dir, as_json=a.json))
    _connection_flags(p)
    p.add_argument("--show-pii", action="store_true", help="do not mask emails and IPs in examples (the file too!)")
    p.add_argument("--memory-sample", type=int, default=1000, help="keys asked MEMORY USAGE (default 1000)")
    p.add_argument("--scan-count", type=int, default=1000)
    p.add_argument("--output-dir", type=_output_dir, default=Path("."))
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("mapping", help="phase 2: write redis_postgres_mapping_<ts>.json from the declarative mapping; "
                                       "--init: a starting mapping file from the live keyspace")
    p.set_defaults(handler=_mapping)
    _connection_flags(p)
    p.add_argument("--init", nargs="?", type=Path, const=Path("mapping.toml"), metavar="PATH",
                   help="audit the keyspace (REDIS_URL) and write a starting mapping file (default mapping.toml): one "
                        "[[pattern]] per key shape with its type, columns guessed from an example; see "
                        "docs/mapping-file.md")
    p.add_argument("--force", action="store_true", help="with --init: overwrite the file if it exists")
    p.add_argument("--audit-dir", type=Path, default=Path("."), help="where to find the latest audit (for volumes)")
    p.add_argument("--output-dir", type=_output_dir, default=Path("."))
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("run", help="migrate the keyspace", description=(
        "Migrate priority by priority (critical, high, medium, low). Prints the run id, then the balance per "
        "pattern: scanned = migrated + skipped + dead + expired. Exit 0 when the run completed and balances, 1 "
        "when it failed, 2 when it could not start (nothing is planned for an unknown --pattern or --table)."))
    p.set_defaults(handler=_run)
    _connection_flags(p)
    p.add_argument("--local", action="store_true",
                   help="run the batches on this machine instead of on Celery workers (no broker; see --jobs)")
    _jobs_flag(p)
    p.add_argument("--detach", action="store_true", help="send the run to the workers and return (Celery runs)")
    _metrics_flag(p)
    p.add_argument("--validate-only", action="store_true",
                   help="migrate nothing: validate the latest run again (with --priority: those priorities)")
    _run_flags(p)

    p = sub.add_parser("follow", help="keep PostgreSQL current from the source's keyspace notifications, after the bulk "
                                      "load and until cutover, with no change to the app",
                       description="Subscribes to the keyspace notifications (of each master of a cluster) and applies "
                                   "every changed key as a run writes it (its value now: a burst is one write), and "
                                   "its rows' deletion or expiry by each table's on_delete. Every connection, and "
                                   "every --reconcile-every seconds, compares the keyspace with its rows and applies "
                                   "again what the events missed. A session is a run of its own: `migrator status "
                                   "ID` shows its lag, `migrator rollback ID` undoes it. Stop it with Ctrl-C or "
                                   "SIGTERM: it applies what is pending, then ends. Exit 0 ended with every change "
                                   "applied, 1 not, 2 could not start (notify-keyspace-events lacking: the fix named).")
    p.set_defaults(handler=lambda a, s: commands.cmd_follow(s, registry.load(a.mapping), spec=registry.requested(a.mapping),
                                                            local=a.local, jobs=a.jobs or 2,
                                                            configure=a.configure, reconcile_every=a.reconcile_every,
                                                            output_dir=a.output_dir))
    _connection_flags(p)
    p.add_argument("--output-dir", type=_output_dir, default=Path("."),
                   help="on a terminal: where follow_<session>.log (its log lines) goes")
    p.add_argument("--local", action="store_true", help="apply here instead of on the Celery workers (no broker)")
    p.add_argument("--jobs", "-j", type=_jobs, metavar="N",
                   help="batches of changed keys applied at once (default 2: a large value holds up its own batch "
                        "alone)")
    p.add_argument("--configure", action="store_true",
                   help="turn on the notify-keyspace-events classes follow needs (CONFIG SET), keeping the others")
    p.add_argument("--reconcile-every", type=float, default=600.0, metavar="S",
                   help="seconds between reconciliations (besides one on every connection; default 600)")
    _metrics_flag(p)

    p = sub.add_parser("status", help="live progress of a run, from the ledger")
    p.set_defaults(handler=lambda a, s: commands.cmd_status(s, a.run_id, as_json=a.json, watch_it=a.watch))
    _connection_flags(p)
    p.add_argument("run_id")
    p.add_argument("--watch", action="store_true", help="redraw until the run ends")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("batches", help="the batches of a run: range, status, attempts, counts, error")
    p.set_defaults(handler=lambda a, s: commands.cmd_batches(s, a.run_id, failed_only=a.failed, stale_only=a.stale,
                                                             as_json=a.json))
    _connection_flags(p)
    p.add_argument("run_id")
    p.add_argument("--failed", action="store_true",
                   help="only batches that failed, or are stale (running, but their worker stopped heartbeating)")
    p.add_argument("--stale", action="store_true", help="only stale batches")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("requeue", help="send batches to the workers again (after fixing what made them fail)")
    p.set_defaults(handler=lambda a, s: commands.cmd_requeue(s, a.run_id, a.batch or [], a.mapping))
    _connection_flags(p)
    p.add_argument("run_id")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--batch", type=int, action="append", help="batch id from `migrator batches` (repeatable)")
    which.add_argument("--failed", action="store_true", help="every failed or stale batch of the run")

    p = sub.add_parser("resume", help="carry a run on from the ledger (after the coordinator or the broker was lost)",
                       description="Re-sends the first priority that has not validated, with exactly its unfinished "
                                   "batches. With --local, runs them here instead (a `run --local` that was "
                                   "killed), then prints the report like `run`.")
    p.set_defaults(handler=lambda a, s: commands.cmd_resume(s, a.run_id, a.mapping, local=a.local, jobs=a.jobs,
                                                            as_json=a.json, output_dir=a.output_dir))
    _connection_flags(p)
    p.add_argument("run_id")
    p.add_argument("--local", action="store_true", help="carry the run on here (see --jobs) instead of on the workers")
    _jobs_flag(p)
    p.add_argument("--json", action="store_true", help="with --local: print the final report as JSON")
    p.add_argument("--output-dir", type=_output_dir, default=Path("."), help="with --local: where the report goes")

    p = sub.add_parser("report", help="the per-pattern balance of a run, timings and monitoring figures")
    p.set_defaults(handler=lambda a, s: commands.cmd_report(s, a.run_id, a.mapping, as_json=a.json,
                                                            output_dir=a.output_dir, html=a.html))
    _connection_flags(p)
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true")
    p.add_argument("--html", action="store_true",
                   help="also write migration_report_<run>.html: one self-contained file with the balance, dead "
                        "letters by reason, the verdicts, and charts of throughput over time and the time split")
    p.add_argument("--output-dir", type=_output_dir, default=Path("."), help="where migration_report_<run>.json goes")

    p = sub.add_parser("validate", help="judge a run again, now: the checks it got as it ran, over a new full "
                                        "verification; exit 1 on FAIL",
                       description="Per priority: batches done, balance, dead letters within budget, a fresh source "
                                   "count, and a full verification (see `migrator verify`); then the run's figures "
                                   "(orphans within budget). The same checks the run itself made: they agree. A role "
                                   "that may not write the ledger (migrator_report) validates without recording.")
    p.set_defaults(handler=lambda a, s: commands.cmd_validate(s, a.run_id, a.mapping, a.priority, as_json=a.json,
                                                              local=a.local, jobs=a.jobs,
                                                              max_keys_per_sec=a.max_keys_per_sec))
    _connection_flags(p)
    p.add_argument("run_id", nargs="?", help="default: the latest run")
    p.add_argument("--priority", choices=[x.label for x in Priority], action="append", default=[])
    _where_flags(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("verify", help="compare every key of a run's mapping with its rows in PostgreSQL; exit 1 on "
                                      "any difference", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=VERIFY_DESCRIPTION)
    p.set_defaults(handler=lambda a, s: commands.cmd_verify(s, a.run_id, a.mapping, a.priority, as_json=a.json,
                                                            local=a.local, jobs=a.jobs, show_diffs=a.show_diffs,
                                                            output_dir=a.output_dir, max_keys_per_sec=a.max_keys_per_sec,
                                                            strict=a.strict))
    _connection_flags(p)
    p.add_argument("--output-dir", type=_output_dir, default=Path("."),
                   help="on a terminal: where verification_<run>.log (its log lines) goes")
    p.add_argument("run_id", nargs="?", help="default: the latest run")
    p.add_argument("--priority", choices=[x.label for x in Priority], action="append", default=[],
                   help="only the patterns of this priority (repeatable); default: every priority of the run")
    _where_flags(p)
    p.add_argument("--show-diffs", type=int, default=0, metavar="N",
                   help="for up to N rows per pattern that differ, each differing column as PostgreSQL holds it and as "
                        "Redis gives it now (masked)")
    p.add_argument("--strict", action="store_true",
                   help="before a cutover: rows behind what their key holds now (changed since the run, which is "
                        "otherwise no difference) make it STALE, exit 1")
    p.add_argument("--json", action="store_true",
                   help='{"run_id", "verdict", "missing", "different", "extra", "patterns": [...]}')

    p = sub.add_parser("rollback", help="undo a run exactly: delete what it inserted, restore what it changed",
                       description="Refused while the run is running (stop it with `migrator cancel RUN --rollback`). "
                                   "A rollback that fails leaves the run `rollback_failed` with the error in `migrator "
                                   "status`; fix the cause and run it again. Exit 0 rolled back, 1 the rollback failed, "
                                   "2 refused.")
    p.set_defaults(handler=lambda a, s: commands.cmd_rollback(s, a.run_id, a.mapping))
    _connection_flags(p)
    p.add_argument("run_id")

    p = sub.add_parser("cancel", help="stop a running run: no batch of it starts or commits from now; then, with "
                                      "--rollback, undo it",
                       description="The run becomes `cancelling`: its queued batches are revoked, running ones stop at "
                                   "their next sub-batch (nothing of theirs commits), and it ends `cancelled` with what "
                                   "it committed before kept. Then `migrator rollback RUN` undoes it, or `migrator "
                                   "resume RUN` carries it on.")
    p.set_defaults(handler=lambda a, s: commands.cmd_cancel(s, a.run_id, a.mapping, rollback=a.rollback,
                                                            wait_s=a.wait))
    _connection_flags(p)
    p.add_argument("run_id")
    p.add_argument("--rollback", action="store_true", help="roll the run back once it has stopped")
    p.add_argument("--wait", type=float, default=120.0, metavar="S",
                   help="seconds to wait for running batches to stop (default 120; past it they cannot commit anyway)")

    p = sub.add_parser("parity", help="shadow-read parity per operation (DUAL_WRITE with shadow reads on)")
    p.set_defaults(handler=lambda a, s: commands.cmd_parity(s, a.hours, as_json=a.json))
    _connection_flags(p)
    p.add_argument("--hours", type=float, default=24.0, help="window (default 24 h)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("cutover", help="switch the app's reads to PostgreSQL, refused unless validated and at parity",
                       description="Sets the strategy the app's DualWriteService follows. Refused unless the latest "
                                   "run completed with every priority validated, no repair is pending, and: while a "
                                   "`migrator follow` session runs, its lag is under --max-lag and its last "
                                   "reconciliation clean; else each operation's shadow-read parity is at least "
                                   "--min-parity over --min-reads reads.")
    p.set_defaults(handler=lambda a, s: commands.cmd_cutover(s, registry.load(a.mapping), None if a.back else a.to, min_parity=a.min_parity,
                                                             min_reads=a.min_reads, hours=a.hours, max_lag=a.max_lag))
    _connection_flags(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--to", choices=["postgres-primary", "postgres-only"])
    which.add_argument("--back", action="store_true", help="back to dual_write (Redis answers); always allowed")
    p.add_argument("--min-parity", type=float, default=0.999)
    p.add_argument("--min-reads", type=int, default=100)
    p.add_argument("--hours", type=float, default=24.0)
    p.add_argument("--max-lag", type=float, default=1.0, metavar="S",
                   help="while a `migrator follow` session is the sync path: its most lag allowed (default 1 s); it "
                        "then stands for parity, with its last reconciliation clean")

    p = sub.add_parser("health", help="both stores: up, latency, the strategy in force, pending repairs")
    p.set_defaults(handler=lambda a, s: commands.cmd_health(s, as_json=a.json))
    _connection_flags(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("seed-demo", help="write the mapping's demo keyspace into Redis (a mapping that brings one)")
    p.set_defaults(handler=lambda a, s: commands.cmd_seed_demo(s, registry.load(a.mapping), a.users, fresh=a.fresh, malformed=a.malformed))
    _connection_flags(p)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--malformed", type=int, default=0, help="also write this many hostile keys")
    p.add_argument("--fresh", action="store_true", help="FLUSH the Redis database first")

    p = sub.add_parser("demo", help="seed a demo keyspace into its own Redis DB, migrate it into its own database, report",
                       description="Uses Redis DB --redis-db (flushed!) on the REDIS_URL server and the PostgreSQL "
                                   "database --database (created if missing, its tables emptied!) on the DATABASE_URL "
                                   "server.")
    p.set_defaults(handler=_demo)
    _connection_flags(p)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--redis-db", type=int, default=15, help="demo Redis database number, flushed (default 15)")
    p.add_argument("--database", default="migrator_demo", help="demo PostgreSQL database (default migrator_demo)")
    _run_flags(p)
    return parser


def _metrics_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on this port while the command runs (0: a free one, logged); "
                        "see the README's metrics section")


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.validate_only:
        return commands.cmd_validate(settings, None, args.mapping, args.priority or [], as_json=args.json,
                                     local=args.local, jobs=args.jobs)
    spec, mapping = registry.requested(args.mapping), registry.load(args.mapping)
    return commands.cmd_run(settings, mapping, _options(args), spec=spec, local=args.local, jobs=args.jobs,
                            detach=args.detach, as_json=args.json, output_dir=args.output_dir)


def _mapping(args: argparse.Namespace, settings: Settings) -> int:
    if args.init is not None:
        return commands.cmd_mapping_init(settings, args.init, force=args.force)
    return commands.cmd_mapping(registry.load(args.mapping), audit_dir=args.audit_dir, output_dir=args.output_dir,
                                as_json=args.json)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    redis_url = urlunsplit(urlsplit(settings.redis_url)._replace(path=f"/{args.redis_db}"))
    demo = Settings(redis_url, settings.database_url, settings.broker_url)
    return commands.cmd_demo(demo, registry.load(args.mapping), args.users, args.database, _options(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure(level=args.log_level)
    settings = Settings.from_env(*(getattr(args, f, None) for f in ("redis_url", "database_url", "broker_url")))
    try:
        if getattr(args, "metrics_port", None) is not None:
            metrics.serve(args.metrics_port, settings.postgres)
        return args.handler(args, settings)
    except (ConfigError, LookupError, ValueError) as exc:
        print(f"migrator: {exc}", file=sys.stderr)
        return commands.CANNOT_START
    except (psycopg2.Error, redis.RedisError, *BROKER_ERRORS) as exc:  # a service failed mid-command: one line
        print(f"migrator: {service_failure(settings, exc)}", file=sys.stderr)
        return commands.FAILED


if __name__ == "__main__":
    sys.exit(main())
