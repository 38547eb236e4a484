"""The trainer's layering: no import cycle inside astrobio.train, nothing below the entry point imports
it, and the loop is free of topology and offload branches (they are chosen once, in build_parts)."""

from __future__ import annotations

import ast
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[1] / "astrobio" / "train"


def imports_of(path: Path) -> set[str]:
    """The astrobio.train modules a file imports, at any depth of the file (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("astrobio.train."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("astrobio.train.")}
    return found


def import_graph() -> dict[str, set[str]]:
    return {f.stem: imports_of(f) for f in TRAIN.glob("*.py") if f.stem not in ("__init__", "__main__")}


def test_no_import_cycle_in_the_trainer():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in graph.get(module, ()):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_only_the_package_entry_imports_the_entry_point():
    graph = import_graph()
    importers = [module for module, deps in graph.items() if "entry" in deps]
    assert importers == []
    assert "trainer" not in set().union(*(deps for module, deps in graph.items() if module != "entry"))


def test_the_loop_has_no_topology_or_offload_branches():
    source = (TRAIN / "trainer.py").read_text()
    for word in ("pipeline_stages", "world_size", "use_cpu_offloading", "hasattr", "astrobio.train.pipeline",
                 "astrobio.optim"):
        assert word not in source, word
