"""The package's layout holds: no import cycles between its modules (type-only imports included), and each
subsystem imports only the ones below it. No server."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mlflow_feedback_middleware"
NAME = PACKAGE.name

# What each subsystem (or shared top-level module) may import besides itself, bottom up; `middleware`, the
# entry point, may import anything. See ARCHITECTURE.md.
LEAVES = {"ids", "logs", "redaction", "sqlite_files"}
LAYERS: dict[str, set[str]] = {
    **{leaf: set() for leaf in LEAVES},
    "_mlflow": LEAVES,
    "intake": LEAVES,
    "config": {"intake", "env_config", *LEAVES},
    "env_config": {"intake", *LEAVES},
    "delivery": {"_mlflow", "intake", *LEAVES},
    "insight": {"_mlflow", "intake", "config", *LEAVES},
    "asgi": {"_mlflow", "intake", "delivery", "insight", "config", *LEAVES},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The package modules `path` imports, at any depth, as dotted names inside the package."""
    name = module_name(path)
    here = name.split(".") if name else []
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = [*base, *(node.module.split(".") if node.module else [])]
        elif (node.module or "").split(".")[0] == NAME:
            target = node.module.split(".")[1:]  # type: ignore[union-attr]
        else:
            continue
        found.add(".".join(target))
        found.update(".".join([*target, alias.name]) for alias in node.names)  # `from . import module`
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imports_of(path) & set(modules) - {name, ""} for name, path in modules.items() if name}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], dict.fromkeys(edges, 0)  # 0 unseen, 1 on the path, 2 done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif state.get(nxt) == 0:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if state[node] == 0:
            walk(node, [node])
    return found


def test_the_checker_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_checker_reads_relative_imports() -> None:
    edges = graph()
    assert "asgi.tracer" in edges["asgi.exchange"]
    assert "_mlflow.tracing" in edges["asgi.exchange"]
    assert "asgi.websocket" in imports_of(PACKAGE / "__init__.py")


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_subsystems_import_only_the_ones_below_them() -> None:
    wrong = []
    for module, targets in graph().items():
        layer = module.split(".")[0]
        if layer == "middleware":
            continue
        for target in targets:
            other = target.split(".")[0]
            if other != layer and other not in LAYERS[layer]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []
