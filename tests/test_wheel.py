"""A wheel built from the repository carries all `migrator init-db` needs: the engine's SQL and the
mappings' schemas are package data. Installed alone in a new virtualenv and run from outside the
checkout, it creates the schema."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import psycopg2

from migrator import ledger
from migrator.schema import missing_journals, require_schema, schema_versions, written_tables
from migrator.apps.threadr import THREADR

from helpers import ROOT, throwaway_database


def test_a_wheel_built_from_the_repo_runs_init_db_in_a_fresh_virtualenv(settings, tmp_path):
    # built from a copy: a build writes build/ and *.egg-info next to its sources
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build",
                                                                ".pytest_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    assert {"migrator/sql/001_ledger.sql", "migrator/apps/threadr/schema.sql", "celeryconfig.py"} <= packaged
    assert not any(name.startswith(("tests/", "sql/")) for name in packaged)

    # a virtualenv with nothing but the wheel; its dependencies are read from this one's site-packages
    # (added by a .pth line, which does not run the .pth files there, so this checkout's editable
    # install stays out of it)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([python, "-c", "import migrator; print(migrator.__file__)"], capture_output=True,
                           text=True, cwd=outside, env=env)
    assert where.stdout.startswith(site), where.stdout + where.stderr
    with throwaway_database(settings.database_url) as url:
        done = subprocess.run([venv / "bin" / "migrator", "init-db", "--database-url", url], capture_output=True,
                              text=True, cwd=outside, env=env, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.splitlines() == [f"{version}: applied" for version in schema_versions(THREADR)]
        conn = psycopg2.connect(url)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT t FROM unnest(%s::text[]) t WHERE to_regclass(t) IS NULL",
                            ([*THREADR.table_names(), *ledger.TABLES],))
                assert cur.fetchall() == []
                assert missing_journals(cur, written_tables(THREADR)) == {}
            require_schema(conn, THREADR)
        finally:
            conn.close()
