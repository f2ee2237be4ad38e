"""Throughput and memory of the migrator against a floor and the seed's approach, in one command.

    .venv/bin/python scripts/bench.py --keys 1000000

Seeds the demo keyspace (every pattern) into its own Redis DB and migrates it into a throwaway
database, then measures side by side in the same run:
  floor   one plain process: SCAN COUNT 1000, pipelined TYPE+PTTL then GET/HGETALL/SMEMBERS/ZRANGE,
          JSON parsing, COPY of the parsed records into a plain table; no transforms (the yardstick)
  seed    one read per key, one INSERT per row, a commit every 100 rows (on a sample, extrapolated)
  local   `migrator run --local`
  workers `migrator run` through 1 and 2 Celery worker processes
Each mode runs in its own process so its peak RSS is its own. Prints keys/s, the ratio of each to
the floor and to the seed's approach, the peak RSS, and the time of a bare SCAN pass.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psycopg2
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from migrator.config import Settings  # noqa: E402
from migrator.demo import seed_demo  # noqa: E402
from migrator.log import configure  # noqa: E402
from migrator.options import RunOptions  # noqa: E402
from migrator.schema import database_url_for, ensure_database, init_db  # noqa: E402
from migrator.threadr import THREADR  # noqa: E402

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
        cur.execute("DROP TABLE IF EXISTS floor_kv; CREATE TABLE floor_kv (key text, value text, pttl bigint)")
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
        cur.execute("DROP TABLE IF EXISTS seed_kv; CREATE TABLE seed_kv (key text PRIMARY KEY, value text, pttl bigint)")
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


def mode_local(settings: Settings) -> dict:
    from migrator.report import build_report
    from migrator.runner import execute_local, plan_run

    client, conn = settings.redis(), settings.postgres()
    opts = RunOptions()
    started = time.perf_counter()
    run_id = plan_run(client, conn, THREADR, opts, settings.redis_url)
    execute_local(client, settings.postgres, THREADR, run_id, opts)
    seconds = time.perf_counter() - started
    report = build_report(conn, THREADR, run_id)
    return {"keys": report["totals"]["scanned"], "seconds": seconds, "status": report["status"]}


def mode_workers(settings: Settings, workers: int) -> dict:
    """`migrator run` through `workers` Celery worker processes started here."""
    from migrator.report import build_report
    from migrator.status import TERMINAL, run_progress
    from workers.celery import app
    from workers.coordinator import start_run

    queues = ",".join(f"{os.environ['MIGRATOR_QUEUE_PREFIX']}{p}" for p in ("critical", "high", "medium", "low"))
    env = {**os.environ, "REDIS_URL": settings.redis_url, "DATABASE_URL": settings.database_url}
    procs = [subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", queues, "-c", "1",
                               "-n", f"bench{i}-{os.getpid()}@%h", "--without-gossip", "--without-mingle",
                               "--loglevel", "WARNING"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True) for i in range(workers)]
    try:
        deadline = time.monotonic() + 60
        while len(app.control.ping(timeout=0.5) or []) < workers and time.monotonic() < deadline:
            pass
        client, conn = settings.redis(), settings.postgres()
        started = time.perf_counter()
        run_id = start_run(settings, client, conn, THREADR, RunOptions())
        while run_progress(conn, run_id)["status"] not in TERMINAL:
            time.sleep(0.2)
        seconds = time.perf_counter() - started
        report = build_report(conn, THREADR, run_id)
        peaks = [_peak_rss_of_group(p.pid) for p in procs]
        return {"keys": report["totals"]["scanned"], "seconds": seconds, "status": report["status"],
                "worker_peak_rss_mb": max(peaks)}
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(60)


def _peak_rss_of_group(pgid: int) -> float:
    """The largest peak RSS (VmHWM) among the processes of a worker's process group, in MB."""
    peak = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.getpgid(int(pid)) == pgid:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            peak = max(peak, int(line.split()[1]))
            except (OSError, ProcessLookupError):
                continue
    return round(peak / 1024, 1)


def _truncate(database_url: str) -> None:
    conn = psycopg2.connect(database_url)
    with conn, conn.cursor() as cur:
        cur.execute("TRUNCATE " + ", ".join(THREADR.table_names()) + ", migration_journal")
    conn.close()


def run_child(mode: str, args: argparse.Namespace) -> dict:
    """Run one mode in a child process; its result plus its own peak RSS."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, "--redis-url", args.redis_url,
                             "--database-url", args.database_url, "--seed-sample", str(args.seed_sample)],
                            stdout=subprocess.PIPE, cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"bench mode {mode} failed")
    return {**json.loads(out.decode().strip().splitlines()[-1]), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1_000_000, help="about this many keys (default 1,000,000)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/5", help="its own Redis DB (flushed)")
    parser.add_argument("--database-url", help="internal: the throwaway database")
    parser.add_argument("--seed-sample", type=int, default=20_000, help="keys the seed's approach is timed on")
    parser.add_argument("--workers", default="1,2", help="worker process counts to measure (default 1,2)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure(json=True, level="WARNING")  # logs to stderr; a child's stdout carries only its result
    if args.child:
        settings = Settings(args.redis_url, args.database_url, os.environ.get("CELERY_BROKER_URL", ""))
        result = {"floor": lambda: mode_floor(args.redis_url, args.database_url),
                  "seed": lambda: mode_seed(args.redis_url, args.database_url, args.seed_sample),
                  "local": lambda: mode_local(settings)}[args.child]()
        print(json.dumps(result))
        return

    os.environ.setdefault("MIGRATOR_QUEUE_PREFIX", f"bench{os.getpid()}.")
    admin_url = os.environ.get("MIGRATOR_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"migrator_bench_{os.getpid()}"
    admin = psycopg2.connect(admin_url)
    ensure_database(admin, name)
    args.database_url = database_url_for(admin_url, name)
    try:
        conn = psycopg2.connect(args.database_url)
        init_db(conn)
        conn.close()
        client = redis.Redis.from_url(args.redis_url)
        client.flushdb()
        started = time.perf_counter()
        seed_demo(client, max(1, int(args.keys / KEYS_PER_USER)))
        keys = client.dbsize()
        print(f"seeded {keys:,} keys in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        started = time.perf_counter()
        for _ in client.scan_iter(count=1000):
            pass
        scan_pass = time.perf_counter() - started

        results = {"floor": run_child("floor", args), "seed": run_child("seed", args)}
        _truncate(args.database_url)
        results["local"] = run_child("local", args)
        settings = Settings(args.redis_url, args.database_url,
                            os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"))
        for n in (int(x) for x in args.workers.split(",") if x):
            _truncate(args.database_url)
            results[f"{n} worker(s)"] = mode_workers(settings, n)
        client.flushdb()
    finally:
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()

    floor = results["floor"]["keys"] / results["floor"]["seconds"]
    seed = results["seed"]["keys"] / results["seed"]["seconds"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"keyspace {keys:,} keys; one bare SCAN pass {scan_pass:.2f} s")
    print(f"{'mode':12} {'keys':>10} {'seconds':>9} {'keys/s':>10} {'x floor':>8} {'x seed':>8} {'peak RSS MB':>12}")
    for mode, r in results.items():
        rate = r["keys"] / r["seconds"]
        rss = r.get("worker_peak_rss_mb", r.get("peak_rss_mb"))
        print(f"{mode:12} {r['keys']:>10,} {r['seconds']:>9.2f} {rate:>10,.0f} {rate / floor:>8.2f} {rate / seed:>8.1f} "
              f"{rss:>12}" + ("  (sample, extrapolated)" if r.get("sampled") else ""))


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    main()
