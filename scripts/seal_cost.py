"""The Python cost per row of a bulk batch's write, its seals included: Writer.documents beside the
spelling before it (a line as a list of values, serialised with its sub-batch's document, and a seal
serialising the row's content again), over the sub-batches a run of the demo keyspace gave its writer.

    .venv/bin/python scripts/seal_cost.py --keys 20000

Seeds the demo keyspace into a redis-server of its own, runs `migrator run --local --jobs 1` into a
throwaway database keeping every sub-batch (scripts/write_variants.py: capture), then times both over
the same sub-batches, interleaved, --rounds times, the least thread CPU time counting (others' load only ever adds).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import time
from typing import Any

import orjson

from demo_keyspace import demo_keyspace  # noqa: E402  (it puts the repository on the path)
from write_variants import RUN_ID, capture  # noqa: E402
from migrator.apps.threadr import THREADR  # noqa: E402
from migrator.core.writer import Prepared, Writer  # noqa: E402


def former_seal(table: str, values: dict[str, Any], key: str, provenance: str, digest: int, linked: frozenset[str]) -> int:
    content = {c: v for c, v in values.items() if c not in linked} if linked else values
    sent = orjson.dumps([table, content, key, orjson.Fragment(provenance), digest])
    return int.from_bytes(hashlib.blake2b(sent, digest_size=8).digest(), "big", signed=True)


def former(w: Writer, records: list[Prepared]) -> list[bytes]:
    """The documents of Writer.upsert before Writer.documents (the statements aside)."""
    rounds: list[dict[tuple[str, tuple[str, ...]], dict[str, list[Any]]]] = []
    for rec in records:
        provenance = (w.run_id, rec.key_text, orjson.Fragment(rec.pattern.provenance), rec.expires_at, rec.digest)
        rec.seals = []
        for row in rec.rows:
            values = row.values
            if w._marked and row.table in w._marked:
                values.setdefault(w._marked[row.table], None)
            seal = former_seal(row.table, values, rec.key_text, rec.pattern.provenance, rec.digest,
                               w._linked.get(row.table, frozenset()))
            rec.seals.append((row.table, seal))
            group, row_id = (row.table, tuple(values)), values["id"]
            line = [*values.values(), *provenance, seal]
            for batch in rounds:
                bucket = batch.setdefault(group, {})
                if row_id not in bucket:
                    bucket[row_id] = line
                    break
            else:
                rounds.append({group: {row_id: line}})
    documents = []
    for batch in rounds:
        for _, rows in sorted(batch.items(), key=lambda g: (w._table_order[g[0][0]], g[0][1])):
            documents.append(orjson.dumps([rows[k] for k in sorted(rows)]))
    return documents


def timed(make: Any, batches: list[list[Prepared]]) -> float:
    w = Writer(None, THREADR, RUN_ID[0], fenced=True)  # (neither spelling touches the cursor)
    started = time.thread_time()
    for records in batches:
        make(w, records)
    return time.thread_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=20_000, help="about this many keys (default 20,000)")
    parser.add_argument("--rounds", type=int, default=7, help="times each spelling runs (default 7)")
    args = parser.parse_args()
    with demo_keyspace("seal_cost", args.keys) as (url, source_url, _):
        batches = [records for batch in capture(url, source_url) for records in batch]
    rows = sum(len(rec.rows) for records in batches for rec in records)
    spellings = {"before (list lines, content serialised twice)": lambda w, r: former(w, r),
                 "Writer.documents": lambda w, r: w.documents(r)}
    best = {name: float("inf") for name in spellings}
    for _ in range(args.rounds):
        for name, make in spellings.items():
            best[name] = min(best[name], timed(make, batches))
    base = best[next(iter(spellings))]
    print(f"{rows:,} rows in {len(batches)} sub-batches; load average {os.getloadavg()[0]:.1f}")
    for name, cpu in best.items():
        print(f"{name:48} {cpu * 1e6 / rows:6.2f} µs/row  ratio {cpu / base:.2f}")


if __name__ == "__main__":
    main()
