"""Progress of a run, read from the ledger only (never from Flower or the result backend)."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from migrator.views import figures as figures_mod
from migrator.execution import follow
from migrator.core import ledger
from migrator.core.mapping import Priority


def run_progress(conn: Any, run_id: str) -> dict[str, Any]:
    with conn, conn.cursor() as cur:
        run = ledger.require_run(cur, run_id)
        batches = ledger.batches(cur, run_id)
        validated = ledger.latest_verdicts(cur, run_id)
        figures = figures_mod.run_figures(cur, run, batches)
        dead = ledger.dead_reasons(cur, run_id)
        verifying = ledger.verification_progress(cur, run_id)
        stuck = finalize_failures(cur, run_id)
        following = ledger.follow_progress(cur, run_id)
    priorities = []
    for p in Priority:
        mine = [b for b in batches if b["priority"] == p.label]
        if not mine:
            continue
        done = [b for b in mine if b["status"] == "done"]
        stale = [b for b in mine if b["stale"]]
        left = len(mine) - len(done)
        fig = figures["priorities"][p.label]
        # keys still to scan, at the mean of the batches done, over the priority's rate (none while
        # a batch is stale: nobody is running it)
        eta = (fig["keys_scanned"] / len(done) * left / fig["keys_per_s"]
               if done and fig["keys_per_s"] and not stale else None)
        priorities.append({
            "priority": p.label,
            "batches": len(mine),
            "done": len(done),
            "running": sum(b["status"] == "running" and not b["stale"] for b in mine),
            "stale": [{"id": b["id"], "worker": b["worker"], "silent_s": round(b["silent_s"] or 0)} for b in stale],
            "failed": sum(b["status"] == "failed" for b in mine),
            "scanned": fig["keys_scanned"],
            "migrated": sum(b["migrated"] for b in done),
            "dead": sum(b["dead"] for b in done),
            "eta_s": (round(eta, 1) if eta is not None else None) if left else 0.0,
            "validated": validated.get(p.label),
            "verification": verifying.get(p.label),
            "dead_letters": [{k: g[k] for k in ("pattern", "dead", "dead_reasons")} for g in dead
                             if g["priority"] == p.label],
        })
    return {
        "run_id": run_id,
        "status": run["status"],
        "dry_run": run["dry_run"],
        "error": run["error"],
        "figures": figures,
        "priorities": priorities,
        "finalize": stuck,
        "follow": following,
        "as_of": datetime.now(timezone.utc).isoformat(),
    }


def render(progress: dict[str, Any]) -> str:
    if progress.get("follow") is not None:  # a follow session has no batches: its lag and reconciliations
        return follow.render(progress["run_id"], progress["status"], progress["follow"])
    head = f"run {progress['run_id']}  {progress['status']}" + (f"  error: {progress['error']}" if progress["error"] else "")
    out = [head, *figures_mod.render(progress["figures"])]
    for p in progress["priorities"]:
        width = 20
        filled = int(width * p["done"] / p["batches"]) if p["batches"] else width
        verdict = {True: "validated", False: "NOT VALIDATED", None: ""}[p["validated"]]
        eta = (f"{len(p['stale'])} STALE" if p["stale"] else f"eta {p['eta_s']} s" if p["eta_s"] else "")
        v = p["verification"]
        checked = ("" if v is None else f"verifying {v['done']}/{v['ranges']} ranges" if v["status"] == "running"
                   else f"verified: {v['verdict']}")
        out.append(f"  {p['priority']:8} [{'#' * filled}{'.' * (width - filled)}] {p['done']}/{p['batches']} ranges"
                   f"  {p['dead']} dead  {p['failed']} failed  {eta}  {checked}  {verdict}".rstrip())
        out += [f"    {figures_mod.dead_line(d['pattern'], d['dead'], d['dead_reasons'])}" for d in p["dead_letters"]]
        out += [f"    batch {b['id']} stale: no heartbeat for {b['silent_s']} s (worker {b['worker'] or '?'}): "
                f"migrator resume {progress['run_id']}" for b in p["stale"]]
    out += [f"  priority {f['priority']}: {f['detail']}" for f in progress.get("finalize", [])]
    return "\n".join(out)


def finalize_failures(cur: Any, run_id: str) -> list[dict[str, Any]]:
    """Priorities whose latest validation is a failed finalize step (not a batch), with its error
    and the command that runs it again."""
    return [{"priority": priority, "detail": check["detail"]}
            for priority, (_, checks) in ledger.latest_validations(cur, run_id).items()
            for check in checks if check["name"] == "finalize" and not check["ok"]]


def render_batches(batches: list[dict[str, Any]], run_id: str) -> str:
    head = f"{'id':>6}  {'priority':8}  {'node':>15}  {'range':>7}  {'status':7}  {'tries':>5}  {'scanned':>8}  {'dead':>5}  error"
    rows = [f"{b['id']:>6}  {b['priority']:8}  {b['node'] or '-':>15}  {b['range_index'] + 1:>3}/{b['range_count']:<3}  "
            f"{'stale' if b['stale'] else b['status']:7}  {b['attempts']:>5}  {b['scanned']:>8}  {b['dead']:>5}  "
            f"{_stale_note(b, run_id) if b['stale'] else b['error'] or ''}" for b in batches]
    return "\n".join([head, *rows])


def _stale_note(batch: dict[str, Any], run_id: str) -> str:
    return (f"running, but no heartbeat for {round(batch['silent_s'] or 0)} s (worker {batch['worker'] or '?'} died, or "
            f"lost the ledger): migrator requeue {run_id} --batch {batch['id']}")
