"""The end-of-run report: per pattern, scanned = migrated + skipped + dead + expired."""
from __future__ import annotations

from typing import Any

from . import ledger
from .ledger import COUNT_FIELDS
from .mapping import UNMAPPED, UNMAPPED_REASON, Mapping


def build_report(conn: Any, mapping: Mapping, run_id: str) -> dict[str, Any]:
    with conn, conn.cursor() as cur:
        run = ledger.require_run(cur, run_id)
        batches = ledger.batches(cur, run_id)
        verdicts = ledger.latest_verdicts(cur, run_id)
    totals = ledger.pattern_totals(batches)
    patterns = []
    ordered = sorted(mapping.patterns, key=lambda p: p.priority)  # stable: declaration order within a priority
    for pattern in [*ordered, None]:
        name = pattern.name if pattern else UNMAPPED
        if name not in totals:
            continue
        c = totals[name]
        patterns.append({
            "pattern": name,
            "glob": pattern.glob if pattern else "*",
            "priority": (pattern.priority if pattern else mapping.unmapped_priority).label,
            "table": pattern.table if pattern else None,
            **c,
            "skip_reason": (pattern.skip if pattern else UNMAPPED_REASON) if c["skipped"] else None,
            "balanced": c["scanned"] == c["migrated"] + c["skipped"] + c["dead"] + c["expired"],
        })
    sums = {f: sum(p[f] for p in patterns) for f in COUNT_FIELDS}
    return {
        "run_id": run_id,
        "status": run["status"],
        "dry_run": run["dry_run"],
        "error": run["error"],
        "patterns": patterns,
        "totals": sums,
        "rows_written": sum(b["rows_written"] for b in batches),
        "batches": {"total": len(batches), "failed": sum(b["status"] == "failed" for b in batches),
                    "done": sum(b["status"] == "done" for b in batches)},
        "balanced": all(p["balanced"] for p in patterns),
        "validated": verdicts,  # per priority: did its latest validation pass
    }


def render(report: dict[str, Any]) -> str:
    head = ("pattern", "priority", "table", *COUNT_FIELDS, "ok")
    rows = [(p["pattern"], p["priority"], p["table"] or "-", *(str(p[f]) for f in COUNT_FIELDS),
             "yes" if p["balanced"] else "NO") for p in report["patterns"]]
    rows.append(("TOTAL", "", "", *(str(report["totals"][f]) for f in COUNT_FIELDS), "yes" if report["balanced"] else "NO"))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(v).rjust(w) if i >= 3 else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
    out = [f"run {report['run_id']}  status {report['status']}" + ("  (dry run: nothing kept)" if report["dry_run"] else ""),
           line(head), line(tuple("-" * w for w in widths)), *map(line, rows)]
    skipped = [p for p in report["patterns"] if p["skip_reason"]]
    if skipped:
        out.append("skipped because:")
        out += [f"  {p['pattern']}: {p['skip_reason']}" for p in skipped]
    b = report["batches"]
    out.append(f"batches {b['done']}/{b['total']} done, {b['failed']} failed; rows written {report['rows_written']}; "
               f"balance {'holds' if report['balanced'] else 'DOES NOT HOLD'}")
    if report["error"]:
        out.append(f"error: {report['error']}")
    return "\n".join(out)
