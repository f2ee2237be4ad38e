"""The suite's own manners: a test session empties only a Redis database it filled, and two
sessions at once never share one."""
from __future__ import annotations

import os
import subprocess
import sys

import redis

from helpers import ROOT
from servers import redis_server

ONE_TEST = ["tests/test_audit.py", "-q", "-k", "counts_per_pattern_match_the_seeded_keyspace"]


def session(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", *ONE_TEST], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def test_a_session_refuses_a_database_holding_keys_it_did_not_write(tmp_path):
    with redis_server(tmp_path) as port:
        url = f"redis://127.0.0.1:{port}/3"
        someone = redis.Redis.from_url(url)
        someone.set("their:key", "precious")
        refused = session({"MIGRATOR_TEST_REDIS_URL": url})
        assert refused.returncode == 2, refused.stdout[-2000:]
        assert f"{url} (1 keys) hold keys this suite did not write" in refused.stdout
        assert "MIGRATOR_TEST_REDIS_URL" in refused.stdout
        assert someone.get("their:key") == b"precious" and someone.dbsize() == 1
        # emptied by its owner, the database is the session's, and left empty and unclaimed after it
        someone.delete("their:key")
        done = session({"MIGRATOR_TEST_REDIS_URL": url})
        assert done.returncode == 0, done.stdout[-2000:]
        assert someone.dbsize() == 0
        registry = redis.Redis(port=port, db=10)
        assert registry.keys("migrator-tests:*") == []
        someone.close()
        registry.close()


def test_a_second_session_at_once_does_not_take_this_sessions_database(settings, r):
    r.set("this:session", "1")
    other = session({"MIGRATOR_TEST_REDIS_URL": settings.redis_url})
    assert other.returncode == 2 and "every candidate is claimed" in other.stdout, other.stdout[-2000:]
    assert r.get("this:session") == b"1"
