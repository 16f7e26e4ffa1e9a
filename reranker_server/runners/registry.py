"""Runner kinds by name: the only place kinds are named. A kind is one module with a `KIND`
(runners/kind.py: how to load it from a StageSpec, which files it needs, which devices it runs
on), plus one line here. Modules are imported only when their kind is asked about, so a CPU-only
host never imports torch for a kind it does not run.

Order matters for inference: a model given without a kind gets the first kind here that claims
its files (a FlashRank name or layout: flashrank; torch weights: cross-encoder; ONNX files only:
onnx-cross-encoder).

Tests and plugins add kinds with `register(name, module_or_kind)`.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import ModelLoadError
from .kind import LoadTarget, RunnerKind

if TYPE_CHECKING:
    from ..model_store import ModelStore
    from ..specs import StageSpec
    from .base import Runner

# kind -> module holding `KIND` (imported on first use), or the RunnerKind itself
RUNNER_KINDS: dict[str, str | RunnerKind] = {
    "flashrank": "reranker_server.runners.flashrank",
    "cross-encoder": "reranker_server.runners.cross_encoder",
    "onnx-cross-encoder": "reranker_server.runners.onnx_cross_encoder",
    "keyword": "reranker_server.runners.keyword",
}
# What a stage gets when nothing tells its kind (a hub id whose listing is unknown)
FALLBACK_KIND = {1: "flashrank", 2: "cross-encoder"}


def register(kind: str, entry: str | RunnerKind) -> None:
    """Add (or replace) a runner kind."""
    RUNNER_KINDS[kind] = entry


def unknown_kind(kind: str, field: str = "kind") -> ModelLoadError:
    """`field: unknown runner kind 'x'; did you mean 'y'? (kinds: ...)`."""
    close = difflib.get_close_matches(kind, list(RUNNER_KINDS), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ModelLoadError(
        f"{field}: unknown runner kind {kind!r}; fix: {hint}(kinds: "
        f"{', '.join(sorted(RUNNER_KINDS))})"
    )


def kind_of(kind: str, field: str = "kind") -> RunnerKind:
    """The kind named `kind`; ModelLoadError (naming `field`) when there is none."""
    entry = RUNNER_KINDS.get(kind)
    if entry is None:
        raise unknown_kind(kind, field)
    if isinstance(entry, str):
        found: RunnerKind = importlib.import_module(entry).KIND
        return found
    return entry


def kind_knowing(model: str, stage: int) -> str | None:
    """The kind that knows `model` by name (a FlashRank model name, `bm25`), if any."""
    for kind in RUNNER_KINDS:
        found = kind_of(kind)
        if found.known_name(model) and (stage == 2 or found.stage1):
            return kind
    return None


def infer_kind(model: str, names: Sequence[str] | None, stage: int) -> str:
    """The kind of a model given without one: the first kind that claims its files (`names`,
    None when unknown) or its name, else the stage's usual kind."""
    for kind in RUNNER_KINDS:
        found = kind_of(kind)
        if found.known_name(model) or (names and found.claims(names)):
            if stage == 1 and not found.stage1:
                continue
            return kind
    return FALLBACK_KIND[stage]


def load_runner(spec: StageSpec, store: ModelStore, target: LoadTarget | None = None) -> Runner:
    """A loaded runner for a stage whose kind is set (`resolve_kind` fills it in). Raises
    ModelLoadError with a one-line message."""
    if spec.kind is None:
        raise ModelLoadError(f"stage model {spec.model}: no kind (resolve it first)")
    return kind_of(spec.kind).load(spec, store, target or LoadTarget())
