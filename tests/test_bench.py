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

ROOT = Path(__file__).resolve().parent.parent


def test_the_bench_measures_every_mode_and_prints_the_bars(settings, r):
    done = subprocess.run(
        [sys.executable, "scripts/bench.py", "--keys", "4000", "--workers", "1", "--no-hostile",
         "--seed-sample", "1000", "--latency-seconds", "3", "--wide", "20000", "--redis-url", settings.redis_url],
        cwd=ROOT, env={**os.environ, "MIGRATOR_BENCH_ADMIN_URL": ADMIN_URL,
                       "MIGRATOR_QUEUE_PREFIX": f"benchtest{os.getpid()}."},  # it deletes its queues
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    rows = {m.group(1): m.group(0) for m in re.finditer(
        r"^\| (floor|seed \(sample, extrapolated\)|local|verify \(of local's run\)|1 worker) \|.*$", out, re.M)}
    assert set(rows) == {"floor", "seed (sample, extrapolated)", "local", "verify (of local's run)", "1 worker"}, out
    for mode, row in rows.items():
        cells = [c.strip() for c in row.strip("|").split("|")]
        keys, seconds, rate = int(cells[1].replace(",", "")), float(cells[2]), int(cells[3].replace(",", ""))
        assert keys > 0 and seconds > 0 and rate > 0, row
        # CPU per key: four parts and their sum
        parts = re.fullmatch(r"(\d+) \+ (\d+) \+ (\d+) \+ (\d+) = (\d+)", cells[-1])
        assert parts, row
        assert abs(sum(map(int, parts.groups()[:4])) - int(parts.group(5))) <= 4, row
    assert "coord." in rows["1 worker"]  # the coordinator and the worker apart
    large = re.search(r"One valid thread alone.*: peak RSS ([\d.]+) MB at 1 MiB, ([\d.]+) MB at 64 MiB", out)
    assert large and float(large.group(2)) > float(large.group(1)) > 0, out  # measured, not asserted against a bar
    wide = re.search(r"One valid time series alone.*: peak RSS ([\d.]+) MB at 1,000 members, ([\d.]+) MB at 20,000 "
                     r"members: (\d+\.\d\d)x", out)
    assert wide and float(wide.group(1)) > 0 and float(wide.group(2)) > 0, out
    assert re.search(r"^Bars: .*local >= 0\.7x floor: (yes|NO) \(\d\.\d\d; its CPU per key allows at most \d+\.\d\d "
                     r"on \d+ cores\); every mode >= 10x seed: (yes|NO)", out, re.M), out
    assert re.search(r"; verify >= 0\.5x its run's keys/s: (yes|NO) \(\d+\.\d\dx\)$", out, re.M), out
    assert re.search(r"^\| `run --local --max-keys-per-sec \d+` \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", out, re.M), out
    with Celery(broker=os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")) as app, \
            app.connection_for_write() as conn:
        with pytest.raises(NotFound):  # it left no queue of its own behind on the broker
            conn.default_channel.queue_declare(f"benchtest{os.getpid()}.low", passive=True)
