"""`migrator report RUN --html`, loaded in headless Chromium (Debian's package; scripts/setup.sh installs
it): the balance rows per pattern with the run's numbers, dead letters by reason, the verdicts of a
damaged run (dead letters, and a priority whose validation failed), and the charts as SVG."""
from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from migrator.apps.threadr.demo import seed_demo
from migrator.core.ledger import COUNT_FIELDS

from helpers import cli, migrate

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium: scripts/setup.sh "
                                "installs it unless MIGRATOR_NEEDS_CHROMIUM=0")

CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]


class Dom(HTMLParser):
    """The rows of each table by its class, and the SVG elements with their attributes, as Chromium laid them out."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.svg: list[tuple[str, dict[str, str]]] = []
        self.table: str | None = None
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table":
            self.table = a.get("class", "")
            self.tables[self.table] = []
        elif tag == "tr" and self.table is not None:
            self.tables[self.table].append([])
        elif tag == "td" and self.table is not None:
            self.cell = []
        elif tag in ("svg", "polyline", "rect"):
            self.svg.append((tag, a))

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self.cell is not None:
            self.tables[self.table][-1].append("".join(self.cell).strip())
            self.cell = None
        elif tag == "table":
            self.table = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def load(path: Path, tmp_path: Path) -> Dom:
    """The DOM of the file once Chromium loaded it, and a screenshot of it (a file that does not render fails here)."""
    profile = tmp_path / "chromium-profile"
    shot = tmp_path / "report.png"
    subprocess.run([*CHROMIUM, f"--user-data-dir={profile}", "--window-size=1000,1400", f"--screenshot={shot}",
                    path.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000
    dumped = subprocess.run([*CHROMIUM, f"--user-data-dir={profile}", "--dump-dom", path.as_uri()],
                            capture_output=True, text=True, timeout=120, check=True).stdout
    dom = Dom()
    dom.feed(dumped)
    return dom


def test_the_html_report_of_a_damaged_run_shows_its_balance_dead_letters_failed_verdict_and_charts(
        settings, r, pg, tmp_path):
    seed_demo(r, 40, malformed=4)
    # a trigger that alters each users row once written stands in for a faulty target: the high
    # priority (which also has the malformed keys' dead letters) fails its validation
    with pg, pg.cursor() as cur:
        cur.execute("CREATE FUNCTION corrupt() RETURNS trigger LANGUAGE plpgsql AS $$"
                    " BEGIN UPDATE users SET login_count = login_count + 1000 WHERE id = NEW.id; RETURN NULL; END $$")
        cur.execute("CREATE TRIGGER corrupt AFTER INSERT ON users FOR EACH ROW EXECUTE FUNCTION corrupt()")
    try:
        report = migrate(settings, rollback_on_failure=False)
    finally:
        with pg, pg.cursor() as cur:
            cur.execute("DROP TRIGGER corrupt ON users")
            cur.execute("DROP FUNCTION corrupt()")
    run_id = report["run_id"]
    assert report["status"] == "failed" and report["validated"] == {"critical": True, "high": False}, report["validated"]

    done = cli(settings, "report", run_id, "--html", "--output-dir", str(tmp_path))
    assert done.returncode == 1 and "HTML report written to" in done.stdout, done.stderr  # (a failed run exits 1)
    dom = load(tmp_path / f"migration_report_{run_id}.html", tmp_path)

    rows = {row[0]: row for row in dom.tables["balance"][1:]}
    for p in report["patterns"]:
        assert rows[p["pattern"]][3:3 + len(COUNT_FIELDS)] == [str(p[f]) for f in COUNT_FIELDS], p["pattern"]
        assert rows[p["pattern"]][-1] == "yes"
    assert rows["TOTAL"][3:3 + len(COUNT_FIELDS)] == [str(report["totals"][f]) for f in COUNT_FIELDS]

    dead = dom.tables["dead"][1:]
    assert sum(int(count) for _, count, _ in dead) == report["totals"]["dead"] >= 1
    assert {pattern for pattern, _, _ in dead} == {p["pattern"] for p in report["patterns"] if p["dead"]}

    verdicts = {row[0]: row for row in dom.tables["verdicts"][1:]}
    assert verdicts["critical"][1:] == ["PASS", "clean", "-"]
    assert verdicts["high"][1:3] == ["FAIL", "differences"] and "login_count" in verdicts["high"][3]
    assert set(verdicts) == {"critical", "high"}  # the run stopped there

    lines = [a for tag, a in dom.svg if tag == "polyline"]
    assert {a["data-priority"] for a in lines} == {"critical", "high"}
    bars = {a["data-stage"]: float(a["width"]) for tag, a in dom.svg if tag == "rect"}
    assert set(bars) >= {"scan", "read", "transform", "write"} and bars["write"] > 0
