"""A second application, end to end, the way the README walks a new team through it: the shop's
keyspace (migrator/apps/shop/demo.py) with its mapping as a file (migrator/apps/shop/mapping.toml),
through seed-demo, audit, `mapping --init`, init-db, check, a run on two Celery workers, verify and
rollback, every command with `--mapping` and nothing of the package touched."""
from __future__ import annotations

import json

import pytest
from psycopg2 import sql

from migrator.core.mapping_file import load_file
from migrator.core.values import stable_id

from helpers import ROOT, by_pattern, cli, fingerprint

SHOP_FILE = ROOT / "migrator" / "apps" / "shop" / "mapping.toml"
SHOP = load_file(SHOP_FILE)
MAPPING = ("--mapping", str(SHOP_FILE))


@pytest.fixture
def shop_tables(pg):
    """The session database holds no shop table before the test (init-db makes them) nor after."""
    def drop() -> None:
        with pg, pg.cursor() as cur:
            for table in SHOP.table_names():
                cur.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(table)))

    drop()
    yield SHOP.table_names()
    drop()


def test_the_shop_goes_through_the_whole_path_on_two_workers(settings, r, pg, shop_tables, workers, tmp_path):
    seeded = cli(settings, "seed-demo", *MAPPING, "--users", "80", "--malformed", "4")
    assert seeded.returncode == 0, seeded.stderr
    keys = r.dbsize()

    # phase 1: every key is owned by a pattern of the file; the report says each pattern's type
    audit = cli(settings, "audit", *MAPPING, "--output-dir", str(tmp_path), "--json")
    report = json.loads(audit.stdout)
    assert report["mapping"] == "shop" and report["unmapped"]["keys"] == 0, audit.stderr
    assert sum(p["keys"] for p in report["patterns"]) == report["total_keys"] == keys
    assert {p["redis_type"] for p in report["patterns"]} == {"hash", "string", "set", "zset", "list", "stream"}

    # a new team's first step: a starting file from the live keyspace, one pattern per key shape
    start = tmp_path / "start.toml"
    init = cli(settings, "mapping", "--init", str(start))
    assert init.returncode == 0, init.stderr
    assert {p.redis_type for p in load_file(start).patterns} == {"hash", "string", "set", "zset", "list", "stream"}
    again = cli(settings, "mapping", "--init", str(start))
    assert again.returncode != 0 and "--force" in again.stderr + again.stdout

    # the schema from the file: one table per target, each with the journal trigger rollback needs
    assert cli(settings, "init-db", *MAPPING).returncode == 0
    with pg.cursor() as cur:
        cur.execute("SELECT count(DISTINCT c.relname) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                    " WHERE NOT t.tgisinternal AND c.relname = ANY(%s)", (shop_tables,))
        assert cur.fetchone()[0] == len(shop_tables)
    pg.rollback()
    check = cli(settings, "check", *MAPPING)
    assert check.returncode == 0, check.stdout + check.stderr

    # a row the shop's database held before: the run changes it, rollback must give it back
    with pg, pg.cursor() as cur:
        cur.execute("INSERT INTO products (id, sku, name, price_cents) VALUES (%s, 'SKU-00001', 'from the app', 1)",
                    (stable_id("products", "SKU-00001"),))
    before = fingerprint(pg, shop_tables)

    # the run, on the two workers of this module
    done = cli(settings, "run", *MAPPING, "--json", "--ranges", "8", "--output-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("\n", 1)[1])
    run_id = result["run_id"]
    assert result["status"] == "completed" and result["balanced"]
    assert sum(p["dead"] for p in by_pattern(result).values()) == 4  # the malformed keys, each a dead letter
    with pg.cursor() as cur:
        cur.execute("SELECT count(DISTINCT worker) FROM migration_batches WHERE run_id = %s", (run_id,))
        assert cur.fetchone()[0] == 2  # both workers took batches
        cur.execute("SELECT name FROM products WHERE sku = 'SKU-00001'")
        assert cur.fetchone()[0] != "from the app"
    pg.rollback()

    # verify: clean; a damaged row turns the verdict
    clean = cli(settings, "verify", run_id, "--json")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert json.loads(clean.stdout)["verdict"] == "clean"
    with pg, pg.cursor() as cur:
        cur.execute("DELETE FROM events WHERE entry_id = (SELECT min(entry_id) FROM events)")
    damaged = cli(settings, "verify", run_id, "--json")
    found = json.loads(damaged.stdout)
    assert damaged.returncode == 1 and found["missing"] == 1, damaged.stdout + damaged.stderr

    # rollback: every shop table as it was before the run, the app's own row included
    undone = cli(settings, "rollback", run_id)
    assert undone.returncode == 0, undone.stdout + undone.stderr
    assert fingerprint(pg, shop_tables) == before
