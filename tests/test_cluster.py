"""A Redis Cluster source: ranges per master, every key once, the same tables as a standalone source."""
from __future__ import annotations

from datetime import datetime

import redis
from psycopg2 import sql

from migrator.core.config import Settings
from migrator.apps.threadr.demo import seed_demo
from migrator.apps.threadr import THREADR

from helpers import by_pattern, content_fingerprint, migrate

NOW = datetime(2026, 11, 27, 12, 0, 0)


def test_cluster_source_migrates_per_master_like_a_standalone_one(settings, r, pg, cluster):
    seeded = seed_demo(r, 400, now=NOW)
    standalone = migrate(settings, ranges=4)
    expected = content_fingerprint(pg)
    with pg.cursor() as cur:
        cur.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(map(sql.Identifier, THREADR.table_names()))))
    pg.commit()

    rc = redis.RedisCluster(host="127.0.0.1", port=cluster[0])
    assert seed_demo(rc, 400, now=NOW) == seeded
    on_cluster = Settings(f"redis://127.0.0.1:{cluster[1]}/0", settings.database_url, settings.broker_url)
    report = migrate(on_cluster, ranges=4)
    assert report["status"] == "completed" and report["balanced"]
    with pg.cursor() as cur:
        cur.execute("SELECT count(DISTINCT node), count(*) FROM migration_batches WHERE run_id = %s", (report["run_id"],))
        assert cur.fetchone() == (3, 3 * 4 * 4)  # masters x ranges x priorities
    pg.rollback()
    counted = {name: p["scanned"] for name, p in by_pattern(report).items()}
    seeded["thread"] += seeded.pop("refused")  # a thread the app's model refuses is a key of the pattern
    assert counted == {name: n for name, n in seeded.items() if n}  # every key once, none twice
    assert by_pattern(report).keys() == by_pattern(standalone).keys()
    assert content_fingerprint(pg) == expected
    rc.close()
