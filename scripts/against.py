"""A change's cost per key, measured against the code before it: `migrator run --local --jobs 1` of this
checkout and of an earlier commit, alternated on one keyspace, CPU per key by process and the ratio.

    .venv/bin/python scripts/against.py --against HEAD~3                 # about 100,000 keys, 3 rounds
    .venv/bin/python scripts/against.py --against 06a03d5 --keys 60000 --rounds 5

The earlier commit is checked out into a temporary git worktree (removed afterwards). The demo
keyspace is seeded once into a redis-server of its own and a throwaway database; each round runs
each tree in a child process of its own (its code first on sys.path), which applies its tree's
schema (`init-db`: a later tree's changes to the engine's functions are undone by an earlier one's),
empties the mapping's tables and the ledger, and runs the migration, counting its own CPU (the
process and its children), PostgreSQL's (the database's backends, /proc) and Redis's (INFO cpu).
The least of the rounds counts (load from elsewhere only ever adds); the bench (scripts/bench.py)
is where a change's effect on the bars is read, this is where it is told apart from the machine's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from demo_keyspace import demo_keyspace  # noqa: E402

# What a child runs, given its tree, the scripts to measure with (this checkout's) and the URLs.
CHILD = r"""
import json, os, resource, sys, tempfile
tree, scripts = sys.argv[1], sys.argv[2]
sys.path[:0] = [tree, scripts]
import psycopg2, redis
from costs import BackendCpu, quietly, redis_cpu  # (this checkout's: they import the migrator first on sys.path)
from migrator.apps.threadr import THREADR
from migrator.core import ledger
from migrator.core.schema import empty_tables, init_db

conn = psycopg2.connect(os.environ["DATABASE_URL"])
init_db(conn, THREADR)
empty_tables(conn, [*THREADR.table_names(), *ledger.TABLES])
conn.close()
source = redis.Redis.from_url(os.environ["REDIS_URL"])
def own_cpu():
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
backends = BackendCpu(os.environ["DATABASE_URL"])
before = (own_cpu(), backends.total(), redis_cpu(source))
quietly("run", "--local", "--jobs", "1", "--output-dir", tempfile.gettempdir())  # stdout: the figures alone
after = (own_cpu(), backends.total(), redis_cpu(source))
backends.close()
print("COSTS " + json.dumps([b - a for a, b in zip(before, after)]))
"""
PARTS = ("own", "PostgreSQL", "Redis")


def measure(tree: Path, env: dict[str, str]) -> list[float]:
    """CPU seconds (own, PostgreSQL, Redis) of one run of `tree`'s code."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(ROOT / "scripts")], env=env, cwd=tree,
                          capture_output=True, text=True)
    found = [line for line in done.stdout.splitlines() if line.startswith("COSTS ")]
    if done.returncode or not found:
        sys.exit(f"the run of {tree} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(found[0][len("COSTS "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the commit to compare with (any git revision)")
    parser.add_argument("--keys", type=int, default=100_000, help="about this many keys (default 100,000)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tree, alternated (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="migrator-against-") as parent:
        earlier = Path(parent) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(earlier), args.against],
                       check=True)
        try:
            trees = {"this checkout": ROOT, args.against: earlier}
            with demo_keyspace("against", args.keys) as (url, source_url, client):
                keys = client.dbsize()
                env = {**os.environ, "REDIS_URL": source_url, "DATABASE_URL": url}
                least: dict[str, list[float]] = {}
                for n in range(args.rounds):
                    for name, tree in trees.items():
                        costs = measure(tree, env)
                        least[name] = [min(a, b) for a, b in zip(least.get(name, costs), costs)]
                        print(f"round {n + 1}, {name}: " + ", ".join(
                            f"{part} {c * 1e6 / keys:.2f}" for part, c in zip(PARTS, costs)) + " µs per key",
                              file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(earlier)], check=True)
    print(f"{keys:,} keys, `run --local --jobs 1`, CPU µs per key (the least of {args.rounds} rounds):")
    print(f"{'':24}" + "".join(f"{part:>12}" for part in PARTS))
    for name in trees:
        print(f"{name[:24]:24}" + "".join(f"{c * 1e6 / keys:12.2f}" for c in least[name]))
    ratios = [a / b if b else float("nan") for a, b in zip(least["this checkout"], least[args.against])]
    print(f"{'ratio':24}" + "".join(f"{r:12.2f}" for r in ratios))


if __name__ == "__main__":
    main()
