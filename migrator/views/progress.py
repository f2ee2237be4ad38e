"""Progress by keys, as a person watches a run: the whole run and each priority, keys walked of the
planned estimate, keys/s, elapsed and ETA, read from the ledger, so it is the same whether the
batches run here (`run --local`) or on workers (`run`, `status --watch`).

What is counted: every key a batch's SCAN returned, of any priority (a priority's pass walks the
whole keyspace: MATCH and TYPE filter after buckets are visited), as RIOT's "Scanning" bar counts.
The estimate is the keyspace's size (DBSIZE) when the run was planned, once per priority's pass;
a keyspace that grows or shrinks meanwhile moves the truth away from it, and the display says what
it is an estimate of. A running batch's count is written by its heartbeat (migrator/core/lease.py), so
progress moves within a long range, not only when a range ends.

A verification (`migrator verify`, local or on workers) is shown the same way: keys its ranges'
SCAN walked (written as they run: migrator/core/verify.py _Walked) of the same estimate, once for the
priorities it checks together. A follow session (`migrator follow`) has no estimate: its lag,
pending keys, rates, reconnects and reconciliations, as the ledger keeps them.

On a terminal the view is redrawn in place (rich); elsewhere it is one line per interval.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, TextIO

import psycopg2
from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from migrator.core import ledger, runstate
from migrator.core.mapping import Priority
from migrator.execution import follow
from migrator.views import figures as figures_mod

ESTIMATE_OF = "estimate: DBSIZE at plan, once per priority's pass"
# Not on a terminal: a line this often (a log file or CI output is read later, not watched).
LINE_SECONDS = float(os.environ.get("MIGRATOR_PROGRESS_SECONDS") or 10)


def measure(conn: Any, run_id: str) -> dict[str, Any]:
    """The run's progress by keys, as of now: for the run and each priority its keys walked, the
    estimate, keys/s (walked over the time batches ran, figures.active_seconds) and the ETA."""
    with conn, conn.cursor() as cur:
        run = ledger.require_run(cur, run_id)
        batches = ledger.batches(cur, run_id)
        figures = figures_mod.run_figures(cur, run, batches)
        planned, walked = ledger.keys_walked(cur, run_id)
    priorities = []
    for p in Priority:
        mine = [b for b in batches if b["priority"] == p.label]
        if mine:
            done = all(b["status"] == "done" for b in mine)
            priorities.append(_figures(p.label, walked[p.label], planned, figures["priorities"][p.label]["elapsed_s"],
                                       done, sum(b["status"] == "done" for b in mine), len(mine)))
    ended = run["status"] in runstate.TERMINAL
    whole = _figures("run", sum(walked.values()), planned * len(priorities) if planned is not None else None,
                     figures["elapsed_s"], all(p["done"] for p in priorities), sum(p["ranges_done"] for p in priorities),
                     sum(p["ranges"] for p in priorities))
    left = [p for p in priorities if not p["done"]]
    if left and whole["keys_per_s"] and not ended:
        # what the priorities still running or to come have left, at the run's rate so far
        whole["eta_s"] = sum(p["estimate"] - min(p["walked"], p["estimate"]) for p in left) / whole["keys_per_s"] \
            if planned is not None else None
    elif ended:
        whole["eta_s"] = None if left else 0.0
    return {"run_id": run_id, "status": run["status"], "keys_planned": planned, "run": whole, "priorities": priorities}


def _figures(name: str, walked: int, estimate: int | None, elapsed: float, done: bool, ranges_done: int,
             ranges: int) -> dict[str, Any]:
    rate = walked / elapsed if elapsed else None
    left = None if estimate is None else max(estimate - walked, 0)
    # a pass that walked past its estimate (the keyspace grew) has no honest ETA until it ends
    eta = 0.0 if done else (left / rate if rate and left else None)
    return {"name": name, "walked": walked, "estimate": estimate, "keys_per_s": round(rate, 1) if rate else None,
            "elapsed_s": round(elapsed, 1), "eta_s": round(eta, 1) if eta is not None else None, "done": done,
            "ranges_done": ranges_done, "ranges": ranges}


def measure_verification(conn: Any, run_id: str, after: int | None) -> dict[str, Any] | None:
    """The progress of run `run_id`'s latest verification after id `after` (None: none begun yet):
    keys walked of the run's keys planned (one SCAN of the keyspace checks all its priorities)."""
    with conn, conn.cursor() as cur:
        found = ledger.verification_walked(cur, run_id, after)
    if found is None:
        return None
    done = found["status"] != "running"
    shown = _figures("verify " + ",".join(found["priorities"]), found["walked"], found["keys_planned"],
                     found["elapsed_s"], done and found["ranges_done"] == found["ranges"], found["ranges_done"],
                     found["ranges"])
    return {"run_id": run_id, "verification_id": found["id"], "status": found["status"], "verify": shown}


def verify_line(measured: dict[str, Any]) -> str:
    f = measured["verify"]
    rate = f"{f['keys_per_s']:,.1f}/s" if f["keys_per_s"] is not None else "-/s"
    estimate = f"{f['estimate']:,}" if f["estimate"] is not None else "?"
    return (f"verification {measured['verification_id']} of run {measured['run_id']} {measured['status']}: "
            f"{f['name']} {_share(f):.0%} {f['walked']:,}/{estimate} keys ({_clock(f['elapsed_s'])} / "
            f"{_clock(f['eta_s'])}) {rate}, ranges {f['ranges_done']}/{f['ranges']} [{ESTIMATE_OF}]")


def verify_view(measured: dict[str, Any]) -> Table:
    f = measured["verify"]
    shown = Table(box=None, show_header=True, pad_edge=False, title_justify="left", caption_justify="left",
                  title=Text(f"verification {measured['verification_id']} of run {measured['run_id']}  {measured['status']}"),
                  caption=Text(f"keys walked by SCAN; {ESTIMATE_OF}"))
    for name, justify in (("", "left"), ("", "left"), ("", "right"), ("keys walked / estimate", "right"),
                          ("keys/s", "right"), ("elapsed", "right"), ("ETA", "right"), ("ranges", "right")):
        shown.add_column(name, justify=justify, no_wrap=True)
    shown.add_row(f["name"], ProgressBar(total=1.0, completed=_share(f), width=30), f"{_share(f):.0%}",
                  f"{f['walked']:,} / {f['estimate']:,}" if f["estimate"] is not None else f"{f['walked']:,} / ?",
                  f"{f['keys_per_s']:,.1f}" if f["keys_per_s"] is not None else "-", _clock(f["elapsed_s"]),
                  _clock(f["eta_s"]), f"{f['ranges_done']}/{f['ranges']}")
    return shown


def follow_line(run_id: str, status: str, p: dict[str, Any]) -> str:
    """A follow session's figures on one line (follow.render: the same, in full)."""
    return (f"follow session {run_id} {status}: lag {p['lag_s']:.3f} s, {p['pending']:,} pending, "
            f"{p['events_per_s']:,.1f} events/s, {p['applied_per_s']:,.1f} applied/s, {p['keys_applied']:,} keys applied, "
            f"reconnects {p['reconnects']:,}, reconciliations {p['reconciliations']:,} "
            f"({p['reconciliations_repaired']:,} repaired)"
            + (f"; NOT RECEIVING the events of {p['unsubscribed']}" if p["unsubscribed"] else ""))


def _clock(seconds: float | None) -> str:
    return "-:--:--" if seconds is None else str(timedelta(seconds=round(seconds)))


def _share(f: dict[str, Any]) -> float:
    if f["done"]:
        return 1.0
    return min(f["walked"] / f["estimate"], 1.0) if f["estimate"] else 0.0


def line(measured: dict[str, Any]) -> str:
    """One line: the run, then each priority, as RIOT prints its progress."""
    def part(f: dict[str, Any]) -> str:
        rate = f"{f['keys_per_s']:,.1f}/s" if f["keys_per_s"] is not None else "-/s"
        estimate = f"{f['estimate']:,}" if f["estimate"] is not None else "?"
        return (f"{f['name']} {_share(f):.0%} {f['walked']:,}/{estimate} keys ({_clock(f['elapsed_s'])} / "
                f"{_clock(f['eta_s'])}) {rate}")
    return (f"run {measured['run_id']} {measured['status']}: " + "; ".join(map(part, [measured["run"], *measured["priorities"]]))
            + f" [{ESTIMATE_OF}]")


def view(measured: dict[str, Any]) -> Table:
    """The view for a terminal: a bar per priority and one for the run."""
    shown = Table(box=None, show_header=True, pad_edge=False, title_justify="left",
                  title=Text(f"run {measured['run_id']}  {measured['status']}"), caption_justify="left",
                  caption=Text(f"keys walked by SCAN; {ESTIMATE_OF}"))
    for name, justify in (("", "left"), ("", "left"), ("", "right"), ("keys walked / estimate", "right"),
                          ("keys/s", "right"), ("elapsed", "right"), ("ETA", "right"), ("ranges", "right")):
        shown.add_column(name, justify=justify, no_wrap=True)
    for f in [*measured["priorities"], measured["run"]]:
        estimate = f"{f['estimate']:,}" if f["estimate"] is not None else "?"
        shown.add_row(Text(f["name"], style="bold" if f["name"] == "run" else ""), ProgressBar(total=1.0, completed=_share(f), width=30),
                      f"{_share(f):.0%}", f"{f['walked']:,} / {estimate}",
                      f"{f['keys_per_s']:,.1f}" if f["keys_per_s"] is not None else "-",
                      _clock(f["elapsed_s"]), _clock(f["eta_s"]), f"{f['ranges_done']}/{f['ranges']}")
    return shown


class Display:
    """Shows progress: redrawn in place on a terminal (`terminal`, default: whether `out` is one),
    else one line every `every` seconds and at the end."""

    def __init__(self, out: TextIO, *, terminal: bool | None = None, every: float = LINE_SECONDS) -> None:
        self.out, self.every = out, every
        self.terminal = out.isatty() if terminal is None else terminal
        self.live: Live | None = None
        self.last = float("-inf")
        if self.terminal:
            console = Console(file=out, force_terminal=True, highlight=False, markup=False)
            self.live = Live(console=console, auto_refresh=False, transient=False, redirect_stdout=False,
                             redirect_stderr=False)
            self.live.start()

    def show(self, shown: RenderableType, text: str, final: bool = False) -> None:
        """`shown` on a terminal, else `text` (when its interval has passed, or `final`)."""
        if self.live is not None:
            self.live.update(shown, refresh=True)
        elif final or time.monotonic() - self.last >= self.every:
            self.out.write(text + "\n")
            self.out.flush()
            self.last = time.monotonic()

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


Draw = Callable[[Any], "tuple[RenderableType, str] | None"]


def run_drawing(run_id: str) -> Draw:
    """What `watching` shows of a run: its progress by keys."""
    def draw(conn: Any) -> tuple[RenderableType, str]:
        measured = measure(conn, run_id)
        return view(measured), line(measured)
    return draw


def verify_drawing(conn: Any, run_id: str) -> Draw:
    """What `watching` shows of the verification of run `run_id` about to begin (after the latest
    one it has now): nothing until it is planned."""
    with conn, conn.cursor() as cur:
        after = ledger.latest_verification_id(cur, run_id)

    def draw(conn: Any) -> tuple[RenderableType, str] | None:
        measured = measure_verification(conn, run_id, after)
        return None if measured is None else (verify_view(measured), verify_line(measured))
    return draw


def follow_drawing(run_id: str) -> Draw:
    """What `watching` shows of a follow session: its figures as the ledger has them."""
    def draw(conn: Any) -> tuple[RenderableType, str] | None:
        with conn, conn.cursor() as cur:
            status = ledger.require_run(cur, run_id)["status"]
            figures = ledger.follow_progress(cur, run_id)
        if figures is None:
            return None
        return Text(follow.render(run_id, status, figures)), follow_line(run_id, status, figures)
    return draw


@contextmanager
def watching(connect: Callable[[], Any], draw: Draw, out: TextIO, *, interval: float = 1.0,
             every: float = LINE_SECONDS, terminal: bool | None = None) -> Iterator[Display]:
    """Show what `draw` reads from the ledger (run_drawing, verify_drawing, follow_drawing) while the
    body runs (batches, ranges, a follow session, here), from a thread with a session of its own;
    the final state once the body is done. A ledger that cannot be read for a moment leaves the last
    view up: the work itself decides what a lost connection means."""
    display = Display(out, terminal=terminal, every=every)
    stop = threading.Event()

    def look(conn: Any, final: bool = False) -> Any:
        try:
            conn = conn or connect()
            drawn = draw(conn)
            if drawn is not None:
                display.show(*drawn, final=final)
            return conn
        except psycopg2.Error:
            if conn is not None:
                conn.close()
            return None

    def loop() -> None:
        conn = None
        while not stop.wait(min(interval, every)):
            conn = look(conn)
        conn = look(conn, final=True)
        if conn is not None:
            conn.close()

    thread = threading.Thread(target=loop, name="progress", daemon=True)
    thread.start()
    try:
        yield display
    finally:
        stop.set()
        thread.join()
        display.close()
