"""Mappings for the tests of `--mapping module:attribute` (tests/ is put on PYTHONPATH): another
team's mapping, as small as one can be, made of two of Threadr's patterns."""
from migrator.core.mapping import Mapping
from migrator.apps.threadr import THREADR

PREMIUM_ONLY = Mapping(
    "premium-only",
    tuple(p for p in THREADR.patterns if p.name in ("premium_ip", "premium_email")),
    tuple(r for r in THREADR.rules if r.name == "subscriptions"),
    schema=THREADR.schema,
)
