"""What a run was asked to do; stored with the run so every batch, anywhere, reads the same."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from migrator.core.mapping import UNMAPPED, Mapping, Pattern, Priority


# RunOptions.validation's choices.
VALIDATIONS = ("sealed", "reread")


@dataclass(frozen=True)
class RunOptions:
    # records per sub-batch (one subtransaction each), or fewer: SUB_BATCH_BYTES. 5,000 rather than 2,000:
    # its overhead in PostgreSQL (a stage emptied, the upserts called, a subtransaction) shared by more
    # rows, its index inserts closer together: 0.95x the write's CPU (scripts/write_variants.py, 7
    # rounds), a run's PostgreSQL 0.86x and its own 0.91x (scripts/against.py, 100k keys, the least of
    # 5 rounds; 0.85-1.07x round by round), for 30-60 MB more of a process's peak memory
    batch_size: int = 5000
    scan_count: int = 1000  # SCAN COUNT hint
    read_chunk: int = 500  # keys per read pipeline
    dry_run: bool = False
    priorities: tuple[str, ...] = ()  # empty: all, in order
    tables: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    continue_on_error: bool = False
    rollback_on_failure: bool = True
    # An operator's cap: larger values become dead letters. None: any size the target can hold
    # (a large value is read and written on its own, so memory stays bounded by it).
    max_value_bytes: int | None = None
    source_timezone: str = "UTC"
    ranges: int | None = None
    # How many more keys a fresh count of the source may find than were scanned (live traffic
    # adds keys while a run goes on); a fraction per pattern. Fewer is never a failure.
    count_tolerance: float = 0.01
    max_keys_per_sec: int | None = None  # keys scanned or read per second, all workers together; None: uncapped
    # A pattern's dead letters fail its priority when they are more than this share of its keys
    # and more than max_dead_keys (a pattern may declare its own budget).
    max_dead_ratio: float = 0.001
    max_dead_keys: int = 10
    # Each priority's batches and validation SCAN the keyspace again, rather than read the keys the
    # first priority's SCAN spooled (migrator/core/spool.py): slower on Redis, but a later priority
    # also takes the keys written since the first one's pass.
    scan_each_priority: bool = False
    # How a priority is validated in the run: "sealed" counts its keys (reading no value) and checks that
    # its rows are as its batches wrote them (migrator/core/seal.py), re-reading every key only when
    # they are not; "reread" reads every key again and compares its rows, as `migrator verify` does.
    validation: str = "sealed"

    def __post_init__(self) -> None:
        for name in ("batch_size", "scan_count", "read_chunk", "max_value_bytes", "max_keys_per_sec"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number")
        if not 0 <= self.count_tolerance < 1:
            raise ValueError("--count-tolerance is a fraction between 0 and 1, e.g. 0.01")
        if not 0 <= self.max_dead_ratio <= 1 or self.max_dead_keys < 0:
            raise ValueError("--max-dead-ratio is a fraction between 0 and 1 (e.g. 0.001) and --max-dead-keys 0 or more")
        for p in self.priorities:
            Priority.parse(p)
        if self.validation not in VALIDATIONS:
            raise ValueError(f"--validation is one of {', '.join(VALIDATIONS)}, not {self.validation!r}")

    def priority_order(self) -> list[Priority]:
        chosen = {Priority.parse(p) for p in self.priorities} if self.priorities else set(Priority)
        return sorted(chosen)

    def before(self, priority: Priority) -> Priority | None:
        """The priority this run migrates just before `priority` (None: it is the first)."""
        earlier = [p for p in self.priority_order() if p < priority]
        return earlier[-1] if earlier else None

    def after(self, priority: Priority) -> Priority | None:
        """The priority this run migrates just after `priority` (None: it is the last)."""
        later = [p for p in self.priority_order() if p > priority]
        return later[0] if later else None

    def check_scope(self, mapping: Mapping) -> None:
        """Refuse, before anything is planned, a --table or --pattern the mapping does not know, or
        a choice that leaves nothing to migrate; the ValueError names the choices."""
        chosen = mapping.select(None, self.tables or None, self.patterns or None)
        order = self.priority_order()
        if not any(p.priority in order for p in chosen):
            theirs = sorted({p.priority for p in chosen})
            raise ValueError(f"nothing to migrate: the patterns chosen ({', '.join(p.name for p in chosen)}) are of "
                             f"priority {', '.join(p.label for p in theirs)}, not of --priority "
                             f"{', '.join(p.label for p in order)}; add --priority {theirs[0].label}, or drop --priority")

    def scope(self, mapping: Mapping, priority: Priority) -> list[Pattern]:
        return mapping.select([priority], self.tables or None, self.patterns or None)

    def prefixes(self, mapping: Mapping, priority: Priority) -> tuple[bytes, ...]:
        """What a pass over `priority` looks at (`key.startswith`): every key when it counts unmapped ones."""
        if self.includes_unmapped(mapping, priority):
            return (b"",)
        return mapping.prefixes(self.scope(mapping, priority))

    def counted(self, mapping: Mapping, priority: Priority) -> frozenset[str]:
        """The names a source count of `priority` tallies: its patterns', and UNMAPPED when it counts those."""
        names = {p.name for p in self.scope(mapping, priority)}
        return frozenset(names | {UNMAPPED} if self.includes_unmapped(mapping, priority) else names)

    def includes_unmapped(self, mapping: Mapping, priority: Priority) -> bool:
        """Unmapped keys are counted once, in the mapping's unmapped priority, by unfiltered runs."""
        return priority == mapping.unmapped_priority and not self.tables and not self.patterns

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunOptions":
        known = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**values)
