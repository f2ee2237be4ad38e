"""Cost per key by process, throughput, memory and source impact of the migrator, each against a
yardstick measured in the same run.

    .venv/bin/python scripts/bench.py                       # 1,000,000 keys
    .venv/bin/python scripts/bench.py --sizes 100000,300000,1000000 --readme
    .venv/bin/python scripts/bench.py --keys 100000 --only follow  # follow alone (after a run of its rows)
    .venv/bin/python scripts/bench.py --keys 100000 --only local   # the run alone against its floors

Starts a redis-server of its own (unless --redis-url names one), seeds the demo keyspace (every
pattern) into it and migrates it into a throwaway database, then measures side by side:
  floor   one plain process: SCAN COUNT 1000, pipelined TYPE+PTTL then GET/HGETALL/SMEMBERS/ZRANGE,
          JSON parsing, COPY of the parsed records into a plain table; no transforms (the yardstick)
  seed    one read per key, one INSERT per row, a commit every 100 rows (on a sample, extrapolated)
  local   `migrator run --local` (its default --jobs 2: two batches at once, in two forked processes)
  verify  `migrator verify RUN --local` of local's run: every key read again and compared with its rows
  follow  `migrator follow --local` while distinct keys are rewritten at 5,000 changes/s
  PostgreSQL's same-work floor: the rows local's run wrote, written again into the same tables by
          COPY into unlogged staging and one INSERT ... ON CONFLICT per table, with the journal
          trigger, with the seal trigger (each alone, in a session set as a run's write is), without
          the upsert, secondary indexes or WAL (scripts/costs.py), each the least of 3 rounds (--rounds)
  workers `migrator run` (the coordinator) through 1 and 2 Celery workers, started as the README starts
          one (Celery's default pool, prefork) and sharing this machine's cores: a pool process per
          core in all (`-c` cores / workers)
Each mode but verify and the hostile run runs 3 times (--rounds), as each same-work variant does, and
its row is its run with the least CPU in all: load from elsewhere only ever adds, and runs of the same
code moved by a quarter. The headline is the CPU each mode cost per key, by process: its own,
PostgreSQL (the backends of its database only), Redis (its own server) and the broker; throughput
moves with a shared machine's load, cost per key much less. Beside it keys/s, the ratios to the floor and to the
seed's approach, Redis calls per key, peak RSS, and where the migrator's time went (from the
ledger's per-batch timings); the bars' verdicts; the capacity model's predictions for 1 and 2
workers beside the measured keys/s, and its projection past one machine (scripts/capacity.py,
docs/capacity.md). Then the p50/p99 latency of an app-like load on the same Redis server while
nothing runs, while `run --local` runs unthrottled, and with --max-keys-per-sec.
With --sizes, all of it per size and a table of how cost grows; --readme puts the tables in
README.md and the model's in docs/capacity.md, between their bench markers.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import orjson
import psycopg2
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from migrator.apps.threadr.demo import GIANT_THREAD_BYTES, WIDE_MEMBERS, seed_demo, seed_hostile, write_large_thread, write_large_timeseries  # noqa: E402
from migrator.core import ledger  # noqa: E402
from migrator.core.log import configure  # noqa: E402
from migrator.core.source import CHUNK_READ_MEMBERS  # noqa: E402
from migrator.core.partition import plan_ranges  # noqa: E402
from migrator.core.schema import database_url_for, ensure_database, init_db, written_tables  # noqa: E402
from migrator.apps.threadr import THREADR  # noqa: E402
import capacity  # noqa: E402
from capacity import Costs  # noqa: E402
from costs import ROUNDS, BackendCpu, PrivateRedis, redis_calls, redis_cpu, same_work_floor, snapshot  # noqa: E402

KEYS_PER_USER = 13.9  # what the demo generator writes per user
READ = {"string": "get", "hash": "hgetall", "set": "smembers", "zset": "zrange", "list": "lrange"}


def _value(raw: object) -> str:
    """A read reply as text for COPY: JSON parsed (and re-serialised) when it is JSON."""
    if isinstance(raw, bytes):
        try:
            return orjson.dumps(orjson.loads(raw)).decode()
        except orjson.JSONDecodeError:
            return raw.decode("utf-8", "backslashreplace")
    if isinstance(raw, dict):
        return orjson.dumps({k.decode(): v.decode("utf-8", "backslashreplace") for k, v in raw.items()}).decode()
    return orjson.dumps([m[0].decode() if isinstance(m, tuple) else m.decode() for m in raw]).decode()


def _copy_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def mode_floor(redis_url: str, database_url: str) -> dict:
    client, conn = redis.Redis.from_url(redis_url), psycopg2.connect(database_url)
    with conn, conn.cursor() as cur:
        # not vacuumed: a vacuum of its million rows would run, and count, during the next mode
        cur.execute("DROP TABLE IF EXISTS floor_kv; CREATE TABLE floor_kv (key text, value text, pttl bigint)"
                    " WITH (autovacuum_enabled = false)")
    started, keys, cursor = time.perf_counter(), 0, 0
    while True:
        cursor, batch = client.scan(cursor, count=1000)
        if batch:
            pipe = client.pipeline(transaction=False)
            for key in batch:
                pipe.type(key)
                pipe.pttl(key)
            meta = pipe.execute()
            pipe = client.pipeline(transaction=False)
            for key, rtype in zip(batch, meta[::2]):
                method = READ.get(rtype.decode(), "exists")
                getattr(pipe, method)(key, *((0, -1) if method in ("zrange", "lrange") else ()))
            values = pipe.execute(raise_on_error=False)
            buf = io.StringIO()
            for key, raw, pttl in zip(batch, values, meta[1::2]):
                if raw is not None and not isinstance(raw, Exception):
                    buf.write(f"{_copy_text(key.decode('utf-8', 'backslashreplace'))}\t{_copy_text(_value(raw))}\t{pttl}\n")
            buf.seek(0)
            with conn, conn.cursor() as cur:
                cur.copy_expert("COPY floor_kv FROM STDIN", buf)
            keys += len(batch)
        if cursor == 0:
            break
    return {"keys": keys, "seconds": time.perf_counter() - started}


def mode_seed(redis_url: str, database_url: str, sample: int) -> dict:
    """The seed scripts' way: one GET per key, one INSERT per row, 100 rows per transaction."""
    client, conn = redis.Redis.from_url(redis_url), psycopg2.connect(database_url)
    with conn, conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS seed_kv; CREATE TABLE seed_kv (key text PRIMARY KEY, value text, pttl bigint)"
                    " WITH (autovacuum_enabled = false)")
    keys = [k for _, k in zip(range(sample), client.scan_iter(count=1000))]
    started = time.perf_counter()
    cur = conn.cursor()
    for i, key in enumerate(keys, 1):
        rtype = client.type(key).decode()
        method = READ.get(rtype, "exists")
        raw = getattr(client, method)(key, *((0, -1) if method in ("zrange", "lrange") else ()))
        cur.execute("INSERT INTO seed_kv VALUES (%s, %s, %s) ON CONFLICT (key) DO NOTHING",
                    (key.decode("utf-8", "backslashreplace"), _value(raw) if raw is not None else None, client.pttl(key)))
        if i % 100 == 0:
            conn.commit()
    conn.commit()
    return {"keys": len(keys), "seconds": time.perf_counter() - started, "sampled": True}


def _vm_hwm_kb(pid: int) -> int:
    """Peak RSS of a process since its exec (VmHWM), in KB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _peak_rss_of_group(pgid: int) -> float:
    """The largest peak RSS among the processes of a process group, in MB."""
    peak = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.getpgid(int(pid)) == pgid:
                    peak = max(peak, _vm_hwm_kb(int(pid)))
            except ProcessLookupError:
                continue
    return round(peak / 1024, 1)


def _cpu_of(wanted: Callable[[str, int], bool]) -> float:
    """CPU seconds of the processes `wanted(name, process group)` picks, with the children they reaped
    (a PostgreSQL backend's time moves to the postmaster when it exits, so the sum is steady)."""
    total = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
            if wanted(name, int(fields[2])):
                total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def _groups_cpu(leaders: Sequence[int]) -> float:
    """CPU seconds of every process in the process groups these processes lead (each started in a session
    of its own): a worker's pool processes with it."""
    return _cpu_of(lambda _, group: group in leaders) if leaders else 0.0


def _cpu_now(args: argparse.Namespace, running: Sequence[int]) -> dict[str, Any]:
    """CPU seconds so far: of the mode (this process's reaped children, and the process groups of the
    `running` processes it started before), of PostgreSQL (the backends of the bench's database), of
    Redis (the bench's own server, unless --redis-url named one) and of the broker (RabbitMQ); and the
    Redis server's calls per command."""
    own = resource.getrusage(resource.RUSAGE_CHILDREN)
    with redis.Redis.from_url(args.redis_url) as client:
        redis_spent, calls = redis_cpu(client), redis_calls(client)
    return {"mode": own.ru_utime + own.ru_stime + _groups_cpu(running),
            "postgresql": args.pg_cpu.total(),
            "redis": redis_spent,
            "broker": _cpu_of(lambda name, _: name == "beam.smp"),
            "calls": calls}


def _with_cpu(args: argparse.Namespace, run: Callable[[], dict], running: Sequence[int] = ()) -> dict:
    """A mode's result with the CPU seconds it cost each part of the machine while it ran
    (`running`: processes already up, e.g. workers, whose start-up is not the run's), and the Redis
    commands it sent."""
    before = _cpu_now(args, running)
    result = run()
    after = _cpu_now(args, running)
    calls_before, calls_after = before.pop("calls"), after.pop("calls")
    # (never below 0: a server process of someone else's that exits meanwhile takes its CPU with it)
    result["cpu"] = {k: round(max(0.0, after[k] - before[k]), 2) for k in before}
    result["redis_calls"] = {c: n - calls_before.get(c, 0) for c, n in calls_after.items() if n > calls_before.get(c, 0)}
    return result


def _measured(command: list[str], **popen: object) -> tuple[int, bytes, float]:
    """Run `command`: its exit status, stdout and the peak RSS in MB of its largest process (its
    own, or a lane's it forked). Sampled from /proc while it runs: rusage would also count the
    pages of this (large, after seeding) process it was forked from."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=ROOT, start_new_session=True, **popen)
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()))
    reader.start()
    peak, ticks = 0.0, 0
    while proc.poll() is None:
        # its own peak often; its lanes' (a walk through /proc) now and then, as they live long
        peak = max(peak, _vm_hwm_kb(proc.pid) / 1024, _peak_rss_of_group(proc.pid) if ticks % 10 == 0 else 0)
        ticks += 1
        time.sleep(0.05)
    reader.join()
    return proc.returncode, out[0], round(peak, 1)


def _env(args: argparse.Namespace) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": args.redis_url, "DATABASE_URL": args.database_url}


def _migrator(args: argparse.Namespace, *flags: str) -> dict:
    """`migrator run --json ...` as a child: its report, its run's seconds (planning to the last
    validation, from the ledger: without interpreter start-up and the final report), peak RSS."""
    _, out, peak = _measured([sys.executable, "-m", "migrator.cli.main", "--log-level", "WARNING", "run", "--json",
                              "--output-dir", args.work_dir, *flags], env=_env(args), stderr=subprocess.DEVNULL)
    text = out.decode()
    report = json.loads(text[text.index("{"):])
    if report["status"] != "completed" or not report["balanced"]:
        raise SystemExit(f"bench: migrator run {' '.join(flags)} ended {report['status']}, balanced={report['balanced']}: "
                         f"{report['error']}")
    return {"keys": report["totals"]["scanned"], "seconds": report["figures"]["wall_clock_s"], "peak_rss_mb": peak,
            "stages": report["stage_seconds"], "run_id": report["run_id"]}


def mode_verify(args: argparse.Namespace, run_id: str) -> dict:
    """`migrator verify RUN --local` (its default --jobs 2) of a run: every key compared with its
    rows; its seconds from the ledger (planned to finished), as the run's are."""
    _, out, peak = _measured([sys.executable, "-m", "migrator.cli.main", "--log-level", "WARNING", "verify", run_id,
                              "--local", "--json"], env=_env(args), stderr=subprocess.DEVNULL)
    result = json.loads(out.decode())
    if result["verdict"] != "clean":
        raise SystemExit(f"bench: migrator verify {run_id} found {result['verdict']}: {result.get('error')}")
    conn = psycopg2.connect(args.database_url)
    with conn, conn.cursor() as cur:
        found = ledger.get_verification(cur, result["verification_id"])
    conn.close()
    seconds = (found["finished_at"] - found["created_at"]).total_seconds()
    return {"keys": result["totals"]["keys"], "seconds": seconds, "peak_rss_mb": peak}


def pool_processes(workers: int) -> int:
    """Each worker's pool processes when `workers` of them share this machine: a batch per core in all,
    as one worker per host runs by default."""
    return max(1, (os.cpu_count() or 1) // workers)


def mode_workers(args: argparse.Namespace, workers: int, *flags: str, rounds: int = 1) -> dict:
    """`migrator run <flags>` (the coordinator, in its own process) through `workers` Celery worker processes,
    the least of `rounds` runs (the tables emptied before each; the workers' start-up is not the run's)."""
    from celeryconfig import PRIORITY_QUEUES  # after main() chose this run's queue prefix

    queues = ",".join(PRIORITY_QUEUES.values())
    # each worker as the README starts one, Celery's default pool (a process group of its own, counted
    # whole: _cpu_now), the workers sharing this machine's cores: a batch per core in all
    procs = [subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", queues,
                               "-c", str(pool_processes(workers)), "-n", f"bench{i}-{os.getpid()}@%h", "--without-gossip",
                               "--without-mingle", "--loglevel", "WARNING"], cwd=ROOT, env=_env(args),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
             for i in range(workers)]
    try:
        from workers.celery import app
        deadline = time.monotonic() + 60
        with app.connection_for_write() as conn:  # a new one: the pool's may have idled out since the last mode
            while len(app.control.ping(timeout=0.5, connection=conn) or []) < workers and time.monotonic() < deadline:
                pass
        result = _least_of(rounds, lambda: _with_cpu(args, lambda: _migrator(args, *flags), [p.pid for p in procs]),
                           before=lambda: _truncate(args.database_url))
        result["coordinator_rss_mb"] = result.pop("peak_rss_mb")
        result["worker_peak_rss_mb"] = max(_peak_rss_of_group(p.pid) for p in procs)
        return result
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(60)


WRITTEN = written_tables(THREADR)  # the mapping's tables and the legacy id map
TRUNCATED = [*WRITTEN, "migration_journal"]


def _truncate(database_url: str) -> None:
    conn = psycopg2.connect(database_url)
    with conn, conn.cursor() as cur:
        cur.execute("TRUNCATE " + ", ".join(TRUNCATED))
    conn.close()


LARGE_VALUE_MIB = (1, 64)
# A worker's peak over the hostile keyspace, at most: 300 MB for the rest (collections of a
# million members included), plus about three times its largest value (64 MiB) while that one is
# in hand (read, parsed, and its row's document).
HOSTILE_RSS_MB = 300
LARGEST_VALUE_MB = GIANT_THREAD_BYTES // 2**20
SMALL_COLLECTION = 1_000  # members of the time series a large one is set against


def measure_alone(args: argparse.Namespace, client: redis.Redis, write: Callable[[redis.Redis, int], object],
                  sizes: Sequence[int]) -> dict[int, float]:
    """Peak RSS of `run --local --jobs 1` over a keyspace of one valid value written by `write`,
    per size: what a large value costs in memory, against a small one's in the same command."""
    peaks = {}
    for size in sizes:
        client.flushdb()
        _truncate(args.database_url)
        write(client, size)
        peaks[size] = _migrator(args, "--local", "--jobs", "1")["peak_rss_mb"]
    client.flushdb()
    _truncate(args.database_url)
    return peaks


def run_child(mode: str, args: argparse.Namespace) -> dict:
    """Run the floor or the seed's approach in a child process; its result plus its own peak RSS."""
    status, out, peak = _measured([sys.executable, __file__, "--child", mode, "--redis-url", args.redis_url,
                                   "--database-url", args.database_url, "--seed-sample", str(args.seed_sample)])
    if status != 0:
        raise SystemExit(f"bench mode {mode} failed")
    return {**json.loads(out.decode().strip().splitlines()[-1]), "peak_rss_mb": peak}


def app_load(redis_url: str, seconds: float, rate: int, out: "multiprocessing.Queue") -> None:
    """An app-like client: GET, INCR and SET with a TTL on its own keys, `rate` ops/s; op latencies in ms."""
    try:
        # The app runs on its own hosts in production; here it shares two cores with the run. At a
        # higher priority its requests are not kept waiting for a CPU, so the figures show what
        # Redis itself makes it wait (needs root or CAP_SYS_NICE; otherwise it is left as it is).
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except OSError:
        pass
    client = redis.Redis.from_url(redis_url)
    ops = (lambda n: client.get(f"app:session:{n}"), lambda n: client.incr(f"app:counter:{n}"),
           lambda n: client.set(f"app:session:{n}", b"x" * 200, ex=60))
    latencies, i, started = [], 0, time.perf_counter()
    try:
        while time.perf_counter() - started < seconds:
            t = time.perf_counter()
            ops[i % 3](i % 1000)
            latencies.append((time.perf_counter() - t) * 1000)
            i += 1
            time.sleep(max(0.0, started + i / rate - time.perf_counter()))
        client.flushdb()
    finally:
        out.put(sorted(latencies) or [float("nan")])


def latency_under(args: argparse.Namespace, flags: tuple[str, ...] | None) -> dict:
    """p50/p99 of the app-like load alone (flags None) or beside `migrator run --local <flags>`."""
    migration = None
    if flags is not None:
        _truncate(args.database_url)
        migration = subprocess.Popen([sys.executable, "-m", "migrator.cli.main", "--log-level", "WARNING", "run", "--local",
                                      "--output-dir", args.work_dir, *flags], cwd=ROOT, env=_env(args),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(2)  # past planning, into the reads
    queue: multiprocessing.Queue = multiprocessing.Queue()
    load_url = args.redis_url.rsplit("/", 1)[0] + "/4"  # same server, its own database
    proc = multiprocessing.Process(target=app_load, args=(load_url, args.latency_seconds, 1000, queue))
    proc.start()
    lat = queue.get()
    proc.join()
    if migration is not None:
        still_running = migration.poll() is None
        try:  # its lanes too: one left finishing its batch would commit rows into the next mode's tables
            os.killpg(migration.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        migration.wait()
        if not still_running:
            print("bench: the migration finished before the load did; raise --keys for a fair latency figure",
                  file=sys.stderr)
    pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3)
    return {"ops": len(lat), "p50_ms": pick(0.50), "p99_ms": pick(0.99), "max_ms": round(lat[-1], 3)}


FOLLOW_RATE = 5_000  # changes/s: follow's bar


def _string_keys(client: redis.Redis, wanted: int) -> list[tuple[bytes, bytes]]:
    """Up to `wanted` distinct string keys of migrated patterns, with their values."""
    found: list[tuple[bytes, bytes]] = []
    for key in client.scan_iter(count=1000):
        pattern, _ = THREADR.pattern_of(key.decode("utf-8", "backslashreplace"))
        if pattern is not None and pattern.migrated and client.type(key) == b"string":
            found.append((key, client.get(key)))
            if len(found) == wanted:
                break
    return found


def _follow_row(database_url: str, run_id: str) -> dict:
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT to_jsonb(f) FROM migration_follow f WHERE run_id = %s", (run_id,))
            row = cur.fetchone()
            return row[0] if row else {}
    finally:
        conn.close()


def mode_follow(args: argparse.Namespace) -> dict:
    """`migrator follow --local` after a run, while the app rewrites distinct string keys at
    FOLLOW_RATE changes/s for --follow-seconds (each one read, transformed and upserted again): the
    changes it applied per second, and its lag (as its session reports it, once a second) at worst
    and when the writes stopped."""
    client = redis.Redis.from_url(args.redis_url)
    changes = _string_keys(client, int(FOLLOW_RATE * args.follow_seconds))
    # follow --configure turns keyspace notifications on; they would cost Redis CPU in the modes after
    notify = client.config_get("notify-keyspace-events")["notify-keyspace-events"]
    log = open(Path(args.work_dir) / "follow.out", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "migrator.cli.main", "--log-level", "WARNING", "follow", "--local",
                             "--configure", *(("--jobs", str(args.follow_jobs)) if args.follow_jobs else ())], cwd=ROOT, env=_env(args), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        run_id, deadline = None, time.monotonic() + 120
        while run_id is None or not _follow_row(args.database_url, run_id).get("heartbeat_at"):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise SystemExit(f"bench: migrator follow did not start: {log.read()[-2000:]}")
            log.seek(0)
            run_id = next((line.split()[2].rstrip(":") for line in log if line.startswith("follow session ")), None)
            time.sleep(0.2)
        # past its first reconciliation (on connecting), so only the writes below are applied
        conn = psycopg2.connect(args.database_url)
        with conn, conn.cursor() as cur:
            while time.monotonic() < deadline:
                cur.execute("SELECT count(*) FROM migration_reconciliations WHERE run_id = %s AND finished_at IS NOT NULL",
                            (run_id,))
                if cur.fetchone()[0]:
                    break
                time.sleep(0.2)
        conn.close()
        lags: list[float] = []
        applied_before = _follow_row(args.database_url, run_id)["keys_applied"]

        def write() -> dict:
            started, tick = time.perf_counter(), 0.01
            per_tick = max(1, int(FOLLOW_RATE * tick))
            for i in range(0, len(changes), per_tick):
                pipe = client.pipeline(transaction=False)
                for key, value in changes[i:i + per_tick]:
                    pipe.set(key, value, keepttl=True)
                pipe.execute()
                if i // per_tick % 25 == 0:
                    lags.append(_follow_row(args.database_url, run_id)["lag_s"])
                time.sleep(max(0.0, started + (i // per_tick + 1) * tick - time.perf_counter()))
            wrote = time.perf_counter() - started
            at_end = _follow_row(args.database_url, run_id)
            while True:  # caught up: a figure written with nothing pending and every change applied
                row = _follow_row(args.database_url, run_id)
                if row["pending"] == 0 and row["keys_applied"] - applied_before >= len(changes):
                    break
                if time.perf_counter() - started > 120 + 10 * wrote:
                    raise SystemExit(f"bench: follow did not catch up: {row}")
                time.sleep(0.05)
            return {"keys": len(changes), "seconds": time.perf_counter() - started, "written_s": wrote,
                    "lag_max_s": max(lags + [at_end["lag_s"], row["lag_s"]]), "lag_end_s": at_end["lag_s"]}

        return _with_cpu(args, write, [proc.pid])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(90)
        log.close()
        client.config_set("notify-keyspace-events", notify)


def measure(args: argparse.Namespace, target_keys: int, first: bool, last: bool) -> dict:
    """Every mode on one keyspace of about `target_keys` keys; on the first size also a run of 2
    workers over the same keyspace made hostile, on the last the latency under load."""
    admin_url = os.environ.get("MIGRATOR_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"migrator_bench_{os.getpid()}"
    admin = psycopg2.connect(admin_url)
    ensure_database(admin, name)
    args.database_url = database_url_for(admin_url, name)
    out: dict = {"modes": {}}
    try:
        conn = psycopg2.connect(args.database_url)
        init_db(conn, THREADR)
        conn.close()
        args.pg_cpu = BackendCpu(args.database_url)
        client = redis.Redis.from_url(args.redis_url)
        client.flushdb()
        started = time.perf_counter()
        seed_demo(client, max(1, int(target_keys / KEYS_PER_USER)))
        out["keys"] = client.dbsize()
        print(f"seeded {out['keys']:,} keys in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        started, cpu = time.perf_counter(), redis_cpu(client)
        for _ in client.scan_iter(count=1000):
            pass
        out["scan_pass_s"] = time.perf_counter() - started
        out["scan_pass_redis_s"] = redis_cpu(client) - cpu
        out["ranges"] = len(plan_ranges(client))
        if args.only == "follow":  # the rows a run writes first, then follow alone
            _migrator(args, "--local")
            out["follow"] = mode_follow(args)
            client.flushdb()
            return out
        modes = out["modes"]
        out["rounds"] = args.rounds
        modes["floor"] = _least_of(args.rounds, lambda: _with_cpu(args, lambda: run_child("floor", args)))
        modes["seed"] = _least_of(args.rounds, lambda: _with_cpu(args, lambda: run_child("seed", args)))
        modes["local"] = _least_of(args.rounds, lambda: _with_cpu(args, lambda: _migrator(args, "--local")),
                                   before=lambda: _truncate(args.database_url))
        modes["verify (of local's run)"] = _with_cpu(args, lambda: mode_verify(args, modes["local"]["last_run_id"]))
        conn = psycopg2.connect(args.database_url)
        rows = snapshot(conn, WRITTEN)
        conn.close()
        if args.follow_seconds and not args.only:
            out["follow"] = mode_follow(args)
        out["pg_floor"] = same_work_floor(args.database_url, WRITTEN, rows, args.pg_cpu, TRUNCATED, args.rounds)
        del rows
        if args.only == "local":  # the run's own cost against its floors: no workers, latency or hostile keyspace
            client.flushdb()
            return out
        for n in (int(x) for x in args.workers.split(",") if x):
            modes[f"{n} worker{'s' if n > 1 else ''}"] = mode_workers(args, n, rounds=args.rounds)
        if last:
            # a quarter of what the unthrottled run touched per second (each key about 3 times: one SCAN
            # pass, 2 reads; the passes that read the spool take no token)
            touched = 3 * modes["local"]["keys"] / modes["local"]["seconds"]
            cap = args.throttle or max(100, int(touched / 4 / 100) * 100)
            # the load must end while the unthrottled run still reads
            args.latency_seconds = max(3.0, min(args.latency_seconds, modes["local"]["seconds"] - 4))
            out["latency"] = {"nothing else running": latency_under(args, None),
                              "`run --local`, unthrottled": latency_under(args, ()),
                              f"`run --local --max-keys-per-sec {cap}`": latency_under(args, ("--max-keys-per-sec", str(cap)))}
        if first and args.workers_hostile:  # on top of the keyspace measured so far
            hostile = seed_hostile(client, out["keys"], wide=args.wide)
            # hostile by design: a third of some patterns is broken, far beyond the dead-letter budget
            modes[f"2 workers, hostile (+{hostile['malformed']:,} malformed, 3 x 5 MB broken, 1 x 64 MiB thread, "
                  f"{args.wide:,}-member time series refused at its last, {args.wide:,} more stats counters)"] = \
                mode_workers(args, 2, "--max-dead-ratio", "1")
        if first:  # (each on a keyspace of its own)
            out["large_value"] = measure_alone(args, client, lambda c, mib: write_large_thread(c, mib * 1024 * 1024),
                                               LARGE_VALUE_MIB)
            out["large_collection"] = measure_alone(args, client, write_large_timeseries, (SMALL_COLLECTION, args.wide))
        client.flushdb()
    finally:
        if getattr(args, "pg_cpu", None):
            args.pg_cpu.close()
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()
    return out


def _per_key(r: dict, part: str) -> float:
    return r["cpu"][part] * 1e6 / r["keys"]


def _total(r: dict) -> float:
    return sum(r["cpu"].values()) * 1e6 / r["keys"]


def _least_of(rounds: int, measure_once: Callable[[], dict], before: Callable[[], None] = lambda: None) -> dict:
    """A mode measured `rounds` times (`before` each): its run with the least CPU per key in all. Load from
    elsewhere only ever adds, and one run of the same code moved by a quarter between runs, so the least
    is the mode's own cost, as the same-work floor's is the least of its rounds; the yardsticks and the
    migrator are measured alike. `runs`: every run's CPU per key in all and PostgreSQL's, in order (that
    bar takes the least of the latter); peak RSS the highest of the runs; `last_run_id` the last run's
    (the one whose rows the tables hold)."""
    results = []
    for _ in range(rounds):
        before()
        results.append(measure_once())
    best = dict(min(results, key=_total))
    best["runs"] = [{"total": _total(r), "postgresql": _per_key(r, "postgresql")} for r in results]
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
    if "run_id" in best:
        best["last_run_id"] = results[-1]["run_id"]
    return best


# Bars on costs per key, each against a yardstick of the same run (../shared/spec/architecture.md)
REDIS_BAR = 1.3  # the migrator's Redis CPU per key, at most this times the floor's
PG_BAR = 1.25  # its PostgreSQL CPU per key, at most this times the same-work floor's
TOTAL_BAR_US, QUIET_FLOOR_US = 40, 23  # total CPU per key of 2 workers, in the terms of a quiet machine's floor
FOLLOW_LAG_S = 1.0


def _pg_per_key(size: dict) -> dict[str, float]:
    """Each mode's PostgreSQL CPU per key: the least of its runs' (the same-work floor's is the least of
    its rounds), a mode run once its one run's."""
    return {m: min(run["postgresql"] for run in r["runs"]) if r.get("runs") else _per_key(r, "postgresql")
            for m, r in size["modes"].items()}


def _runs(r: dict, part: str) -> str:
    runs = [run[part] for run in r.get("runs", ())]
    return f" (the least of {len(runs)} runs: {', '.join(f'{x:.1f}' for x in runs)})" if len(runs) > 1 else " (one run)"


def render(size: dict) -> list[str]:
    """One size's results as markdown tables, notes and the bars' verdicts."""
    modes = size["modes"]
    floor = modes["floor"]["keys"] / modes["floor"]["seconds"]
    seed = modes["seed"]["keys"] / modes["seed"]["seconds"]
    lines = [f"keyspace {size['keys']:,} keys, {size['ranges']} cursor range(s); one bare SCAN pass "
             f"{size['scan_pass_s']:.2f} s", "",
             "| mode | keys | CPU µs per key: own + PostgreSQL + Redis + broker | keys/s | × floor | × seed | seconds "
             "| peak RSS MB | scan / read / transform / write s | Redis calls per key: SCAN, TYPE, all |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for mode, r in modes.items():
        rate = r["keys"] / r["seconds"]
        rss = (f"{r['coordinator_rss_mb']} coord., {r['worker_peak_rss_mb']} worker" if "worker_peak_rss_mb" in r
               else str(r["peak_rss_mb"]))
        st = r.get("stages")
        split = " / ".join(f"{st[k]:.1f}" for k in ("scan", "read", "transform", "write")) if st else ""
        note = " (sample, extrapolated)" if r.get("sampled") else ""
        cpu, calls = r["cpu"], r["redis_calls"]
        per_key = " + ".join(f"{_per_key(r, k):.1f}" for k in cpu) + f" = {sum(cpu.values()) * 1e6 / r['keys']:.1f}"
        scans = f"{calls.get('scan', 0) / r['keys']:.3f}, {calls.get('type', 0) / r['keys']:.2f}, " \
                f"{sum(calls.values()) / r['keys']:.2f}"
        lines.append(f"| {mode}{note} | {r['keys']:,} | {per_key} | {rate:,.0f} | {rate / floor:.2f} | {rate / seed:.1f} | "
                     f"{r['seconds']:.1f} | {rss} | {split} | {scans} |")
    several = {m: ", ".join(f"{run['total']:.1f}" for run in r["runs"]) for m, r in modes.items()
               if len(r.get("runs", ())) > 1}
    if several:
        lines += ["", f"Each mode ran {size['rounds']} times (verify and the hostile run once): its row is the run with the "
                  "least CPU in all, its peak RSS the highest of them. CPU µs per key in all of each run: "
                  + "; ".join(f"{m} {totals}" for m, totals in several.items()) + "."]
    migrators = [m for m in ("local", "2 workers", "1 worker") if m in modes]
    pg_floor = next(iter(size["pg_floor"].values())) * 1e6 / modes["local"]["keys"]
    lines += ["", f"Where PostgreSQL's time goes: the rows `run --local` wrote ({modes['local']['keys']:,} keys), written "
              f"again into the same tables, emptied first, with and without each part (the least of {size['rounds']} rounds each):", "",
              "| PostgreSQL writes the same rows | CPU µs per key | × same-work floor |", "|---|---:|---:|"]
    lines += [f"| {name} | {seconds * 1e6 / modes['local']['keys']:.1f} | "
              f"{seconds * 1e6 / modes['local']['keys'] / pg_floor:.2f} |" for name, seconds in size["pg_floor"].items()]
    spent = _pg_per_key(size)
    lines += [f"| the migrator: {m}{_runs(modes[m], 'postgresql')} | {spent[m]:.1f} | {spent[m] / pg_floor:.2f} |"
              for m in migrators]
    verified = next((m for m in modes if m.startswith("verify")), None)
    if verified:  # the run's validation compares every key with its rows too: this much of its cost
        lines.append(f"| {verified} alone (every run validates so) | {_per_key(modes[verified], 'postgresql'):.1f} | "
                     f"{_per_key(modes[verified], 'postgresql') / pg_floor:.2f} |")
    lines += ["", *_redis_levers(size)]
    verdicts = []
    yes = lambda ok: "yes" if ok else "NO"
    redis_floor = _per_key(modes["floor"], "redis")
    for m in migrators:
        ratio = _per_key(modes[m], "redis") / redis_floor
        verdicts.append(f"{m}: Redis CPU per key <= {REDIS_BAR}x the floor's: {yes(ratio <= REDIS_BAR)} ({ratio:.2f}x: "
                        f"{_per_key(modes[m], 'redis'):.1f} against {redis_floor:.1f} µs)")
    for m in migrators:
        ratio = spent[m] / pg_floor
        verdicts.append(f"{m}: PostgreSQL CPU per key <= {PG_BAR}x the same-work floor's: {yes(ratio <= PG_BAR)} "
                        f"({ratio:.2f}x: {spent[m]:.1f}{_runs(modes[m], 'postgresql')} against {pg_floor:.1f} µs)")
    if "2 workers" in modes:
        two = modes["2 workers"]
        ratio = two["keys"] / two["seconds"] / floor
        verdicts.append(f"2 workers >= 1.0x the floor's keys/s: {yes(ratio >= 1.0)} ({ratio:.2f}{_ceiling(modes, '2 workers', floor)})")
        floor_total, total = _total(modes["floor"]), _total(two)
        bar = TOTAL_BAR_US / QUIET_FLOOR_US * floor_total
        verdicts.append(f"2 workers: total CPU per key <= {TOTAL_BAR_US} µs in a quiet machine's terms: "
                        f"{yes(total <= bar)} ({total:.1f}{_runs(two, 'total')} against {TOTAL_BAR_US}/{QUIET_FLOOR_US} "
                        f"of the floor's {floor_total:.1f}{_runs(modes['floor'], 'total')} = {bar:.1f} µs here)")
    lowest = min(modes[m]["keys"] / modes[m]["seconds"] / seed for m in migrators)
    verdicts.append(f"every mode >= 10x seed: {yes(lowest >= 10)} (lowest {lowest:.1f}x)")
    if verified:
        pace = (modes[verified]["keys"] / modes[verified]["seconds"]) / (modes["local"]["keys"] / modes["local"]["seconds"])
        verdicts.append(f"verify >= 0.5x its run's keys/s: {yes(pace >= 0.5)} ({pace:.2f}x)")
    if "follow" in size:
        line, verdict = render_follow(size["follow"])
        lines += ["", line]
        verdicts.append(verdict)
    hostile = next((modes[m] for m in modes if "hostile" in m), None)
    if hostile:
        rss, bar = hostile["worker_peak_rss_mb"], HOSTILE_RSS_MB + 3 * LARGEST_VALUE_MB
        verdicts.append(f"hostile worker peak RSS <= {HOSTILE_RSS_MB} MB + 3 x its {LARGEST_VALUE_MB} MiB value: "
                        f"{yes(rss <= bar)} ({rss} MB)")
    lines += ["", "Bars:", ""] + [f"- {v}" for v in verdicts]
    if "large_value" in size:
        small, large = (size["large_value"][m] for m in LARGE_VALUE_MIB)
        grew = (large - small) / (LARGE_VALUE_MIB[1] - LARGE_VALUE_MIB[0])
        lines += ["", f"One valid thread alone, `run --local --jobs 1`: peak RSS {small} MB at {LARGE_VALUE_MIB[0]} MiB, "
                  f"{large} MB at {LARGE_VALUE_MIB[1]} MiB: {grew:.1f} MB more per MiB of value "
                  f"(read, parsed, its row's JSON, sent by COPY)"]
    if "large_collection" in size:
        (few, small), (many, large) = size["large_collection"].items()
        lines += ["", f"One valid time series alone, `run --local --jobs 1`: peak RSS {small} MB at {few:,} members, "
                  f"{large} MB at {many:,} members: {large / small:.2f}x (read, transformed and written "
                  f"{CHUNK_READ_MEMBERS:,} members at a time)"]
    if "latency" in size:
        lines += ["", "| app-like load on the same Redis (1,000 ops/s) | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['p50_ms']} | {v['p99_ms']} | {v['max_ms']} |" for k, v in size["latency"].items()]
    return lines


def render_follow(f: dict) -> tuple[str, str]:
    """follow's measurement, and its bar's verdict: it sustains the rate the changes came at when its
    lag (the oldest change not yet applied) stayed under the bar throughout."""
    rate = f["keys"] / f["written_s"]
    ok = rate >= FOLLOW_RATE * 0.95 and f["lag_max_s"] < FOLLOW_LAG_S
    line = (f"`follow --local` while {f['keys']:,} distinct string keys were rewritten at {FOLLOW_RATE:,}/s "
            f"({rate:,.0f}/s achieved over {f['written_s']:.1f} s): lag at worst {f['lag_max_s']:.2f} s, "
            f"{f['lag_end_s']:.2f} s when the writes stopped; every change applied within "
            f"{f['seconds'] - f['written_s']:.1f} s of the last (as its figures, written once a second, show); "
            "CPU µs per change: " + " + ".join(f"{_per_key(f, k):.1f}" for k in f["cpu"])
            + f" = {sum(f['cpu'].values()) * 1e6 / f['keys']:.1f}, {sum(f['cpu'].values()) / f['seconds']:.2f} "
            f"cores in use of {os.cpu_count()}")
    verdict = (f"follow >= {FOLLOW_RATE:,} changes/s with lag under {FOLLOW_LAG_S:g} s: {'yes' if ok else 'NO'} "
               f"({rate:,.0f}/s, lag at worst {f['lag_max_s']:.2f} s)")
    return line, verdict


def _redis_levers(size: dict) -> list[str]:
    """What the source's cost per key is made of, and what one SCAN pass instead of the run's would save."""
    modes, keys = size["modes"], size["keys"]
    one_pass = size["scan_pass_redis_s"] * 1e6 / keys
    floor_scans = modes["floor"]["redis_calls"].get("scan", 0)
    lines = []
    for m in (m for m in ("local", "2 workers") if m in modes):
        r = modes[m]
        passes = r["redis_calls"].get("scan", 0) / floor_scans if floor_scans else 0
        spooled = _per_key(r, "redis") - max(0.0, passes - 1) * one_pass
        calls = ", ".join(f"{c.upper()} {n / r['keys']:.2f}" for c, n in
                          sorted(r["redis_calls"].items(), key=lambda item: -item[1])[:6])
        lines.append(f"Redis, {m}: {passes:.1f} SCAN passes' worth of calls (the floor makes one, which alone costs "
                     f"Redis {one_pass:.1f} µs per key); one pass instead would leave about {spooled:.1f} of its "
                     f"{_per_key(r, 'redis'):.1f} µs per key ({spooled / _per_key(modes['floor'], 'redis'):.2f}x the "
                     f"floor's). Calls per key: {calls}.")
    return lines


def _ceiling(modes: dict, mode: str, floor_rate: float) -> str:
    """The most this mode's CPU per key allows against the floor, were every core busy with it."""
    cpu = modes[mode].get("cpu")
    if not cpu:
        return ""
    best = modes[mode]["keys"] / (sum(cpu.values()) / os.cpu_count())
    return f"; its CPU per key allows at most {best / floor_rate:.2f} on {os.cpu_count()} cores"


def render_growth(sizes: list[dict]) -> list[str]:
    names = [m for m in sizes[0]["modes"] if all(m in size["modes"] for size in sizes)]
    lines = ["| keys | ranges | " + " | ".join(f"{m} keys/s" for m in names) + " | worker peak RSS MB | coordinator RSS MB |",
             "|---:|---:|" + "---:|" * (len(names) + 2)]
    for size in sizes:
        modes = size["modes"]
        workers = [modes[m] for m in names if "worker_peak_rss_mb" in modes[m]]
        lines.append(f"| {size['keys']:,} | {size['ranges']} | "
                     + " | ".join(f"{modes[m]['keys'] / modes[m]['seconds']:,.0f}" for m in names)
                     + f" | {max((w['worker_peak_rss_mb'] for w in workers), default='')} | "
                     f"{max((w['coordinator_rss_mb'] for w in workers), default='')} |")
    return lines


def write_between(path: Path, text: str) -> None:
    """Put `text` between the bench's markers in `path`."""
    body = path.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start not in body or end not in body:
        raise SystemExit(f"{path.name} has no {start} ... {end} section to fill")
    head, rest = body.split(start, 1)
    path.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1_000_000, help="about this many keys (default 1,000,000)")
    parser.add_argument("--sizes", help="several key counts, e.g. 100000,300000,1000000: everything per size, "
                                        "then how the cost grows (overrides --keys)")
    parser.add_argument("--redis-url", help="a Redis DB to seed and migrate (flushed); by default a redis-server of the "
                                            "bench's own, so that its CPU is the bench's alone")
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--seed-sample", type=int, default=20_000, help="keys the seed's approach is timed on")
    parser.add_argument("--workers", default="1,2", help="worker process counts to measure (default 1,2)")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"runs of each mode but verify and the hostile one, and rounds of each same-work floor "
                             f"variant; the least CPU counts (default {ROUNDS})")
    parser.add_argument("--latency-seconds", type=float, default=20.0,
                        help="how long the app-like load runs per case (at most the unthrottled run's time less 4 s)")
    parser.add_argument("--throttle", type=int,
                        help="--max-keys-per-sec for the latency case (default: a quarter of what `run --local` touched)")
    parser.add_argument("--no-hostile", dest="workers_hostile", action="store_false",
                        help="skip the run of 2 workers over the hostile keyspace (first size)")
    parser.add_argument("--wide", type=int, default=WIDE_MEMBERS,
                        help="members of the large time series and counters added to the stats hash of the hostile "
                             "keyspace, and of the time series measured alone (default 1,000,000)")
    parser.add_argument("--follow-seconds", type=float, default=5.0,
                        help=f"how long the app rewrites keys at {FOLLOW_RATE:,}/s while follow runs (0: no follow)")
    parser.add_argument("--follow-jobs", type=int, help="follow's --jobs (default: its own, 1 with --local)")
    parser.add_argument("--only", choices=("follow", "local"),
                        help="measure one part alone (no README): follow (after a run that writes its rows; no other "
                             "mode), or local (the floor, the seed, `run --local` and its verify, PostgreSQL's same-work "
                             "floor)")
    parser.add_argument("--readme", action="store_true",
                        help="write the result tables into README.md, and the model's into docs/capacity.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure(json=True, level="WARNING")  # logs to stderr; a child's stdout carries only its result
    if args.child:
        result = {"floor": lambda: mode_floor(args.redis_url, args.database_url),
                  "seed": lambda: mode_seed(args.redis_url, args.database_url, args.seed_sample)}[args.child]()
        print(json.dumps(result))
        return
    os.environ.setdefault("MIGRATOR_QUEUE_PREFIX", f"bench{os.getpid()}.")
    os.environ.setdefault("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
    targets = [int(x) for x in args.sizes.split(",")] if args.sizes else [args.keys]
    sizes = []
    server = None if args.redis_url else PrivateRedis()
    args.redis_url = args.redis_url or server.url
    with tempfile.TemporaryDirectory(prefix="migrator-bench-") as work_dir:
        args.work_dir = work_dir
        try:
            for i, target in enumerate(targets):
                sizes.append(measure(args, target, first=i == 0, last=i == len(targets) - 1))
            version = _redis_version(args.redis_url)
        finally:
            if args.workers:
                from workers.celery import delete_queues

                delete_queues()  # this run's queues, off the shared broker
            if server:
                server.close()
    machine = (f"Machine: {platform.machine()}, {os.cpu_count()} cores, {_memory_gb()} GB, Python "
               f"{platform.python_version()}, Redis {version}, PostgreSQL {_pg_version()}, load average "
               f"{os.getloadavg()[0]:.1f} at the end; `scripts/bench.py {' '.join(sys.argv[1:])}` on "
               f"{time.strftime('%Y-%m-%d')}.")
    lines = [machine, ""]
    for size in sizes:
        lines += render_follow(size["follow"]) + ("",) if args.only == "follow" else render(size) + [""]
    if len(sizes) > 1:
        lines += ["How the cost grows with the keyspace:", ""] + render_growth(sizes) + [""]
    text = "\n".join(lines).rstrip()
    model = "\n".join([machine, "", *render_model(sizes[-1])]) if "2 workers" in sizes[-1]["modes"] else ""
    print(text + ("\n\nThe capacity model (docs/capacity.md), from the largest keyspace:\n\n" + model if model else ""))
    if args.readme and not args.only:
        write_between(ROOT / "README.md", text)
        if model:
            write_between(ROOT / "docs" / "capacity.md", model)


def render_model(size: dict) -> list[str]:
    """docs/capacity.md's figures: the model against the bench's workers, then past one machine."""
    costs = lambda r: Costs(*(r["cpu"][k] * 1e6 / r["keys"] for k in ("mode", "postgresql", "redis", "broker")))
    modes = size["modes"]
    measured = {n: (modes[m]["keys"] / modes[m]["seconds"], costs(modes[m]), n * pool_processes(n))
                for n, m in ((1, "1 worker"), (2, "2 workers")) if m in modes}
    return capacity.render(costs(modes["2 workers"]), measured, os.cpu_count())


def _memory_gb() -> int:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)


def _redis_version(url: str) -> str:
    return redis.Redis.from_url(url).info("server")["redis_version"]


def _pg_version() -> int:
    conn = psycopg2.connect(os.environ.get("MIGRATOR_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    try:
        return conn.server_version // 10000
    finally:
        conn.close()


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    main()
