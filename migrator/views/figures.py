"""Figures of a run, computed once from the ledger: keys scanned, rows written, elapsed time and
keys/s, per priority and for the whole run, and the line its dead letters grouped by reason
(ledger.dead_reasons) make. `status` and `report` show these and compute none of their own, so the
two cannot disagree.

Elapsed time is the time during which at least one batch was running (the union of the
batches' [started_at, finished_at]): a run that failed, waited and had batches requeued later
does not count the wait. The wall clock (planned to finished) is a figure of its own.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable

from migrator.core import runstate
from migrator.core.mapping import Priority


def active_seconds(spans: Iterable[tuple[datetime, datetime]]) -> float:
    """Seconds covered by at least one of the spans."""
    total, start, end = 0.0, None, None
    for lo, hi in sorted(spans):
        if end is None or lo > end:
            if end is not None:
                total += (end - start).total_seconds()
            start, end = lo, hi
        else:
            end = max(end, hi)
    if end is not None:
        total += (end - start).total_seconds()
    return total


def _span(batch: dict[str, Any], until: datetime) -> tuple[datetime, datetime] | None:
    """When a batch ran: a running one until `until`; its latest attempt only (the ledger keeps no other)."""
    lo = batch["started_at"]
    if lo is None:
        return None
    hi = until if batch["status"] == "running" else batch["finished_at"]
    return (lo, hi) if hi is not None and hi > lo else None


def _of(batches: list[dict[str, Any]], until: datetime) -> dict[str, Any]:
    done = [b for b in batches if b["status"] == "done"]
    scanned = sum(b["scanned"] for b in done)
    elapsed = active_seconds(s for s in (_span(b, until) for b in batches) if s is not None)
    return {
        "keys_scanned": scanned,
        "rows_written": sum(b["rows_written"] for b in done),
        "elapsed_s": round(elapsed, 3),
        "keys_per_s": round(scanned / elapsed, 1) if elapsed else None,
    }


def run_figures(cur: Any, run: dict[str, Any], batches: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's figures as of now (ledger.get_run and ledger.batches rows); counts are of done batches."""
    cur.execute("SELECT now()")  # the server's clock, which stamped the ledger
    now = cur.fetchone()[0]
    # a run that ended stops the clock, even for a batch its lost worker left 'running'
    until = run["finished_at"] if run["status"] in runstate.TERMINAL and run["finished_at"] else now
    priorities = {p.label: _of(mine, until) for p in Priority
                  if (mine := [b for b in batches if b["priority"] == p.label])}
    wall = round((until - run["started_at"]).total_seconds(), 3) if run["started_at"] else None
    return {**_of(batches, until), "wall_clock_s": wall, "priorities": priorities}


def _line(figures: dict[str, Any]) -> str:
    """One line of figures, the same wherever it is printed."""
    rate = f"{figures['keys_per_s']:,.1f} keys/s" if figures["keys_per_s"] is not None else "- keys/s"
    return (f"{figures['keys_scanned']:,} keys in {figures['elapsed_s']:,.3f} s running, {rate}, "
            f"{figures['rows_written']:,} rows written")


def render(figures: dict[str, Any]) -> list[str]:
    """The run's line (with its wall clock), then one per priority."""
    wall = f" (wall clock {figures['wall_clock_s']:,.3f} s)" if figures["wall_clock_s"] is not None else ""
    return [f"run: {_line(figures)}{wall}",
            *(f"  {label}: {_line(f)}" for label, f in figures["priorities"].items())]


def dead_line(pattern: str, dead: int, reasons: list[dict[str, Any]]) -> str:
    """`pattern: 4,812 dead — 4,800 × "reason"; 12 × "other reason"`, and how many the top reasons leave out."""
    parts = [f'{r["count"]:,} × "{r["reason"]}"' for r in reasons]
    rest = dead - sum(r["count"] for r in reasons)
    if rest > 0 and parts:
        parts.append(f"{rest:,} for other reasons")
    return f"{pattern}: {dead:,} dead" + (" — " + "; ".join(parts) if parts else "")
