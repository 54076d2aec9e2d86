"""The import rules of docs/architecture.md, checked on the source: no cycle, nothing imports upward.

The graph counts every import statement, also those inside functions (a lazy import is still a
dependency: `app.services.queue` <-> `workers.celery_app` was a cycle made only of lazy imports).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ml", "app", "workers", "cli", "scan_client")

# Each module belongs to the layer of its longest matching prefix; a layer may import itself and
# the layers listed for it, nothing else (docs/architecture.md explains why each line is so).
LAYER_OF = {
    "ml": "ml",
    "app.core": "core",
    "app.tables": "data",
    "app.services": "domain",
    "app.bootstrap": "domain",
    "app.serving": "domain",
    "app.observability": "domain",
    "app.schemas": "http",
    "app.routes": "http",
    "app.ui": "http",
    "app.deps": "http",
    "app.error_handlers": "http",
    "app.uploads": "http",
    "app.request_bodies": "http",
    "app.main": "http",
    "app.security": "http",
    "app": "http",
    "workers": "workers",
    "cli": "cli",
    "scan_client": "client",
}
MAY_IMPORT = {
    "ml": set(),
    "core": {"ml"},  # constants only (ml.limits): core must stay cheap to import
    "data": {"core", "ml"},
    "domain": {"core", "data", "ml"},
    "http": {"domain", "core", "data", "ml"},
    "workers": {"domain", "core", "data", "ml"},
    "cli": {"client", "http", "workers", "domain", "core", "data", "ml"},
    # The Python client shares the API's pydantic schemas (app.schemas, in the HTTP layer) and nothing
    # else of the server: no services, no database, no torch.
    "client": {"http"},
}
# Third-party web frameworks stay in the HTTP layer; serving may only borrow Starlette's thread pool.
WEB = ("fastapi", "starlette")
NO_WEB = ("ml", "app.core", "app.tables", "app.services", "app.bootstrap", "workers")
SERVING_MAY_USE = ("starlette.concurrency",)


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything `name` imports (from-imports name `package.member`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _owner(target: str, modules: dict[str, Path]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _layer(module: str) -> str:
    best = max((p for p in LAYER_OF if module == p or module.startswith(p + ".")), key=len)
    return LAYER_OF[best]


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> project modules it imports, module -> all names it imports)."""
    modules = _modules(root)
    raw = {name: _imports(name, path) for name, path in modules.items()}
    graph = {name: {t for t in (_owner(n, modules) for n in names) if t and t != name} for name, names in raw.items()}
    return graph, raw


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def upward_imports(graph: dict[str, set[str]], raw: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        layer = _layer(module)
        for target in sorted(targets):
            other = _layer(target)
            if other != layer and other not in MAY_IMPORT[layer]:
                bad.append(f"{module} ({layer}) imports {target} ({other})")
        if any(module == p or module.startswith(p + ".") for p in NO_WEB):
            bad += [f"{module} ({layer}) imports {n}" for n in sorted(raw[module]) if n.split(".")[0] in WEB]
        elif module.startswith("app.serving"):
            bad += [
                f"{module} ({layer}) imports {n}"
                for n in sorted(raw[module])
                if n.split(".")[0] in WEB and not n.startswith(SERVING_MAY_USE)
            ]
    return bad


@pytest.fixture(scope="module")
def project() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    return import_graph()


def test_no_import_cycles(project) -> None:
    graph, _ = project
    assert cycles(graph) == []


def test_no_upward_imports(project) -> None:
    graph, raw = project
    assert upward_imports(graph, raw) == []


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    # The same checks on a small tree that breaks both rules: they must not pass vacuously.
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "app" / "services").mkdir()
    (tmp_path / "app" / "services" / "__init__.py").write_text("")
    (tmp_path / "app" / "services" / "queue.py").write_text("def enqueue():\n    from workers.celery_app import app\n")
    (tmp_path / "workers" / "celery_app.py").write_text("from app.services import queue\n")
    (tmp_path / "ml" / "stages.py").write_text("from app.core import settings\nimport fastapi\n")
    (tmp_path / "app" / "serving").mkdir()
    (tmp_path / "app" / "serving" / "__init__.py").write_text("")
    (tmp_path / "app" / "serving" / "predict.py").write_text(
        "from fastapi import Request\nfrom starlette.concurrency import run_in_threadpool\n"
    )
    graph, raw = import_graph(tmp_path)
    assert cycles(graph) == [["app.services.queue", "workers.celery_app"]]
    assert upward_imports(graph, raw) == [
        "app.services.queue (domain) imports workers.celery_app (workers)",
        "app.serving.predict (domain) imports fastapi",
        "app.serving.predict (domain) imports fastapi.Request",
        "ml.stages (ml) imports app (http)",
        "ml.stages (ml) imports fastapi",
    ]


def test_entry_points_are_in_the_graph(project) -> None:
    graph, _ = project
    assert {"app.main", "cli.main", "workers.tasks", "workers.celery_app", "ml.cli"} <= set(graph)
