"""Phase 2 of a migration, the mapping analysis: how each pattern of a Mapping reaches PostgreSQL.

Everything is read from the `Mapping` (grammars, types, priorities, tables, merge rules, user
links, declared dependencies) and, for volumes, from an audit report: nothing here knows the
application behind the mapping.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from migrator.views.audit import AUDIT_PREFIX, CARDINALITY, stamped_path, write_json
from migrator.core.config import ConfigError
from migrator.core.mapping import Mapping, Pattern, Priority
from migrator.core.merge import TableRule

MAPPING_PREFIX = "redis_postgres_mapping_"
AUDIT_FILE = re.compile(rf"{AUDIT_PREFIX}\d{{8}}_\d{{6}}\.json")


def linked_tables(mapping: Mapping) -> dict[str, list[str]]:
    """Tables whose rows name an entity by a legacy id, with those columns."""
    out: dict[str, list[str]] = {}
    for link in mapping.links:
        out.setdefault(link.table, []).append(link.column)
    return out


def complexity(pattern: Pattern, mapping: Mapping) -> tuple[str, str]:
    """low, medium or high, with the reason. The rule, first match wins:

    - skipped: low (counted, never read);
    - high: one key becomes many rows (a member-wise collection: zset, hash, set, list, stream), or its rows
      link to other data (its table has user links, or it declares dependencies);
    - medium: a JSON document (fields parsed, datetimes normalised), or a table merged by a
      rule (GREATEST counters, COALESCE lookups, a version column);
    - low: one plain value to one row, the incoming value wins.
    """
    if pattern.skip:
        return "low", "skipped: counted, never read"
    if pattern.member_wise and pattern.redis_type in CARDINALITY:
        return "high", f"one-to-many: a {pattern.redis_type} becomes one row per element"
    if pattern.table in linked_tables(mapping) or pattern.depends_on:
        return "high", "linking: its rows refer to other migrated data"
    rule = mapping.rule(pattern.table)
    if pattern.value_format == "json":
        return "medium", "JSON document: fields parsed and datetimes normalised"
    if rule.greatest or rule.coalesce or rule.version:
        return "medium", f"merged by rule: {merge_summary(rule)}"
    return "low", "one plain value, one row"


def merge_summary(rule: TableRule) -> str:
    parts = []
    if rule.greatest:
        parts.append(f"counters keep the greatest ({', '.join(rule.greatest)})")
    if rule.coalesce:
        parts.append(f"lookups filled by whichever source knows them ({', '.join(rule.coalesce)})")
    if rule.version:
        parts.append(f"the newer {rule.version} wins")
    return "; ".join(parts) or "the incoming value wins; an unchanged row is not touched"


def merge_rule(rule: TableRule) -> dict[str, Any]:
    return {"greatest": list(rule.greatest), "coalesce": list(rule.coalesce), "version": rule.version,
            "summary": merge_summary(rule)}


def dependencies(pattern: Pattern, mapping: Mapping) -> list[str]:
    """Declared dependencies, then the linked patterns when the pattern's table links to their entities."""
    implied = list(mapping.linked_patterns) if pattern.table in linked_tables(mapping) else []
    names = [n for n in dict.fromkeys([*pattern.depends_on, *implied]) if n != pattern.name]
    known = {p.name for p in mapping.patterns}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"pattern {pattern.name} depends on unknown pattern(s) {unknown}; known: {', '.join(sorted(known))}")
    return names


def _volumes(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    return {k: entry[k] for k in ("keys", "estimated_bytes", "records", "wrong_type")}


def _audit_summary(audit: dict[str, Any] | None) -> dict[str, Any] | None:
    if audit is None:
        return None
    return {"generated_at": audit["generated_at"], "source": audit["source"], "total_keys": audit["total_keys"],
            "unmapped_keys": audit["unmapped"]["keys"]}


def _pattern_doc(pattern: Pattern, mapping: Mapping, audited: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    level, reason = complexity(pattern, mapping)
    deps = dependencies(pattern, mapping)
    priority_of = {p.name: p.priority for p in mapping.patterns}
    return {
        "name": pattern.name,
        "glob": pattern.glob,
        "grammar": pattern.grammar,
        "description": pattern.description,
        "redis_type": pattern.redis_type,
        "value_format": pattern.value_format,
        "ttl": pattern.ttl or None,
        "priority": pattern.priority.label,
        "table": pattern.table,
        "skip": pattern.skip,
        "source": (pattern.source or f"redis_{pattern.name}") if pattern.migrated else None,
        "complexity": level,
        "complexity_reason": reason,
        "validation": list(pattern.validation),
        "dependencies": deps,
        # migrated in a later priority: the link is filled once that priority is in
        "deferred_dependencies": [n for n in deps if priority_of[n] > pattern.priority],
        "link_columns": linked_tables(mapping).get(pattern.table, []),
        "merge_rule": merge_rule(mapping.rule(pattern.table)) if pattern.table else None,
        "volumes": _volumes(audited.get(pattern.name)) if audited is not None else None,
    }


def build_mapping_document(mapping: Mapping, audit: dict[str, Any] | None, *,
                           now: datetime | None = None) -> dict[str, Any]:
    """The mapping documentation: per pattern, per priority (the migration order) and per table."""
    audited = {p["pattern"]: p for p in audit["patterns"]} if audit else None
    ordered = sorted(mapping.patterns, key=lambda p: p.priority)  # stable: declaration order within a priority
    patterns = [_pattern_doc(p, mapping, audited) for p in ordered]
    order = [{"priority": prio.label,
              "migrated": [p.name for p in ordered if p.priority == prio and p.migrated],
              "skipped": [p.name for p in ordered if p.priority == prio and p.skip]}
             for prio in Priority if any(p.priority == prio for p in ordered)]
    links = linked_tables(mapping)
    tables = [{"table": rule.name,
               "patterns": [p.name for p in ordered if p.table == rule.name],
               "merge_rule": merge_rule(rule),
               "link_columns": links.get(rule.name, [])}
              for rule in mapping.rules]
    levels = [p["complexity"] for p in patterns]
    return {
        "generated_at": (now or datetime.now(timezone.utc)).isoformat(),
        "mapping": mapping.name,
        "audit": _audit_summary(audit),
        "linked_patterns": list(mapping.linked_patterns),
        "patterns": patterns,
        "migration_order": order,
        "tables": tables,
        "complexity": {level: levels.count(level) for level in ("low", "medium", "high")},
    }


def latest_audit(directory: Path) -> dict[str, Any] | None:
    """The newest redis_audit_report_<timestamp>.json in `directory` (by its timestamp), or None."""
    found = sorted(p for p in Path(directory).glob(f"{AUDIT_PREFIX}*.json") if AUDIT_FILE.fullmatch(p.name))
    if not found:
        return None
    try:
        return json.loads(found[-1].read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{found[-1]} is not a readable audit report ({type(exc).__name__}: {exc}); "
                          "run the audit again or remove the file") from None


def write_mapping_document(doc: dict[str, Any], directory: Path) -> Path:
    """redis_postgres_mapping_<UTC YYYYmmdd_HHMMSS of the document>.json in `directory`."""
    return write_json(doc, stamped_path(directory, MAPPING_PREFIX, doc["generated_at"]))
