"""The repository's layout: the floors of astrobio and what may import what (docs/ARCHITECTURE.md), no import
cycle, and a root folder kernels/ that shadows no installed package."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path, pythonpath: Path | None = None) -> str:
    """Runs ``code`` in a fresh interpreter started in ``cwd``, as ``python -c`` from there does (the
    current directory first on sys.path), with ``pythonpath`` before the site-packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_an_installed_kernels_package_wins_over_the_root_folder(tmp_path):
    stand_in = tmp_path / "kernels"
    stand_in.mkdir()
    (stand_in / "__init__.py").write_text("STAND_IN = True\n")
    code = "import kernels; print(getattr(kernels, 'STAND_IN', False), kernels.__file__)"
    assert run_python(code, ROOT, tmp_path) == f"True {stand_in / '__init__.py'}"


def test_the_triton_kernels_stay_importable_as_astrobio_kernels(tmp_path):
    code = "import importlib.util as u; print(u.find_spec('astrobio.kernels.adamw8bit').origin)"
    assert run_python(code, ROOT, tmp_path) == str(ROOT / "kernels" / "adamw8bit.py")
    installed = Path(run_python(code, tmp_path))  # the source tree (editable) or site-packages
    assert installed.parts[-2:] == ("kernels", "adamw8bit.py") and installed.is_file()


# ------------------------------------------------------------------------------------------ import layers
# The floors of astrobio, bottom first, as docs/ARCHITECTURE.md draws them. A module may import modules of
# its own component and of the components on lower floors; the components of one floor are independent
# of each other. A component is a module or package name, or a tuple of them (one component in several
# places); a module belongs to the component with the longest matching name (``astrobio`` itself, the
# root package, only to the first floor). Imports inside functions count as well.
FLOORS = [
    ("specification", ["astrobio", "astrobio.spec"]),
    ("kernels", [("astrobio._C", "astrobio.kernels")]),  # one component: astrobio._C (compiled from csrc/) and
    # the Triton kernels, which validate their arguments with the compiled op's checks
    ("ops", ["astrobio.ops"]),
    ("libraries", ["astrobio.optim", "astrobio.data", "astrobio.parallel"]),
    ("model", ["astrobio.model"]),
    ("memory", ["astrobio.memory"]),
    ("checkpoints", ["astrobio.train.checkpoint"]),
    ("use", ["astrobio.inference", "astrobio.cli"]),
    ("trainer", ["astrobio.train"]),
    # the commands; python -m astrobio.train runs the trainer's entry points (main, the rank entry, the summary)
    ("entry points", [("astrobio.train.__main__", "astrobio.train.entry"), "astrobio.evaluate", "astrobio.export",
                      "astrobio.generate", "astrobio.plan", "astrobio.__main__"]),
]
COMPILED = {"astrobio._C"}  # modules that are no .py file
KERNELS = {"astrobio._C", "astrobio.kernels"}  # reached through astrobio.ops only


def module_files() -> dict[str, Path]:
    """Every module of the package and its source: astrobio/, and kernels/ installed as astrobio.kernels."""
    files = {}
    for path in sorted((ROOT / "astrobio").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        files[f"astrobio.kernels.{path.stem}"] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(module of astrobio, line) of every import in ``path``, at any depth. ``from X import n`` depends
    on the module X.n when there is one, else on X."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, node.lineno))
    return found


def import_graph() -> dict[str, list[tuple[str, int]]]:
    files = module_files()
    known = set(files) | COMPILED
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def component_of(module: str) -> tuple[int, str]:
    """(floor, component) of a module; a component of several names is named by its first."""
    best, longest = None, 0
    for floor, (_, components) in enumerate(FLOORS):
        for component in components:
            names = component if isinstance(component, tuple) else (component,)
            for name in names:
                matches = module == name or (name != "astrobio" and module.startswith(name + "."))
                if matches and len(name) > longest:
                    best, longest = (floor, names[0]), len(name)
    assert best is not None, f"{module} is on no floor: add it to FLOORS (and to docs/ARCHITECTURE.md)"
    return best


def test_every_module_is_on_a_floor():
    for module in import_graph():
        component_of(module)


def test_no_module_imports_from_a_higher_floor_or_a_sibling():
    wrong = set()
    for module, imports in import_graph().items():
        floor, component = component_of(module)
        for target, line in imports:
            target_floor, target_component = component_of(target)
            if target_component != component and target_floor >= floor:
                where = "a higher floor" if target_floor > floor else "a sibling on its floor"
                wrong.add(f"{module}:{line} imports {target} ({where}: {FLOORS[floor][0]} -> "
                          f"{FLOORS[target_floor][0]})")
    assert not wrong, "imports against the floors of docs/ARCHITECTURE.md:\n" + "\n".join(sorted(wrong))


def test_the_kernels_are_reached_through_the_ops_only():
    wrong = {f"{module}:{line} imports {target}" for module, imports in import_graph().items()
             for target, line in imports
             if component_of(target)[1] in KERNELS and component_of(module)[1] not in KERNELS | {"astrobio.ops"}}
    assert not wrong, "the compiled and Triton kernels are astrobio.ops's to load:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    graph = {module: sorted({target for target, _ in imports}) for module, imports in import_graph().items()}
    cycles = [sorted(c) for c in strongly_connected(graph) if len(c) > 1]
    assert not cycles, "modules that import each other (directly or around a loop):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively."""
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph.get(root, ())))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph.get(child, ()))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(component)
    return components
