"""Which mapping a command works with, and how a run keeps to it.

A mapping is named on the command line (`--mapping`) or in MIGRATOR_MAPPING, one of:
- a name an installed package registers in the entry-point group `migrator.mappings` (this
  package registers the applications under migrator/apps);
- `package.module:attribute`, a `Mapping` (or a function returning one) importable here;
- a mapping file (`.toml`), for keyspaces that need no code.

A run records the name it was given and a digest of the mapping's declaration (patterns,
grammars, transforms' code, rules, schema). Every later command and every worker loads the
mapping the run names and refuses one whose digest differs: a worker deployed with another
version of a transform would write other rows under the same run.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from dataclasses import fields, is_dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import orjson

from migrator.core.mapping import Mapping

GROUP = "migrator.mappings"
FILE_SUFFIXES = (".toml",)


class MappingError(ValueError):
    """A mapping that cannot be found or loaded, or is not the one a run was made with (never
    worth a retry: the same mapping is there a moment later)."""


def requested(spec: str | None) -> str:
    """The mapping a command is asked for: its flag, else MIGRATOR_MAPPING, else the only installed one."""
    spec = spec or os.environ.get("MIGRATOR_MAPPING")
    if spec:
        # a file by its absolute path: a run records it, and its workers and later commands load it from anywhere
        return str(Path(spec).resolve()) if spec.endswith(FILE_SUFFIXES) else spec
    installed = sorted({ep.name for ep in entry_points(group=GROUP)})
    if len(installed) != 1:
        raise MappingError(f"name the keyspace's mapping with --mapping or MIGRATOR_MAPPING: one of the installed "
                           f"{', '.join(installed) or '(none installed)'}, a module's `package.module:ATTRIBUTE`, "
                           "or a mapping file (.toml)")
    return installed[0]


def load(spec: str | None = None) -> Mapping:
    """The mapping `spec` names (see the module); MappingError saying what exists otherwise."""
    spec = requested(spec)
    if spec.endswith(FILE_SUFFIXES):
        return _from_file(spec)
    if ":" in spec:
        return _from_object(spec)
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    if spec not in found:
        names = ", ".join(sorted(found)) or "none installed"
        raise MappingError(f"no mapping named {spec!r}; installed: {names}. Name one of those, a module's "
                           "`package.module:ATTRIBUTE`, or a mapping file (.toml), with --mapping or MIGRATOR_MAPPING")
    return _checked(found[spec].load(), f"entry point {spec!r} ({found[spec].value})")


def _from_object(spec: str) -> Mapping:
    module, _, attribute = spec.partition(":")
    try:
        value = getattr(importlib.import_module(module), attribute)
    except ImportError as exc:
        raise MappingError(f"--mapping {spec!r}: cannot import {module!r} ({exc}); is its package installed, "
                           "or on PYTHONPATH?") from None
    except AttributeError:
        raise MappingError(f"--mapping {spec!r}: module {module!r} has no {attribute!r}") from None
    return _checked(value, spec)


def _from_file(spec: str) -> Mapping:
    path = Path(spec)
    if not path.is_file():
        raise MappingError(f"--mapping {spec!r}: no such mapping file")
    from migrator.core.mapping_file import load_file  # (only a file mapping needs the file reader)

    return load_file(path)


def _checked(value: Any, where: str) -> Mapping:
    if callable(value) and not isinstance(value, Mapping):
        value = value()
    if not isinstance(value, Mapping):
        raise MappingError(f"{where} is a {type(value).__name__}, not a migrator.core.mapping.Mapping")
    return value


_digests: dict[int, tuple[Mapping, str]] = {}


def digest(mapping: Mapping) -> str:
    """A digest of everything in a mapping that decides what a run writes (sha256, hex)."""
    cached = _digests.get(id(mapping))
    if cached is not None and cached[0] is mapping:
        return cached[1]
    value = hashlib.sha256(orjson.dumps(_declared(mapping), option=orjson.OPT_SORT_KEYS)).hexdigest()
    _digests[id(mapping)] = (mapping, value)
    return value


def _declared(value: Any) -> Any:
    """A JSON-able form of a declaration: dataclasses by their fields, functions by their code."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _declared(getattr(value, f.name)) for f in fields(value)
                if f.init and f.metadata.get("digest", True)}
    if isinstance(value, (list, tuple)):
        return [_declared(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _declared(v) for k, v in value.items()}
    if callable(value):
        return _code(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def _code(function: Any) -> str:
    """A function by its name and the digest of its source (or bytecode, where there is none)."""
    name = f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"
    try:
        text = inspect.getsource(function).encode()
    except (OSError, TypeError):
        code = getattr(function, "__code__", None)
        text = code.co_code if code is not None else repr(function).encode()
    # a closure made by a factory (members_of("prefix:")) is told apart by what it closes over
    cells = [repr(c.cell_contents) for c in getattr(function, "__closure__", None) or ()]
    return f"{name}:{hashlib.sha256(text + repr(cells).encode()).hexdigest()[:16]}"


def for_run(run: dict[str, Any], spec: str | None = None) -> Mapping:
    """The mapping a run was made with (`spec`, if given, must be the same), checked against the
    digest the run recorded."""
    asked = spec or run.get("mapping_spec") or run["mapping"]
    mapping = load(asked)
    recorded, here = run.get("mapping_digest"), digest(mapping)
    if recorded and recorded != here:
        raise MappingError(
            f"run {run['run_id']} was made with mapping {run['mapping']!r} of digest {recorded[:12]}, but {asked!r} "
            f"here has digest {here[:12]}: its patterns, transforms or schema differ. Use the version the run was "
            "made with (deploy it to every worker), or start a new run with this one")
    return mapping
