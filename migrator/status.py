"""Progress of a run, read from the ledger only (never from Flower or the result backend)."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from . import ledger
from .mapping import Priority

TERMINAL = ("completed", "dry_run", "failed", "rolled_back")


def run_progress(conn: Any, run_id: str) -> dict[str, Any]:
    with conn, conn.cursor() as cur:
        run = ledger.require_run(cur, run_id)
        batches = ledger.batches(cur, run_id)
        validated = ledger.latest_verdicts(cur, run_id)
        cur.execute("SELECT min(started_at), now() FROM migration_batches WHERE run_id = %s", (run_id,))
        first_start, now = cur.fetchone()
    priorities = []
    for p in Priority:
        mine = [b for b in batches if b["priority"] == p.label]
        if not mine:
            continue
        done = [b for b in mine if b["status"] == "done"]
        scanned = sum(b["scanned"] for b in done)
        seconds = sum(b["seconds"] or 0 for b in done)
        pace = scanned / seconds if seconds else 0.0  # keys per batch-second
        left = len(mine) - len(done)
        running = sum(b["status"] == "running" for b in mine)
        per_batch = seconds / len(done) if done else None
        priorities.append({
            "priority": p.label,
            "batches": len(mine),
            "done": len(done),
            "running": running,
            "failed": sum(b["status"] == "failed" for b in mine),
            "scanned": scanned,
            "migrated": sum(b["migrated"] for b in done),
            "dead": sum(b["dead"] for b in done),
            "keys_per_s": round(pace, 1),
            # batches left x time per batch, shared among the batches running side by side
            "eta_s": (round(per_batch * left / max(1, running), 1) if per_batch is not None else None) if left else 0.0,
            "validated": validated.get(p.label),
        })
    until = run["finished_at"] if run["status"] in TERMINAL and run["finished_at"] else now
    elapsed = max(0.0, (until - first_start).total_seconds()) if first_start else 0.0
    total_scanned = sum(p["scanned"] for p in priorities)
    return {
        "run_id": run_id,
        "status": run["status"],
        "dry_run": run["dry_run"],
        "error": run["error"],
        "elapsed_s": round(elapsed, 1),
        "keys_per_s": round(total_scanned / elapsed, 1) if elapsed else 0.0,
        "priorities": priorities,
        "as_of": datetime.now(timezone.utc).isoformat(),
    }


def render(progress: dict[str, Any]) -> str:
    out = [f"run {progress['run_id']}  {progress['status']}  {progress['elapsed_s']} s  "
           f"{progress['keys_per_s']} keys/s" + (f"  error: {progress['error']}" if progress["error"] else "")]
    for p in progress["priorities"]:
        width = 20
        filled = int(width * p["done"] / p["batches"]) if p["batches"] else width
        verdict = {True: "validated", False: "NOT VALIDATED", None: ""}[p["validated"]]
        eta = f"eta {p['eta_s']} s" if p["eta_s"] else ""
        out.append(f"  {p['priority']:8} [{'#' * filled}{'.' * (width - filled)}] {p['done']}/{p['batches']} ranges"
                   f"  {p['scanned']} keys  {p['dead']} dead  {p['failed']} failed  {eta}  {verdict}".rstrip())
    return "\n".join(out)


def render_batches(batches: list[dict[str, Any]]) -> str:
    head = f"{'id':>6}  {'priority':8}  {'node':>15}  {'range':>7}  {'status':7}  {'tries':>5}  {'scanned':>8}  {'dead':>5}  error"
    rows = [f"{b['id']:>6}  {b['priority']:8}  {b['node'] or '-':>15}  {b['range_index'] + 1:>3}/{b['range_count']:<3}  {b['status']:7}  "
            f"{b['attempts']:>5}  {b['scanned']:>8}  {b['dead']:>5}  {b['error'] or ''}" for b in batches]
    return "\n".join([head, *rows])
