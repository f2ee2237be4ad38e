"""The engine names no application: everything Threadr-specific lives in migrator/apps/threadr."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "migrator" / "apps" / "threadr"


def engine_files() -> list[Path]:
    files = [*(ROOT / "migrator").rglob("*.py"), *(ROOT / "migrator").rglob("*.sql"), *(ROOT / "workers").rglob("*.py"),
             ROOT / "celeryconfig.py"]
    return [f for f in files if APP not in f.parents]


def test_no_engine_module_outside_the_threadr_app_names_threadr():
    named = [f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
             for f in engine_files() for n, line in enumerate(f.read_text().splitlines(), 1)
             if re.search("threadr", line, re.IGNORECASE)]
    assert len(engine_files()) > 30  # the scan saw the engine
    assert named == [], "the engine names Threadr; move this into migrator/apps/threadr or a hook:\n" + "\n".join(named)
