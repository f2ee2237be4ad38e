"""The engine's layout: it names no application (everything Threadr-specific lives in
migrator/apps/threadr), only migrator/core/ledger.py queries the run ledger's tables, migrator/ never
imports the Celery layer (it reaches Celery through an executor found by name), and no layer
imports one above it."""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterator

from migrator.core import ledger
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


def python_modules() -> dict[str, Path]:
    """Every module of the project's packages, by its dotted name."""
    files = [*(ROOT / "migrator").rglob("*.py"), *(ROOT / "workers").rglob("*.py"), ROOT / "celeryconfig.py"]
    modules = {}
    for f in files:
        parts = f.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return modules


# ---- the ledger's SQL lives in migrator/core/ledger.py ----

# The tables migrator/core/sql/ creates that are not the run ledger's, and whose they are.
NOT_LEDGER = {
    "schema_migrations": "the schema's versions (migrator/core/schema.py)",
    "legacy_id_map": "a target table every mapping writes (migrator/core/writer.py, migrator/execution/finalize.py)",
    "dual_write_repairs": "the dual-write service's (migrator/cutover/dualwrite.py, migrator/cutover/switch.py)",
    "dual_write_settings": "the dual-write service's",
    "dual_write_shadow_reads": "the dual-write service's",
}


def ledger_tables() -> set[str]:
    """The tables of migrator/core/sql/*.sql's CREATE TABLE statements that are the ledger's."""
    created = {m.group(1) for f in (ROOT / "migrator" / "core" / "sql").glob("*.sql")
               for m in re.finditer(r"CREATE\s+(?:UNLOGGED\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", f.read_text(), re.I)}
    assert set(NOT_LEDGER) <= created, "NOT_LEDGER names a table migrator/core/sql/ no longer creates"
    return created - set(NOT_LEDGER)


def strings(path: Path) -> Iterator[tuple[int, str]]:
    """The string literals of a module that are not docstrings (nor other bare strings: comments in
    all but name), with their line."""
    tree = ast.parse(path.read_text())
    bare = {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in bare:
            yield node.lineno, node.value


def test_every_table_of_the_engine_s_sql_is_the_ledger_s_or_said_whose_it_is():
    assert ledger_tables() == set(ledger.TABLES)


def test_only_the_ledger_module_queries_the_ledger_s_tables():
    named = re.compile(r"\b(" + "|".join(sorted(ledger_tables())) + r")\b")
    found = [f"{path.relative_to(ROOT)}:{line}: {' '.join(text.split())[:120]}"
             for name, path in python_modules().items() if name != "migrator.core.ledger"
             for line, text in strings(path) if named.search(text)]
    assert found == [], "SQL over the ledger's tables outside migrator/core/ledger.py; make it a function there:\n" + \
        "\n".join(found)


# ---- layers ----

def imported(name: str, path: Path, modules: dict[str, Path]) -> Iterator[tuple[int, str]]:
    """The project modules a module imports (at its top, in a function, or for type checking), by
    dotted name: `from . import x` is the module x when there is one, else the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            # the longest project module the dotted name starts with (a name imported from it is not one)
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target:
                yield node.lineno, target


# A package per layer, from the bottom up: each module's layer is the package it lives in.
LAYERS = {
    # the engine core: mappings and their values, the source, the target's writes and schema, the
    # ledger, and one batch, verification, validation or rollback at a time
    "core": ("migrator", "migrator.core"),
    # executing runs: planning and carrying them on, the steps after a priority, stopping them,
    # follow, and the executors (here, or through the Celery layer found by name)
    "execution": ("migrator.execution",),
    # what operators look at before, during and after a run
    "views": ("migrator.views",),
    # the application's switch from Redis to PostgreSQL
    "cutover": ("migrator.cutover",),
    # the command line
    "cli": ("migrator.cli",),
    # the Celery layer: tasks over the engine, and the Celery executor
    "celery": ("celeryconfig", "workers"),
    # applications' mappings (migrator/apps/<app>), found by name like any installed one
    "apps": ("migrator.apps",),
}
# The layers each one stands on: it may import them and itself, nothing else.
STANDS_ON = {
    "core": (),
    "execution": ("core",),
    "views": ("core", "execution"),
    "cutover": ("core",),
    "cli": ("core", "execution", "views", "cutover"),
    "celery": ("core", "execution"),
    "apps": ("core", "cutover"),
}


def layer_of(module: str) -> str:
    found = [layer for layer, packages in LAYERS.items() for package in packages
             if module == package or package != "migrator" and module.startswith(package + ".")]
    assert found, f"{module} is in no layer's package: move it into one of {sorted(LAYERS)} (tests/test_layout.py)"
    return found[0]


def test_every_module_of_the_engine_lives_in_its_layer_s_package():
    top = sorted(f.name for f in (ROOT / "migrator").glob("*.py") if f.name != "__init__.py")
    assert top == [], f"modules outside a layer's package: {top}"
    assert all(layer_of(name) for name in python_modules())


def test_no_layer_imports_one_above_it():
    modules = python_modules()
    assert {"migrator.core.ledger", "migrator.execution.executor", "workers.executor", "migrator.cli.main"} <= set(modules)
    wrong = []
    for name, path in sorted(modules.items()):
        layer = layer_of(name)
        for line, target in imported(name, path, modules):
            if layer_of(target) not in (layer, *STANDS_ON[layer]):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {name} ({layer}) imports {target} ({layer_of(target)})")
    assert wrong == [], "a layer imports one it does not stand on:\n" + "\n".join(wrong)


def test_the_engine_never_imports_the_celery_layer():
    modules = python_modules()
    celery = [f"{path.relative_to(ROOT)}:{line}: {target}" for name, path in modules.items() if name.startswith("migrator")
              for line, target in imported(name, path, modules) if layer_of(target) == "celery"]
    assert celery == [], "migrator/ imports the Celery layer; reach it through the executor instead:\n" + "\n".join(celery)
