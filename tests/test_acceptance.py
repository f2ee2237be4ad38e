"""Issue 2's bar on a 10,000-user demo keyspace: exact balance, a no-op second run, exact bytes."""
from __future__ import annotations

import json

from migrator.apps.threadr.demo import seed_demo
from migrator.core.mapping import UNMAPPED

from helpers import by_pattern, fingerprint, migrate


def test_ten_thousand_users_balance_exactly_rerun_changes_nothing_and_bytes_arrive(settings, r, pg):
    seeded = seed_demo(r, 10_000)
    first = migrate(settings, ranges=8)  # several ranges: no key may be counted twice at a range edge
    assert first["status"] == "completed" and first["balanced"]
    counted = {name: p["scanned"] for name, p in by_pattern(first).items()}
    seeded["thread"] += seeded.pop("refused")  # a thread the app's model refuses is a key of the pattern
    assert counted == {name: n for name, n in seeded.items() if n}
    assert first["totals"]["scanned"] == r.dbsize()
    assert by_pattern(first)[UNMAPPED]["skipped"] == seeded["unmapped"]

    tables = fingerprint(pg)
    second = migrate(settings)
    assert second["figures"]["rows_written"] == 0 and fingerprint(pg) == tables

    with pg.cursor() as cur:
        # one entitlement per grant, written under both its ip and its email key (two grants may
        # share a payment_reference: the app reuses that free text)
        cur.execute("SELECT count(*) FROM subscriptions WHERE kind = 'premium_grant'")
        grants = {r.get(k) for k in r.scan_iter("threadr:premium:*", count=1000)}
        assert cur.fetchone()[0] == len(grants) > 0
        cur.execute("SELECT legacy_id, password_hash FROM users ORDER BY legacy_id LIMIT 500")
        for ref, stored in cur.fetchall():
            assert stored.encode() == json.loads(r.get(f"threadr:user:{ref}"))["password_hash"].encode()
        cur.execute("SELECT id::text, tweets FROM threads ORDER BY id LIMIT 500")
        for tid, tweets in cur.fetchall():
            assert tweets == json.loads(r.get(f"threadr:thread:{tid}"))["tweets"]
