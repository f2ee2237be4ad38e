"""`migrator report RUN --html`: the report as one self-contained HTML file (no script, no external
resource: it opens anywhere, offline, and can be mailed). The balance per pattern, dead letters grouped
by reason, the validation and verification verdicts per priority, and two charts drawn here as inline
SVG from the ledger's batch timings: keys per second over time per priority, and where the batches'
time went (scan, read, transform, write). Its data is the text report's (report.build_report) and the
ledger's, never queried anew here.
"""
from __future__ import annotations

from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from migrator.core import ledger
from migrator.core.ledger import COUNT_FIELDS, STAGES
from migrator.core.mapping import Mapping, Priority
from migrator.views.report import build_report

COLOURS = {"critical": "#c0392b", "high": "#d68910", "medium": "#2471a3", "low": "#229954"}
STAGE_COLOURS = dict(zip(STAGES, ("#5d6d7e", "#2471a3", "#8e44ad", "#229954", "#7dcea0", "#d68910")))
BINS = 40  # points of the throughput chart


def gather(conn: Any, mapping: Mapping, run_id: str) -> dict[str, Any]:
    """The report, with what the HTML adds: each priority's checks and latest verification, and the batches."""
    report = build_report(conn, mapping, run_id)
    with conn, conn.cursor() as cur:
        latest = ledger.latest_validations(cur, run_id)  # (ledger.latest_checks was merged into this)
        report["checks"] = {p: latest[p][1] for p in report["validated"] if p in latest}
        report["verifications"] = ledger.verification_progress(cur, run_id)
        report["batch_rows"] = ledger.batches(cur, run_id)
    return report


def throughput(batches: list[dict[str, Any]], bins: int = BINS) -> tuple[float, dict[str, list[float]]]:
    """(seconds per bin, per priority its keys/s in each bin) over the run's batches done, each
    batch's keys spread evenly over its own start to finish."""
    done = [b for b in batches if b["status"] == "done" and b["started_at"] and b["finished_at"]]
    if not done:
        return 0.0, {}
    start = min(b["started_at"] for b in done)
    span = max((max(b["finished_at"] for b in done) - start).total_seconds(), 1e-3)
    width = span / bins
    series: dict[str, list[float]] = {}
    for b in done:
        line = series.setdefault(b["priority"], [0.0] * bins)
        t0, t1 = (b["started_at"] - start).total_seconds(), (b["finished_at"] - start).total_seconds()
        rate = b["scanned"] / max(t1 - t0, 1e-6)
        for i in range(bins):
            overlap = min(t1, (i + 1) * width) - max(t0, i * width)
            if overlap > 0:
                line[i] += rate * overlap / width
    order = [p.label for p in Priority]
    return width, {p: series[p] for p in sorted(series, key=order.index)}


def _throughput_svg(width_s: float, series: dict[str, list[float]]) -> str:
    w, h, left, bottom = 720, 240, 60, 30
    top = max((max(v) for v in series.values()), default=0.0) or 1.0
    parts = [f'<svg class="chart" id="throughput" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + bottom}" '
             f'role="img" aria-label="keys per second over time per priority">',
             f'<line x1="{left}" y1="{h}" x2="{w}" y2="{h}" stroke="#999"/>',
             f'<line x1="{left}" y1="0" x2="{left}" y2="{h}" stroke="#999"/>',
             f'<text x="{left - 6}" y="12" text-anchor="end" font-size="11">{top:,.0f}</text>',
             f'<text x="{left - 6}" y="{h}" text-anchor="end" font-size="11">0</text>',
             f'<text x="{w}" y="{h + 20}" text-anchor="end" font-size="11">{width_s * BINS:,.2f} s</text>']
    for priority, values in series.items():
        step = (w - left) / max(len(values) - 1, 1)
        points = " ".join(f"{left + i * step:.1f},{h - v / top * (h - 10):.1f}" for i, v in enumerate(values))
        parts.append(f'<polyline class="series" data-priority="{priority}" fill="none" stroke-width="2" '
                     f'stroke="{COLOURS.get(priority, "#333")}" points="{points}"/>')
    legend = "".join(f'<span style="color:{COLOURS.get(p, "#333")}">&#9632; {escape(p)}</span> ' for p in series)
    return "".join(parts) + "</svg>" + f'<div class="legend">{legend}keys/s</div>'


def _stages_svg(stages: dict[str, float]) -> str:
    w, row = 720, 26
    total = max(stages.values(), default=0.0) or 1.0
    parts = [f'<svg class="chart" id="stages" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{row * len(stages)}" '
             f'role="img" aria-label="seconds per stage">']
    for i, (stage, seconds) in enumerate(stages.items()):
        y = i * row
        parts.append(f'<text x="0" y="{y + 17}" font-size="12">{escape(stage)}</text>'
                     f'<rect class="bar" data-stage="{stage}" x="110" y="{y + 4}" height="{row - 8}" '
                     f'width="{max(seconds / total * (w - 230), 0):.1f}" fill="{STAGE_COLOURS.get(stage, "#333")}"/>'
                     f'<text x="{w - 110}" y="{y + 17}" font-size="12">{seconds:,.3f} s</text>')
    return "".join(parts) + "</svg>"


def _table(head: list[str], rows: list[list[Any]], cls: str) -> str:
    cells = lambda r, tag: "".join(f"<{tag}>{escape(str(v))}</{tag}>" for v in r)
    return (f'<table class="{cls}"><thead><tr>{cells(head, "th")}</tr></thead><tbody>'
            + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows) + "</tbody></table>")


def render_html(report: dict[str, Any]) -> str:
    """The HTML of a report made by gather()."""
    head = ["pattern", "priority", "table", *COUNT_FIELDS, "rows", "balanced"]
    balance = [[p["pattern"], p["priority"], p["table"] or "-", *(p[f] for f in COUNT_FIELDS), p["rows"],
                "yes" if p["balanced"] else "NO"] for p in report["patterns"]]
    t = report["totals"]
    balance.append(["TOTAL", "", "", *(t[f] for f in COUNT_FIELDS), t["rows"], "yes" if report["balanced"] else "NO"])
    dead = [[p["pattern"], r["count"], r["reason"]] for p in report["patterns"] for r in p["dead_reasons"]]
    verdicts = []
    for priority in [p.label for p in Priority]:
        if priority not in report["validated"] and priority not in report["verifications"]:
            continue
        ok = report["validated"].get(priority)
        failed = [c["name"] + (f": {c['detail']}" if c.get("detail") else "")
                  for c in report["checks"].get(priority, []) if not c.get("ok")]
        v = report["verifications"].get(priority, {})
        verdicts.append([priority, "PASS" if ok else ("FAIL" if ok is False else "-"), v.get("verdict") or "-",
                         "; ".join(failed) or "-"])
    width_s, series = throughput(report["batch_rows"])
    f = report["figures"]
    status = report["status"] + (" (dry run: nothing kept)" if report["dry_run"] else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>migrator report {escape(report['run_id'])}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin: 8px 0 20px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; font-size: 13px; }}
td {{ text-align: right; }} td:first-child, td:nth-child(2), td:nth-child(3) {{ text-align: left; }}
table.dead td:last-child, table.verdicts td:last-child {{ text-align: left; }}
table.balance tr:last-child td {{ font-weight: bold; }} .legend {{ font-size: 12px; }}
.bad {{ color: #c0392b; }}
</style></head><body>
<h1>Run {escape(report['run_id'])}</h1>
<p id="status">status <b class="{'' if report['status'] in ('completed', 'dry_run') else 'bad'}">{escape(status)}</b>;
balance {'holds' if report['balanced'] else '<b class="bad">DOES NOT HOLD</b>'};
{f['keys_scanned']:,} keys in {f['elapsed_s']:,.3f} s running, {f['rows_written']:,} rows written;
batches {report['batches']['done']}/{report['batches']['total']} done, {report['batches']['failed']} failed
{f"<br>error: {escape(report['error'])}" if report['error'] else ''}</p>
<h2>Balance per pattern: scanned = migrated + skipped + dead + expired</h2>
{_table(head, balance, "balance")}
<h2>Dead letters by reason</h2>
{_table(["pattern", "count", "reason"], dead, "dead") if dead else '<p id="no-dead">none</p>'}
<h2>Verdicts per priority</h2>
{_table(["priority", "validation", "verification", "failed checks"], verdicts, "verdicts")}
<h2>Throughput over time (keys/s per priority)</h2>
{_throughput_svg(width_s, series)}
<h2>Where the batches' time went (summed over batches)</h2>
{_stages_svg(report['stage_seconds'])}
<p class="legend">write runs beside the others; write_wait is what of it held the batch up; throttle is time slept
under --max-keys-per-sec. Made {escape(datetime.now().astimezone().isoformat(timespec='seconds'))}.</p>
</body></html>
"""


def write_html(conn: Any, mapping: Mapping, run_id: str, directory: Path) -> Path:
    path = Path(directory) / f"migration_report_{run_id}.html"
    path.write_text(render_html(gather(conn, mapping, run_id)), encoding="utf-8")
    return path
