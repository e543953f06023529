"""Rules of the code base that the code itself can check.

- The core is sans-IO: zgrid/core.py, and every zgrid module it imports, imports nothing that
  does I/O or reads the clock, so the simulator and the runtime can drive the same protocol.
- The store knows nothing of the protocol: zgrid/store.py does not import the core.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import zgrid

PACKAGE = Path(zgrid.__file__).parent
# Modules that do I/O, read the clock or make the core nondeterministic.
FORBIDDEN_IN_CORE = frozenset({
    "zmq", "time", "os", "socket", "select", "selectors", "subprocess", "sqlite3", "threading",
    "asyncio", "io", "pathlib", "shutil", "signal", "random", "logging", "datetime", "fcntl",
    "tempfile", "multiprocessing", "urllib", "http", "sys", "click", "networkx",
})


def imported_modules(module: str) -> set[str]:
    """Every module name `import`ed or `from`-imported anywhere in zgrid/<module>.py."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def zgrid_closure(module: str) -> set[str]:
    """`module` and every zgrid module it imports, transitively (as short names: core, wire)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(m.split(".", 1)[1] for m in imported_modules(name)
                    if m.startswith("zgrid.") and m.count(".") == 1)
    return seen


def test_the_core_and_what_it_imports_do_no_io() -> None:
    closure = zgrid_closure("core")
    assert {"core", "table", "flood", "wire", "errors", "persisted"} <= closure
    for module in sorted(closure):
        top_level = {name.split(".")[0] for name in imported_modules(module)}
        assert not top_level & FORBIDDEN_IN_CORE, (
            f"zgrid/{module}.py (imported by the core) imports {top_level & FORBIDDEN_IN_CORE}")


def test_importing_the_core_loads_no_io_library() -> None:
    code = ("import sys; import zgrid.core; "
            "print(' '.join(m for m in ('zmq', 'sqlite3', 'socket', 'select', 'subprocess', "
            "'threading') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True,
                            text=True, check=True).stdout.split()
    assert loaded == [], f"importing zgrid.core loaded {loaded}"


def test_the_store_does_not_import_the_core() -> None:
    assert "zgrid.core" not in imported_modules("store")
    assert "core" not in zgrid_closure("store")
