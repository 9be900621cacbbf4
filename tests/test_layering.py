"""The layering the README's module map promises: Ray and MLflow only at the edge."""

import re
import subprocess
import sys
from pathlib import Path

import cvaa

PACKAGE = Path(cvaa.__file__).parent
EDGE = ("distributed", "tracking")


def _core_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        if rel.parts[0] in EDGE:
            continue
        parts = [p for p in rel.parts if p != "__init__"]
        names.append(".".join(["cvaa", *parts]))
    return names


def test_the_core_imports_neither_ray_nor_mlflow():
    modules = _core_modules()
    assert {"cvaa.gan", "cvaa.scoring", "cvaa.models", "cvaa.metrics", "cvaa.data.drr"} <= set(modules)
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.strip()
    assert out == "[]"


def test_private_ray_names_only_in_the_compat_module():
    pattern = re.compile(r"_private|gcs_pb2|\._internal")
    offenders = [f"{p.relative_to(PACKAGE)}:{i}" for p in sorted(PACKAGE.rglob("*.py"))
                 if p.name != "compat.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def _import_graph() -> dict[str, set[str]]:
    """cvaa's modules and the cvaa modules each imports, anywhere in its file (a function's
    lazy import counts: it is still a dependency, only a later one)."""
    import ast

    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = [p for p in path.relative_to(PACKAGE).with_suffix("").parts if p != "__init__"]
        modules[".".join(["cvaa", *parts])] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from a import b` names module a.b when b is one, else module a
                found = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                         for alias in node.names]
            else:
                continue
            targets |= {t for t in found if t in modules and t != name}
        graph[name] = targets
    return graph


def test_the_package_has_no_import_cycle():
    graph = _import_graph()
    assert "cvaa.distributed.checkpoints" in graph["cvaa.distributed.training"]
    state = dict.fromkeys(graph, 0)  # 0 new, 1 on the current path, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                cycles.append(path[path.index(nxt):] + [node, nxt] if nxt in path
                              else [node, nxt])
            elif state[nxt] == 0:
                visit(nxt, path + [node])
        state[node] = 2

    for module in sorted(graph):
        if state[module] == 0:
            visit(module, [])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
