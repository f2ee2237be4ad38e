"""migrator: move a live application's data from Redis into PostgreSQL."""
from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "redis-pg-migrator"


def version(distribution: str = DISTRIBUTION) -> str:
    """The installed package's version; from a checkout that was never installed, its
    pyproject.toml's; else "unknown"."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        pass
    try:
        with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
            return f"{tomllib.load(f)['project']['version']} (not installed)"
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"
