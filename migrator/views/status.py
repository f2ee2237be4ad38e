"""Progress of a run, read from the ledger only (never from Flower or the result backend)."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from migrator.views import figures as figures_mod
from migrator.execution import follow
from migrator.core import ledger
from migrator.core.mapping import Priority
from migrator.views import tables
from rich.console import Group, RenderableType
from rich.text import Text


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
        spooled = ledger.spool_size(cur, run_id)
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
        "spool": spooled,
        "as_of": datetime.now(timezone.utc).isoformat(),
    }


def view(progress: dict[str, Any]) -> RenderableType:
    """The status for people: the run's figures, a row per priority (ranges done, dead letters,
    verification, verdict), then its dead letters by reason, stale batches and failed finalize steps."""
    if progress.get("follow") is not None:  # a follow session has no batches: its lag and reconciliations
        return Text(follow.render(progress["run_id"], progress["status"], progress["follow"]))
    head = f"run {progress['run_id']}  {progress['status']}" + (f"  error: {progress['error']}" if progress["error"] else "")
    rows, notes = [], []
    for p in progress["priorities"]:
        verdict = {True: "validated", False: "NOT VALIDATED", None: ""}[p["validated"]]
        eta = (f"{len(p['stale'])} STALE" if p["stale"] else f"eta {p['eta_s']} s" if p["eta_s"] else "")
        v = p["verification"]
        checked = ("" if v is None else f"verifying {v['done']}/{v['ranges']} ranges" if v["status"] == "running"
                   else f"verified: {v['verdict']}")
        rows.append((p["priority"], f"{p['done']}/{p['batches']}", p["running"], p["failed"], f"{p['dead']:,}", eta,
                     checked, verdict))
        notes += [f"    {figures_mod.dead_line(d['pattern'], d['dead'], d['dead_reasons'])}" for d in p["dead_letters"]]
        notes += [f"    batch {b['id']} stale: no heartbeat for {b['silent_s']} s (worker {b['worker'] or '?'}): "
                  f"migrator resume {progress['run_id']}" for b in p["stale"]]
    notes += [f"  priority {f['priority']}: {f['detail']}" for f in progress.get("finalize", [])]
    notes += spool_note(progress.get("spool"))
    shown = tables.table(("priority", "ranges done", "running", "failed", "dead", "", "verification", "verdict"), rows,
                         right=(1, 2, 3, 4))
    return Group(*map(Text, [head, *figures_mod.render(progress["figures"])]), shown, *map(Text, notes))


def spool_note(spooled: dict[str, int] | None) -> list[str]:
    """What the run's spool holds in PostgreSQL, and how its space comes back."""
    if not spooled or not spooled["ranges"]:
        return []
    return [f"  spool: {spooled['keys']:,} key names of {spooled['ranges']} range(s), {spooled['bytes'] / 2**20:,.1f} MB "
            f"({ledger.SPOOL_TABLE}, unlogged): dropped when the run completes or is rolled back; its space is reused "
            f"by later spools, and handed back to the system by VACUUM FULL {ledger.SPOOL_TABLE}"]


def render(progress: dict[str, Any]) -> str:
    return tables.text(view(progress))


def finalize_failures(cur: Any, run_id: str) -> list[dict[str, Any]]:
    """Priorities whose latest validation is a failed finalize step (not a batch), with its error
    and the command that runs it again."""
    return [{"priority": priority, "detail": check["detail"]}
            for priority, (_, checks) in ledger.latest_validations(cur, run_id).items()
            for check in checks if check["name"] == "finalize" and not check["ok"]]


def render_batches(batches: list[dict[str, Any]], run_id: str) -> str:
    rows = [(b["id"], b["priority"], b["node"] or "-", f"{b['range_index'] + 1}/{b['range_count']}",
             "stale" if b["stale"] else b["status"], b["attempts"], b["scanned"], b["dead"],
             _stale_note(b, run_id) if b["stale"] else b["error"] or "") for b in batches]
    return tables.text(tables.table(("id", "priority", "node", "range", "status", "tries", "scanned", "dead", "error"),
                                    rows, right=(0, 2, 3, 5, 6, 7)))


def _stale_note(batch: dict[str, Any], run_id: str) -> str:
    return (f"running, but no heartbeat for {round(batch['silent_s'] or 0)} s (worker {batch['worker'] or '?'} died, or "
            f"lost the ledger): migrator requeue {run_id} --batch {batch['id']}")
