"""The rules of docs/architecture.md that can be checked from the source: which module may import
which. Every import counts, `TYPE_CHECKING` ones and those inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import reranker_server

PACKAGE = Path(reranker_server.__file__).parent
NAME = "reranker_server"
ML_LIBRARIES = ("torch", "onnxruntime", "sentence_transformers")
# Where the ML libraries may be imported: the runners, the device policy, and the generator of
# the tiny test models (a tool: `reranker-server make-test-models`, never imported by a server).
ML_ALLOWED = (
    "reranker_server.runners",
    "reranker_server.devices",
    "reranker_server.model_generator",
    "reranker_server.quantize",  # exports with torch, quantizes with ONNX Runtime
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, relative imports resolved (`from . import x` gives the
    package and `package.x`)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(path): imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def offenders(modules: list[str], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {
        module: sorted(i for i in MODULES[module] if within(i, *forbidden)) for module in modules
    }
    return {module: bad for module, bad in found.items() if bad}


def test_the_scan_sees_the_package() -> None:
    """The rules below are not vacuous: the scan finds the layers and resolves relative
    imports."""
    assert {"reranker_server.api.routes", "reranker_server.engine.engine"} <= set(MODULES)
    assert "reranker_server.service" in MODULES["reranker_server.api.answer"]
    assert "reranker_server.engine.scheduler" in MODULES["reranker_server.engine.engine"]
    assert "onnxruntime" in MODULES["reranker_server.runners.onnx_base"]


def in_package(prefix: str) -> list[str]:
    return [m for m in MODULES if within(m, f"{NAME}.{prefix}")]


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        # HTTP dialects talk to the service only: never to the engine, runners or devices.
        ("api", ("engine", "runners", "devices", "model_store")),
        # The engine knows nothing of HTTP or of the service above it.
        ("engine", ("api", "service", "app", "server", "cli")),
        # A runner is one model on one device: no engine, service or HTTP.
        ("runners", ("api", "service", "app", "server", "cli", "engine")),
        ("service", ("api", "app", "server", "cli")),
    ],
)
def test_layers_depend_one_way(layer: str, forbidden: tuple[str, ...]) -> None:
    modules = in_package(layer)
    assert modules
    assert offenders(modules, tuple(f"{NAME}.{f}" for f in forbidden)) == {}


def test_the_value_types_import_nothing_from_the_package() -> None:
    assert offenders([f"{NAME}.types"], (NAME,)) == {}


def test_only_runners_and_devices_import_the_ml_libraries() -> None:
    modules = [m for m in MODULES if not within(m, *ML_ALLOWED)]
    assert offenders(modules, ML_LIBRARIES) == {}


def test_no_ambient_request_state() -> None:
    """What a request did travels in its outcome, not in context variables several layers
    write (the answer's headers, metrics and log line are built from `RerankOutcome`)."""
    assert [m for m, found in MODULES.items() if "contextvars" in found] == []
