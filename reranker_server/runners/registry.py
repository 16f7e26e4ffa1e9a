"""Runner kinds by name: a kind is one module with a `load(model, settings, accelerator)`
function, plus one line here. Modules are imported only when their kind is used, so a CPU-only
host never imports torch for a kind it does not run.

    RERANKER_STAGE1_KIND=flashrank  RERANKER_STAGE2_KIND=cross-encoder   (the defaults)

Tests and plugins add kinds with `register(name, factory)`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import ModelLoadError
from .base import Runner

if TYPE_CHECKING:
    from ..devices import Accelerator
    from ..settings import Settings

RunnerFactory = Callable[[str, "Settings", "Accelerator | None"], Runner]

# kind -> "module:function" (imported on first use) or the factory itself
RUNNER_KINDS: dict[str, str | RunnerFactory] = {
    "flashrank": "reranker_server.runners.flashrank:load",
    "cross-encoder": "reranker_server.runners.cross_encoder:load",
    "onnx-cross-encoder": "reranker_server.runners.onnx_cross_encoder:load",
}


def register(kind: str, factory: str | RunnerFactory) -> None:
    """Add (or replace) a runner kind."""
    RUNNER_KINDS[kind] = factory


def factory_of(kind: str) -> RunnerFactory:
    entry = RUNNER_KINDS.get(kind)
    if entry is None:
        raise ModelLoadError(
            f"unknown runner kind {kind!r}; fix: use one of {', '.join(sorted(RUNNER_KINDS))}"
        )
    if isinstance(entry, str):
        module, _, function = entry.partition(":")
        factory: RunnerFactory = getattr(importlib.import_module(module), function)
        return factory
    return entry


def load_runner(
    kind: str, model: str, settings: Settings, accelerator: Accelerator | None = None
) -> Runner:
    """A loaded runner of `kind` for `model` (a name, hub id or directory). Raises
    ModelLoadError with a one-line message."""
    return factory_of(kind)(model, settings, accelerator)
