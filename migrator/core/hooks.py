"""What an application adds to the engine, beside its patterns: the hooks a `Mapping` carries.

None of them decides what a run writes (they are not part of the mapping's digest):
- `seed_demo(client, count, malformed=0)` writes an example keyspace (`migrator seed-demo`, `demo`)
  and answers counts per kind of key;
- `audit`: tallies over the values of some patterns' keys, read in the audit's own pass, each a
  section of the audit report with its own stop conditions (a premium summary, say);
- `parity_reads`: the dual-write service's reads whose shadow-read parity `cutover` requires.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from migrator.core.mapping import Mapping, Pattern


class AuditTally(Protocol):
    """One section of the audit report, built from the values of the keys it `reads`."""

    name: str  # the report's key for this section

    def reads(self, pattern: "Pattern") -> bool:
        """Whether the audit reads (GET) the values of this pattern's keys for this tally."""

    def add(self, pattern: "Pattern", raw: bytes, now: datetime) -> None:
        """One value read; a value the tally cannot make sense of is counted, never raised."""

    def to_json(self) -> dict[str, Any]:
        """The section of the report (JSON-serialisable)."""

    def stop_conditions(self) -> list[str]:
        """Reasons to pause before migrating that this tally found (empty: none)."""

    def render(self, section: dict[str, Any]) -> str:
        """The section as one paragraph for a terminal."""


AuditTallyFactory = Callable[["Mapping"], AuditTally]
DemoSeeder = Callable[..., dict[str, int]]


@dataclass(frozen=True)
class Hooks:
    seed_demo: DemoSeeder | None = None
    audit: tuple[AuditTallyFactory, ...] = ()
    parity_reads: tuple[str, ...] = ()

    def seeder(self, mapping_name: str) -> DemoSeeder:
        if self.seed_demo is None:
            raise ValueError(f"the {mapping_name} mapping brings no demo keyspace; seed Redis with your own data, "
                             "or name a mapping that has one")
        return self.seed_demo
