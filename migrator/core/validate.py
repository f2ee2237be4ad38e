"""Judging a run: one set of checks for every path that judges.

The chord callback, `run --local` and `migrator validate` all call `priority_checks` and
`figure_checks` over the same ledger and verification results, so their verdicts agree:

- every batch of the priority is done, and each pattern balances;
- each pattern's dead letters are within its budget (a systematic fault is never "completed");
- a fresh count of the source keys, taken by the verification pass, is no more than the
  batches saw;
- the verification (verify.py): every key's rows in PostgreSQL are what a write of its value
  would leave, no row is missing, none differs, none is left that no key expects; or, sealed (the
  in-run default, seal.py), every row is as its batch wrote it, and only when one is not is every
  key read again and compared;
- after the last priority, the mapping's figures over the target tables, its dangling
  references (orphans) within the same budget.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from psycopg2 import sql

from migrator.core import ledger
from migrator.core.mapping import Mapping, Priority
from migrator.core.options import RunOptions
from migrator.core.redact import redact_text

RUN = "run"  # the label of the checks over the run as a whole (migration_validations.priority)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def record(conn: Any, run_id: str, label: str, checks: list[Check]) -> bool:
    """Keep a verdict in the ledger; whether it passed."""
    ok = all(c.ok for c in checks)
    with conn, conn.cursor() as cur:
        ledger.record_validation(cur, run_id, label, ok, [c.to_json() for c in checks])
    return ok


def none_migrated(counts: dict[str, int]) -> bool:
    """A pattern's keys all dead letters (or gone): none migrated, none skipped as it says. Its mapping
    may not read them; within its budget a handful of keys is no proof either way, so it is named only."""
    return bool(counts["dead"]) and not (counts["migrated"] or counts["skipped"])


def within(n: int, of: int, ratio: float, floor: int) -> bool:
    """A budget: at most `floor` items, or at most `ratio` of `of` when that is more."""
    return n <= floor or n <= ratio * of


def count_check(totals: dict[str, dict[str, int]], fresh: dict[str, int], tolerance: float,
                spooled: frozenset[str] = frozenset()) -> Check:
    """The batches' tallies against a fresh count of the source, per pattern (one-sided). For the
    `spooled` patterns the count is of the keys of the run's spool (migrator/core/spool.py), the
    list the batches took: every key of it scanned, those gone since included."""
    off, gone = {}, {}
    for name in sorted(set(fresh) | set(totals)):
        counted = totals.get(name, {})
        now, seen = fresh.get(name, 0), counted.get("scanned", 0) - counted.get("expired", 0) * (name not in spooled)
        # More keys now than the batches saw: keys the scan missed (or the app wrote since,
        # within the tolerance). Fewer is no loss: those keys were scanned, then expired or
        # were deleted by the app before this count (a TTL'd key of a skipped pattern is never
        # read, so its expiry is only seen here).
        if now - seen > math.floor(tolerance * max(now, seen)):
            off[name] = {"source_now": now, "scanned_not_expired": seen}
        elif now < seen:
            gone[name] = seen - now
    detail = "no key in the source that the batches did not see" + (
        f"; gone since they were scanned (expired or deleted): {gone}" if gone else "")
    if off:
        detail = f"more keys in the source than the batches saw, beyond {tolerance:.1%}: {off}"
    return Check("source_counts", not off, detail, {"fresh": fresh, "differ": off, "gone_since_scan": gone})


def dead_letter_check(mapping: Mapping, totals: dict[str, dict[str, int]], opts: RunOptions,
                      reasons: dict[str, list[tuple[str, int]]]) -> Check:
    """Each pattern's dead letters against its budget: a share of its scanned keys and a floor."""
    by_name = {p.name: p for p in mapping.patterns}
    over, dead = {}, {}
    for name, c in totals.items():
        if not c["dead"]:
            continue
        pattern = by_name.get(name)
        ratio = pattern.max_dead_ratio if pattern and pattern.max_dead_ratio is not None else opts.max_dead_ratio
        floor = pattern.max_dead_keys if pattern and pattern.max_dead_keys is not None else opts.max_dead_keys
        dead[name] = c["dead"]
        if not within(c["dead"], c["scanned"], ratio, floor):
            over[name] = {"dead": c["dead"], "scanned": c["scanned"], "max_ratio": ratio, "max_keys": floor,
                          "reasons": [{"reason": r, "count": n} for r, n in reasons.get(name, [])]}
    if over:
        detail = "dead letters over budget: " + "; ".join(
            f"{name} {o['dead']:,} of {o['scanned']:,} keys ({o['dead'] / o['scanned']:.1%}; budget "
            f"{o['max_ratio']:.1%} and {o['max_keys']} keys)"
            + "".join(f", {r['count']:,} x {r['reason']!r}" for r in o["reasons"][:1])
            for name, o in over.items())
    else:
        detail = "dead letters within budget" + (f": {dead}" if dead else " (none)")
    unread = [name for name, c in totals.items() if name not in over and none_migrated(c)]
    if unread:
        detail += (f"; no key of {', '.join(unread)} migrated, every one a dead letter: does the mapping read"
                   " them? (`migrator report RUN` gives the reasons)")
    return Check("dead_letters", not over, detail, {"over_budget": over, "dead": dead, "none_migrated": unread})


def reference_check(mapping: Mapping, totals: dict[str, dict[str, int]], opts: RunOptions,
                    batches: list[dict[str, Any]]) -> Check:
    """Each pattern's dangling references (an index entry whose record is not there, a record its
    index does not list) against its budget: counted and shown, failed only beyond it."""
    by_name = {p.name: p for p in mapping.patterns}
    over, dangling = {}, {}
    for name, c in totals.items():
        if not c.get("dangling"):
            continue
        pattern = by_name.get(name)
        ratio = pattern.max_dangling_ratio if pattern and pattern.max_dangling_ratio is not None else opts.max_dead_ratio
        dangling[name] = {"dangling": c["dangling"], "of": c["references"],
                          "examples": ledger.dangling_examples(batches, name, 3)}
        if not within(c["dangling"], c["references"], ratio, opts.max_dead_keys):
            over[name] = {**dangling[name], "max_ratio": ratio, "max_keys": opts.max_dead_keys}
    shown = "; ".join(f"{name} {d['dangling']:,} of {d['of']:,}" for name, d in (over or dangling).items())
    if over:
        detail = f"dangling references over budget: {shown}"
    else:
        detail = "references within budget" + (f", dangling: {shown}" if dangling else " (none dangling)")
    return Check("references", not over, detail, {"over_budget": over, "dangling": dangling})


def verification_check(result: dict[str, Any], totals: dict[str, dict[str, int]], tolerance: float) -> Check:
    """The verification's findings: no row differs; missing rows and rows without a key at most
    what live traffic explains (the count tolerance, as for the fresh count)."""
    if result["verdict"] == "incomplete":
        return Check("verification", False, f"not verified: {result.get('error')}", {"verification": result})
    if result["verdict"] == "counted":
        return Check("verification", True, "dry run: nothing kept to compare", {"verification_id": result["verification_id"]})
    if result["verdict"] == "sealed":
        s = result["seal"]
        return Check("verification", True, f"the rows are as their batches wrote them ({s['rows']:,} rows of {s['tables']} "
                     "table(s), each sealed as sent and unchanged since; the keys were counted, not read again: "
                     "`migrator verify` re-reads Redis)",
                     {"verification_id": result["verification_id"], "validation": "sealed", "seal": s})
    bad, noted = {}, {}
    for p in result["patterns"]:
        allowed = math.floor(tolerance * max(p["keys"], totals.get(p["pattern"], {}).get("scanned", 0)))
        found = {f: p[f] for f in ("missing", "different", "extra", "changed") if p[f]}
        if p["different"] or p["missing"] > allowed or p["extra"] > allowed:
            bad[p["pattern"]] = {**found, "columns": p["columns"]}
        elif found:
            noted[p["pattern"]] = found
    t = result["totals"]
    if bad:
        detail = "PostgreSQL does not hold what Redis holds: " + "; ".join(
            f"{name}: " + ", ".join(f"{n:,} {f}" for f, n in found.items() if f != "columns")
            + (f" (columns {', '.join(found['columns'])})" if found["columns"] else "")
            for name, found in bad.items())
    else:
        detail = f"every key's rows match PostgreSQL ({t['compared']:,} keys, {t['rows']:,} rows compared)"
        if noted:
            detail += f"; within the count tolerance or changed by the app since the run: {noted}"
    if t.get("retired"):  # (verify._retire: the run's own validation)
        detail += (f"; {t['retired']:,} stale row(s), whose key is gone or gives them no more, retired by their table's"
                   " on_delete (journaled: `migrator rollback` puts them back)")
    reason = result.get("reason")
    if reason:  # the full re-read of a sealed validation whose seals did not hold
        broken = "; ".join(f"{table}: {', '.join(why.values())}" for table, why in reason["broken"].items())
        detail = f"the seals did not hold ({broken}), so every key was read again: {detail}"
    return Check("verification", not bad, detail,
                 {"verification_id": result["verification_id"], "differ": bad, "noted": noted,
                  "validation": "reread after the seals" if reason else "reread", "seal": reason,
                  "retired": t.get("retired", 0)})


def priority_checks(conn: Any, mapping: Mapping, run_id: str, priority: Priority, opts: RunOptions,
                    verification: dict[str, Any]) -> list[Check]:
    """The checks of one priority, from the ledger and its verification's result."""
    with conn, conn.cursor() as cur:
        batches = [b for b in ledger.batches(cur, run_id) if b["priority"] == priority.label]
        reasons = {g["pattern"]: [(r["reason"], r["count"]) for r in g["dead_reasons"]]
                   for g in ledger.dead_reasons(cur, run_id) if g["priority"] == priority.label}
    totals = ledger.pattern_totals(batches)
    failed = [b["id"] for b in batches if b["status"] != "done"]
    checks = [Check("batches_done", not failed,
                    f"{len(batches) - len(failed)}/{len(batches)} batches done"
                    + (f"; not done: {failed} (`migrator batches {run_id} --failed`)" if failed else ""),
                    {"failed": failed})]
    unbalanced = [n for n, c in totals.items()
                  if c["scanned"] != c["migrated"] + c["skipped"] + c["dead"] + c["expired"]]
    checks.append(Check("balance", not unbalanced,
                        "scanned = migrated + skipped + dead + expired for every pattern" if not unbalanced
                        else f"unbalanced: {unbalanced}", {"unbalanced": unbalanced}))
    checks.append(dead_letter_check(mapping, totals, opts, reasons))
    checks.append(reference_check(mapping, totals, opts, batches))
    counted = opts.counted(mapping, priority)
    fresh = {p["pattern"]: p["keys"] for p in verification.get("patterns", []) if p["pattern"] in counted}
    # patterns whose every key the verification counted came from the run's spool
    spooled = frozenset(p["pattern"] for p in verification.get("patterns", []) if p.get("spooled", 0) >= p["keys"] > 0)
    if verification["verdict"] != "incomplete":
        checks.append(count_check(totals, fresh, opts.count_tolerance, spooled))
    checks.append(verification_check(_narrowed(verification, counted), totals, opts.count_tolerance))
    return checks


def _narrowed(result: dict[str, Any], names: frozenset[str]) -> dict[str, Any]:
    """A verification's result for some of its patterns (one that covered several priorities)."""
    patterns = [p for p in result.get("patterns", []) if p["pattern"] in names]
    totals = {f: sum(p.get(f, 0) for p in patterns) for f in ("keys", "compared", "rows", "retired")}
    return {**result, "patterns": patterns, "totals": totals}


def figure_checks(conn: Any, mapping: Mapping, opts: RunOptions) -> tuple[list[Check], dict[str, Any]]:
    """The mapping's figures over the target tables; dangling references (orphans) are checks,
    within the dead-letter budget of their table's rows."""
    figures: dict[str, Any] = {}
    checks = []
    with conn, conn.cursor() as cur:
        for figure in mapping.figures:
            cur.execute(figure.sql)
            figures[figure.name] = [list(r) for r in cur.fetchall()] if figure.rows else cur.fetchone()[0]
            if figure.dangling_in:
                n = figures[figure.name]
                cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(figure.dangling_in)))
                of = cur.fetchone()[0]
                ok = within(n, of, opts.max_dead_ratio, opts.max_dead_keys)
                checks.append(Check(figure.name, ok, f"{n} {figure.name.replace('_', ' ')}" + (
                    "" if not n else f" of {of} rows ({'within' if ok else 'over'} budget: "
                                     f"{opts.max_dead_ratio:.1%} and {opts.max_dead_keys})"), {"count": n, "of": of}))
    return checks, figures


def validate_run(conn: Any, mapping: Mapping, run_id: str, priorities: list[Priority] | None,
                 verify: Callable[[list[Priority]], dict[str, Any]]) -> dict[str, Any]:
    """Validate a run again, now: the checks each priority got when it ran, over a verification
    (`verify` runs one over the given priorities and returns its result), then the run's own."""
    with conn, conn.cursor() as cur:
        run = ledger.require_run(cur, run_id)
    opts = RunOptions.from_json(run["options"])
    chosen = priorities or opts.priority_order()
    verification = verify(chosen)
    by_priority = {p.label: priority_checks(conn, mapping, run_id, p, opts, verification) for p in chosen}
    checks, figures = figure_checks(conn, mapping, opts)
    ok = all(c.ok for cs in by_priority.values() for c in cs) and all(c.ok for c in checks)
    return {
        "run_id": run_id,
        "ok": ok,
        "priorities": {p: [c.to_json() for c in cs] for p, cs in by_priority.items()},
        RUN: [c.to_json() for c in checks],
        "figures": figures,
        "verification": {k: verification.get(k) for k in
                         ("verification_id", "verdict", "missing", "different", "extra", "changed_since_run")},
    }


def render_validation(result: dict[str, Any]) -> str:
    out = [f"run {result['run_id']}: {'PASS' if result['ok'] else 'FAIL'}"]
    for priority, checks in result["priorities"].items():
        out += [f"  {priority:8} {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {redact_text(c['detail'])}" for c in checks]
    out += [f"  {RUN:8} {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}" for c in result[RUN]]
    out.append("  figures: " + ", ".join(f"{k} {v}" for k, v in result["figures"].items()))
    return "\n".join(out)
