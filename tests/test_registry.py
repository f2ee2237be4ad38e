"""A mapping is a plugin: named by an installed name, `module:attribute` or a file; a run keeps
to the one it was made with, and so do every later command and every worker."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from migrator.core import registry
from migrator.apps.threadr.demo import seed_demo
from migrator.core.mapping import Mapping
from migrator.apps.threadr import THREADR

from helpers import ROOT, migrate, wait_for_end

SPEC = "example_mappings:PREMIUM_ONLY"  # tests/example_mappings.py


def cli(settings, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run([sys.executable, "-m", "migrator.cli.main", *args, "--redis-url", settings.redis_url,
                           "--database-url", settings.database_url, "--broker-url", settings.broker_url],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def test_a_mapping_is_found_by_its_installed_name_or_module_and_a_wrong_one_says_what_exists(monkeypatch):
    assert registry.load("threadr") is THREADR and registry.load("migrator.apps.threadr:THREADR") is THREADR
    monkeypatch.delenv("MIGRATOR_MAPPING", raising=False)
    assert registry.load(None) is THREADR  # the only one installed
    monkeypatch.setenv("MIGRATOR_MAPPING", "migrator.apps.threadr:THREADR")
    assert registry.load(None) is THREADR
    with pytest.raises(registry.MappingError, match="no mapping named 'shop'; installed: threadr"):
        registry.load("shop")
    with pytest.raises(registry.MappingError, match="cannot import 'no_such_module'"):
        registry.load("no_such_module:MAPPING")
    with pytest.raises(registry.MappingError, match="has no 'NOPE'"):
        registry.load("migrator.apps.threadr.mapping:NOPE")
    with pytest.raises(registry.MappingError, match="is a str, not a migrator.core.mapping.Mapping"):
        registry.load("migrator.apps.threadr.mapping:UUID")


def test_the_digest_follows_what_decides_the_rows_and_nothing_else():
    import dataclasses

    same = Mapping(THREADR.name, THREADR.patterns, THREADR.rules, THREADR.links, THREADR.linked_patterns,
                   THREADR.figures, THREADR.unmapped_priority, THREADR.schema)
    assert registry.digest(same) == registry.digest(THREADR)
    first = THREADR.patterns[0]
    for change in ({"grammar": first.grammar + "x?"}, {"transform": lambda rec: []}, {"max_dead_ratio": 0.5},
                   {"priority": first.priority.__class__(3)}):
        other = dataclasses.replace(THREADR, patterns=(dataclasses.replace(first, **change), *THREADR.patterns[1:]))
        assert registry.digest(other) != registry.digest(THREADR), change
    assert registry.digest(dataclasses.replace(THREADR, schema=("CREATE TABLE x ();",))) != registry.digest(THREADR)


def test_a_run_made_with_a_mapping_is_reported_with_it_and_refuses_another(settings, r, pg, tmp_path):
    seed_demo(r, 30)
    assert cli(settings, "init-db", "--mapping", SPEC).returncode == 0  # its schema
    done = cli(settings, "run", "--local", "--mapping", SPEC, "--json", "--output-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.split("\n", 1)[1])
    assert {p["pattern"] for p in report["patterns"] if p["migrated"]} == {"premium_ip", "premium_email"}
    with pg.cursor() as cur:
        cur.execute("SELECT mapping, mapping_spec, mapping_digest FROM migration_runs WHERE id = %s", (report["run_id"],))
        name, spec, digest = cur.fetchone()
    pg.rollback()
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        assert (name, spec, digest) == ("premium-only", SPEC, registry.digest(registry.load(SPEC)))
    finally:
        sys.path.remove(str(ROOT / "tests"))
    # later commands load the run's own mapping from the ledger ...
    again = cli(settings, "report", report["run_id"], "--json", "--output-dir", str(tmp_path))
    assert again.returncode == 0, again.stderr
    assert {p["pattern"] for p in json.loads(again.stdout)["patterns"]} == {p["pattern"] for p in report["patterns"]}
    assert cli(settings, "verify", report["run_id"], "--local").returncode == 0
    # ... and refuse another, before touching anything
    refused = cli(settings, "rollback", report["run_id"], "--mapping", "threadr")
    assert refused.returncode == 2 and f"was made with mapping 'premium-only' of digest {digest[:12]}" in refused.stderr
    with pg.cursor() as cur:
        cur.execute("SELECT status FROM migration_runs WHERE id = %s", (report["run_id"],))
        assert cur.fetchone()[0] == "completed"
    pg.rollback()


def test_a_worker_whose_mapping_is_not_the_runs_refuses_its_batches_and_says_why(settings, r, pg, workers):
    """A worker deployed with another version of the mapping (here: the run recorded another
    digest) runs none of its batches: each is marked failed with the reason, and the run stops."""
    from migrator.core.options import RunOptions
    from migrator.execution.runner import plan_run
    from workers.tasks import dispatch_priority

    seed_demo(r, 20)
    client = settings.redis()
    run_id = plan_run(client, pg, THREADR, RunOptions(ranges=2, priorities=("critical",)), settings.redis_url)
    client.close()
    with pg.cursor() as cur:
        cur.execute("UPDATE migration_runs SET mapping_digest = %s WHERE id = %s", ("0" * 64, run_id))
    pg.commit()
    dispatch_priority(pg, run_id, THREADR.patterns[0].priority)
    progress = wait_for_end(pg, run_id, timeout=120)
    assert progress["status"] == "failed"
    assert "of digest 000000000000" in progress["error"] and "migrator resume" in progress["error"]
    with pg.cursor() as cur:
        cur.execute("SELECT status, error FROM migration_batches WHERE run_id = %s", (run_id,))
        rows = cur.fetchall()
        cur.execute("SELECT count(*) FROM subscriptions")
        assert cur.fetchone()[0] == 0  # nothing written
    pg.rollback()
    assert all(status == "failed" and "of digest 000000000000" in error for status, error in rows), rows
    time.sleep(0.5)
    listed = cli(settings, "batches", run_id, "--failed")
    assert "of digest 000000000000" in listed.stdout


def test_every_command_on_a_run_works_without_naming_its_mapping(settings, r, pg, tmp_path):
    seed_demo(r, 20)
    run_id = migrate(settings)["run_id"]
    for command in (["report", run_id, "--output-dir", str(tmp_path)], ["validate", run_id, "--local"],
                    ["verify", run_id, "--local"], ["rollback", run_id]):
        done = cli(settings, *command)
        assert done.returncode == 0, (command, done.stderr)
