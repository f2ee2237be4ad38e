"""The end-of-run report: per pattern, scanned = migrated + skipped + dead + expired, with timings
in the manner of pgloader's summary, and the guide's monitoring figures."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from psycopg2 import sql

from migrator.views import figures as figures_mod
from migrator.core import ledger
from migrator.core.ledger import COUNT_FIELDS
from migrator.core.mapping import UNMAPPED, UNMAPPED_REASON, Mapping, Priority
from migrator.core.options import RunOptions
from migrator.core.redact import printable, redact_text
from migrator.core.validate import figure_checks, none_migrated
from migrator.views import tables


def build_report(conn: Any, mapping: Mapping, run_id: str) -> dict[str, Any]:
    with conn, conn.cursor() as cur:
        run = ledger.require_run(cur, run_id)
        batches = ledger.batches(cur, run_id)
        validations = ledger.latest_validations(cur, run_id)
        stages = ledger.stage_seconds(cur, run_id)
        figures = figures_mod.run_figures(cur, run, batches)
        reasons = {(g["priority"], g["pattern"]): g["dead_reasons"] for g in ledger.dead_reasons(cur, run_id)}
    verdicts = {label: ok for label, (ok, _) in validations.items()}
    # how each priority's rows were checked: sealed, or re-read (the verification check says), and the
    # rows the re-read found no key gives that it retired (verify._retire)
    checked = {label: next((c["data"] for c in checks if c["name"] == "verification"), {})
               for label, (_, checks) in validations.items()}
    validated_by = {label: data["validation"] + (f"; {data['retired']:,} stale row(s) retired" if data.get("retired") else "")
                    for label, data in checked.items() if data.get("validation")}
    totals = ledger.pattern_totals(batches)
    scanned_in = {p.label: 0 for p in Priority}
    patterns = []
    ordered = sorted(mapping.patterns, key=lambda p: p.priority)  # stable: declaration order within a priority
    for pattern in [*ordered, None]:
        name = pattern.name if pattern else UNMAPPED
        if name not in totals:
            continue
        c = totals[name]
        priority = (pattern.priority if pattern else mapping.unmapped_priority).label
        scanned_in[priority] += c["scanned"]
        patterns.append({
            "pattern": name,
            "glob": pattern.glob if pattern else "*",
            "priority": priority,
            "table": pattern.table if pattern else None,
            **c,
            "skip_reason": (pattern.skip if pattern else UNMAPPED_REASON) if c["skipped"] else None,
            "balanced": c["scanned"] == c["migrated"] + c["skipped"] + c["dead"] + c["expired"],
            "dead_reasons": reasons.get((priority, name), []),
            "dangling_examples": [{k: v if v is None else printable(redact_text(v)) for k, v in e.items()}
                                  for e in ledger.dangling_examples(batches, name)],
        })
    for p in patterns:
        # a pattern's share of its priority's elapsed time, by keys scanned (batches mix patterns)
        share = p["scanned"] / scanned_in[p["priority"]] if scanned_in[p["priority"]] else 0.0
        of_priority = figures["priorities"].get(p["priority"], {"elapsed_s": 0.0, "keys_per_s": None})
        p["seconds"] = round(of_priority["elapsed_s"] * share, 3)
        # scanned / (elapsed x scanned / scanned in the priority): the priority's own rate
        p["keys_per_s"] = of_priority["keys_per_s"] if p["seconds"] else None
    return {
        "run_id": run_id,
        "status": run["status"],
        "dry_run": run["dry_run"],
        "error": run["error"],
        "patterns": patterns,
        "totals": {f: sum(p[f] for p in patterns) for f in (*COUNT_FIELDS, "rows", "dangling")},
        "figures": figures,  # keys/s, elapsed (batches running) and wall clock, rows written: as `status` shows them
        "batches": {"total": len(batches), "failed": sum(b["status"] == "failed" for b in batches),
                    "done": sum(b["status"] == "done" for b in batches)},
        "balanced": all(p["balanced"] for p in patterns),
        "validated": verdicts,  # per priority: did its latest validation pass
        "validated_by": validated_by,  # per priority: "sealed", "reread", or "reread after the seals" did not hold
        "stage_seconds": stages,  # summed over batches and workers (ledger.STAGES)
    }


def monitoring(conn: Any, mapping: Mapping) -> dict[str, Any]:
    """The guide's monitoring figures: per table its exact row count and size, then the mapping's figures.

    pg_stat_user_tables lags the writes (a session flushes its statistics at most once a second,
    and an idle one only after 10 s), so rows are counted; its cumulative insert, update and
    delete statistics are kept apart, under a name that says so.
    """
    _, figures = figure_checks(conn, mapping, RunOptions())
    tables = []
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT t, pg_total_relation_size(c.oid), s.n_tup_ins, s.n_tup_upd, s.n_tup_del"
            " FROM unnest(%s::text[]) AS t JOIN pg_class c ON c.oid = to_regclass(t)"
            " LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid ORDER BY 2 DESC, t",
            (mapping.table_names(),))
        for table, size, ins, upd, dels in cur.fetchall():
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
            tables.append({"table": table, "rows": cur.fetchone()[0], "bytes": size,
                           "stats_may_lag": {"n_tup_ins": ins, "n_tup_upd": upd, "n_tup_del": dels}})
    return {"tables": tables, "figures": figures}


def write_report(report: dict[str, Any], directory: Path) -> Path:
    path = Path(directory) / f"migration_report_{report['run_id']}.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2, default=str))
    return path


def render(report: dict[str, Any]) -> str:
    head = ("pattern", "priority", "table", "read", "migrated", "rows", "skipped", "dead", "expired", "dangling", "seconds",
            "keys/s", "ok")
    line_of = lambda p: (p["pattern"], p["priority"], p["table"] or "-", f"{p['scanned']:,}", f"{p['migrated']:,}",
                         f"{p['rows']:,}", f"{p['skipped']:,}", f"{p['dead']:,}", f"{p['expired']:,}", f"{p['dangling']:,}",
                         f"{p['seconds']:.3f}", f"{p['keys_per_s']:,.1f}" if p["keys_per_s"] else "-")
    rows = [(*line_of(p), "yes" if p["balanced"] else "NO") for p in report["patterns"]]
    t, f = report["totals"], report["figures"]
    total = ("TOTAL", "", "", *(f"{t[k]:,}" for k in ("scanned", "migrated", "rows", "skipped", "dead", "expired", "dangling")),
             f"{f['elapsed_s']:.3f}", f"{f['keys_per_s']:,.1f}" if f["keys_per_s"] else "-",
             "yes" if report["balanced"] else "NO")
    out = [f"run {report['run_id']}  status {report['status']}" + ("  (dry run: nothing kept)" if report["dry_run"] else ""),
           tables.text(tables.table(head, rows, right=range(3, 12), footer=total))]
    skipped = [p for p in report["patterns"] if p["skip_reason"]]
    if skipped:
        out.append("skipped because:")
        out += [f"  {p['pattern']}: {p['skip_reason']}" for p in skipped]
    dead = [p for p in report["patterns"] if p["dead"]]
    if dead:
        out.append("dead letters by reason:")
        out += [f"  {figures_mod.dead_line(p['pattern'], p['dead'], p['dead_reasons'])}"
                + ("  (no key of it migrated: does its mapping read them?)" if none_migrated(p) else "")
                for p in dead]
    dangling = [p for p in report["patterns"] if p["dangling"]]
    if dangling:
        out.append("dangling references (an index entry whose record is not there, a record its index does not list):")
        out += [f"  {p['pattern']}: {p['dangling']:,} of {p['references']:,}, e.g. "
                + "; ".join(dangling_line(e) for e in p["dangling_examples"][:3]) for p in dangling]
    b = report["batches"]
    out.append(f"batches {b['done']}/{b['total']} done, {b['failed']} failed; "
               f"balance {'holds' if report['balanced'] else 'DOES NOT HOLD'}")
    out += figures_mod.render(f)
    if report["validated"]:
        out.append("validated: " + ", ".join(f"{p} {'yes' if ok else 'NO'}"
                                             + (f" ({report['validated_by'][p]})" if p in report["validated_by"] else "")
                                             for p, ok in report["validated"].items()))
    if report["error"]:
        out.append(f"error: {report['error']}")
    if "monitoring" in report:
        m = report["monitoring"]
        out.append("tables (rows counted now): " + ", ".join(f"{t['table']} {t['rows']:,} rows {t['bytes'] // 1024:,} KiB"
                                                             for t in m["tables"]))
        if m["figures"]:  # (a mapping file declares none)
            out.append("figures: " + ", ".join(f"{k} {v}" for k, v in m["figures"].items()))
    return "\n".join(out)


def dangling_line(example: dict[str, Any]) -> str:
    """One dangling reference (masked by build_report): which key made it and what it names."""
    held = f" does not hold {example['member']}" if example.get("member") is not None else " is not there"
    return f"{example['key']} -> {example['reference']}{held}"
