"""Prometheus metrics, scraped from real endpoints: `migrator run --local --metrics-port`, a Celery worker
process with MIGRATOR_METRICS_PORT and the coordinator of a run on it; their per-pattern counts equal
the run's report. The Grafana dashboard names only metrics that exist."""
from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from migrator.cli.main import main as cli
from migrator.core import ledger
from migrator.core import metrics
from migrator.apps.threadr import THREADR
from migrator.apps.threadr.demo import seed_demo
from migrator.core.mapping import UNMAPPED
from migrator.views.report import build_report
from migrator.views.status import run_progress

from helpers import ROOT, Workers, free_port, scrape, wait_for_end, worker_env

OUTCOMES = ("scanned", "migrated", "skipped", "dead", "expired")


def keys_of(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> dict[tuple[str, str], float]:
    """(pattern, outcome) -> value of the samples of `name` that carry `labels`."""
    found = {}
    for (sample, sample_labels), value in samples.items():
        d = dict(sample_labels)
        if sample == name and all(d.get(k) == v for k, v in labels.items()):
            found[d["pattern"], d["outcome"]] = value
    return found


def of_report(report: dict[str, Any]) -> dict[tuple[str, str], float]:
    """The report's counts as (pattern, outcome) -> count, the zero ones left out (a counter never
    incremented is not there)."""
    return {(p["pattern"], f): float(p[f]) for p in report["patterns"] for f in OUTCOMES if p[f]}


def nonzero(found: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    return {k: v for k, v in found.items() if v}


def test_a_local_run_serves_its_balance_and_its_own_counts_equal_to_the_report(settings, r, pg, tmp_path):
    seed_demo(r, 40, malformed=4)
    before = {(p, f): REGISTRY.get_sample_value("migrator_keys_total", {"pattern": p, "outcome": f}) or 0.0
              for p in [*(p.name for p in THREADR.patterns), UNMAPPED] for f in OUTCOMES}
    writes = REGISTRY.get_sample_value("migrator_postgres_write_seconds_count") or 0.0
    port = free_port()
    code = cli(["run", "--local", "--jobs", "1", "--metrics-port", str(port), "--output-dir", str(tmp_path),
                     "--redis-url", settings.redis_url, "--database-url", settings.database_url])
    try:
        samples = scrape(port)  # (the endpoint serves on after the command, in this test's process)
    finally:
        metrics.serving().close()
    with pg, pg.cursor() as cur:
        run_id = ledger.latest_run(cur)
    report = build_report(pg, THREADR, run_id)
    assert code == 0 and report["totals"]["dead"] >= 1, report["totals"]

    assert nonzero(keys_of(samples, "migrator_run_keys", run=run_id)) == of_report(report)
    done = {dict(labels)["priority"]: v for (name, labels), v in samples.items()
            if name == "migrator_run_batches" and dict(labels)["status"] == "done"}
    assert sum(done.values()) == report["batches"]["done"] == report["batches"]["total"]
    # with --jobs 1 the batches ran in this process: its own counters grew by exactly the report's counts
    grown = {(p, f): samples.get(("migrator_keys_total", (("outcome", f), ("pattern", p))), 0.0) - before[p, f]
             for p, f in before}
    assert nonzero(grown) == of_report(report)
    assert samples[("migrator_postgres_write_seconds_count", ())] > writes


def test_a_scrape_while_a_throttled_local_run_still_runs_shows_some_of_its_keys(settings, r, pg, tmp_path):
    """The endpoint of `migrator run --local --metrics-port` scraped during the run: four ranges walked
    one after the other under --max-keys-per-sec, so keys of the batches done show up while the ledger
    still says running; once it ends, the scrape equals the report."""
    seed_demo(r, 20)
    r.mset({f"legacy:{n}": "1" for n in range(2000)})  # unmapped: walked and skipped
    with pg, pg.cursor() as cur:
        earlier = ledger.latest_run(cur)
    port = free_port()
    codes: list[int] = []
    running = threading.Thread(target=lambda: codes.append(cli(
        ["run", "--local", "--jobs", "1", "--priority", "critical", "--ranges", "4", "--max-keys-per-sec", "500",
         "--metrics-port", str(port), "--output-dir", str(tmp_path),
         "--redis-url", settings.redis_url, "--database-url", settings.database_url])))
    running.start()
    seen: list[float] = []
    run_id = None
    try:
        while running.is_alive():
            if run_id is None:
                with pg, pg.cursor() as cur:
                    run_id = ledger.latest_run(cur)
                run_id = None if run_id == earlier else run_id
            if run_id is not None and metrics.serving() is not None:
                scanned = sum(v for (_, outcome), v in
                              keys_of(scrape(port), "migrator_run_keys", run=run_id).items() if outcome == "scanned")
                if run_progress(pg, run_id)["status"] == "running":  # scraped before the run ended
                    seen.append(scanned)
            time.sleep(0.1)
        running.join()
        final = scrape(port)  # (the endpoint serves on after the command, in this test's process)
    finally:
        running.join()
        if metrics.serving() is not None:
            metrics.serving().close()
    report = build_report(pg, THREADR, run_id)
    assert codes == [0] and report["status"] == "completed" and report["batches"]["total"] == 4, report["batches"]
    total = report["totals"]["scanned"]
    assert any(0 < n < total for n in seen), (seen, total)
    assert nonzero(keys_of(final, "migrator_run_keys", run=run_id)) == of_report(report)


def test_a_worker_process_and_the_coordinator_serve_counts_equal_to_the_report(settings, r, pg, tmp_path):
    from workers.celery import delete_queues
    from migrator.core.options import RunOptions
    from migrator.execution.executor import load
    from migrator.execution.runner import plan_run

    seed_demo(r, 40, malformed=4)
    worker_port = free_port()
    pool = Workers({**worker_env(settings), "MIGRATOR_METRICS_PORT": str(worker_port)}, tmp_path)
    coordinator = metrics.serve(0, settings.postgres, addr="127.0.0.1")
    try:
        pool.start("metrics")
        client = settings.redis()
        try:
            opts = RunOptions(ranges=2)
            run_id = plan_run(client, pg, THREADR, opts, settings.redis_url)
        finally:
            client.close()
        on_workers = load("celery", settings)  # as `migrator run` sends a run to the workers
        on_workers.connect()
        on_workers.carry_on(THREADR, run_id, opts, opts.priority_order()[0])
        metrics.coordinating(run_id)
        wait_for_end(pg, run_id)
        worker, coordinated = scrape(worker_port), scrape(coordinator.port)
    finally:
        coordinator.close()
        pool.stop_all()
        delete_queues()
    report = build_report(pg, THREADR, run_id)
    assert report["status"] == "completed" and report["totals"]["dead"] >= 1, report["totals"]
    # one worker process ran every batch: its counters are the run's
    assert nonzero(keys_of(worker, "migrator_keys_total")) == of_report(report)
    batches = sum(v for (name, labels), v in worker.items()
                  if name == "migrator_batches_total" and dict(labels)["outcome"] == "done")
    assert batches == report["batches"]["total"]
    assert worker[("migrator_batch_seconds_count", (("priority", "critical"),))] >= 1
    assert nonzero(keys_of(coordinated, "migrator_run_keys", run=run_id)) == of_report(report)


def test_the_grafana_dashboard_names_only_metrics_that_exist():
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    named = {name for expr in exprs for name in re.findall(r"\bmigrator_[a-z_]+", expr)}
    # the sample names each of our metrics serves (a counter's with _total, a histogram's _bucket, _sum, _count)
    kinds = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    served = {family.name + suffix for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)
              for family in m.describe() for suffix in kinds[family.type]}
    served |= {metrics.RUN_KEYS[0], metrics.RUN_BATCHES[0]}
    assert len(exprs) >= 8 and named, exprs
    assert named <= served, named - served
