"""The package's import graph: no cycles, and arrows only point down the layers
cli → stages → onnxfold / torchfold → check → shared vocabulary (errors, options, report, ...)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bnfold"
# Lower number = lower layer; a module may import only from its own layer or below.
LAYERS = {"errors": 0, "interrupts": 0, "json_reader": 1, "options": 1, "report": 1, "fold_math": 1, "reparam": 1,
          "detect": 1, "population": 2,
          "check": 3, "onnxfold": 4, "torchfold": 5, "stages": 6, "render": 6, "cli": 7, "__init__": 8,
          "__main__": 9}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"] or ["__init__"]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """bnfold-internal modules imported anywhere in the file (lazy imports included)."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "__init__":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = ".".join([*base, node.module] if node.module else base)
            if node.module is None:
                found.update(f"{target}.{a.name}".lstrip(".") for a in node.names)
            else:
                found.add(target)
    return {t for t in found if t}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {t if t in modules else t.rsplit(".", 1)[0] for t in _imports(path)}
        graph[name] = {t for t in graph[name] if t in modules and t != name}
    return graph


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_arrows_point_down():
    upward = [(a, b) for a, targets in _graph().items() for b in targets
              if _layer(b) > _layer(a) and not (a.startswith("cli") and b.startswith("cli"))]
    assert not upward, upward


def test_torch_modules_stay_small():
    """One job per module: none of the torch half is over 400 lines."""
    long = {p.name: n for p in (PACKAGE / "torchfold").glob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_no_private_names_imported_across_modules():
    """A helper another module needs is part of its module's interface, named without '_'."""
    private = [f"{path.relative_to(PACKAGE)}: {alias.name}" for path in PACKAGE.rglob("*.py")
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.ImportFrom) and node.level for alias in node.names
               if alias.name.startswith("_") and alias.name != "__version__"]
    assert not private, private
