"""What a runner kind says about itself (one `KIND` per kind module, listed in registry.py).

A kind knows how to load a runner from its `StageSpec`, which files it needs (from a hub
repository: `hub_patterns`; in a directory: `check_directory`), whether a listing of files is its
own (`claims`: kind inference), which devices it runs on, and what it must have installed. The
engine, the loader, `reranker-server check` and `download` ask the kind; none of them names one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..devices import Accelerator
    from ..model_store import ModelStore
    from ..specs import StageSpec
    from .base import Runner


@dataclass(frozen=True)
class LoadTarget:
    """Where a runner goes: a GPU (`accelerator`) or the CPU (None), with `threads` CPU threads
    per model call."""

    accelerator: Accelerator | None = None
    threads: int = 1


def no_extras() -> list[str]:
    return []


def no_patterns(names: Sequence[str], spec: StageSpec) -> tuple[list[str], list[str]]:
    return [], []


@dataclass(frozen=True)
class RunnerKind:
    """A runner kind (see the module docstring).

    - `load(spec, store, target)`: the runner (fetching files through `store` when needed);
    - `fetch(spec, store)`: the model's files, downloaded if needed (None: it needs none);
    - `check_directory(directory, spec)`: raise ModelLoadError unless a local directory holds
      what the kind runs (one line naming the files found and the fix);
    - `claims(names)`: whether a model holding these files (paths relative to it) is this kind's,
      for inference (kinds are asked in registry order);
    - `known_name(model)`: a name the kind fetches itself (FlashRank's model names);
    - `hub_patterns(names, spec)`: (allow, ignore) patterns of what to download from a hub
      repository listing `names`;
    - `devices`: "cpu" and/or "cuda"; `stage1`: it can be stage 1 (it tokenizes texts alone for
      long documents); `needs_model`: it reads model files at all;
    - `missing_extras()`: optional modules it needs that are not installed; `extra_fix` says
      how to install them.
    """

    name: str
    load: Callable[[StageSpec, ModelStore, LoadTarget], Runner]
    fetch: Callable[[StageSpec, ModelStore], Path | None]
    check_directory: Callable[[Path, StageSpec], None]
    claims: Callable[[Sequence[str]], bool]
    devices: tuple[str, ...] = ("cpu",)
    stage1: bool = True
    needs_model: bool = True
    known_name: Callable[[str], bool] = lambda model: False
    hub_patterns: Callable[[Sequence[str], StageSpec], tuple[list[str], list[str]]] = no_patterns
    missing_extras: Callable[[], list[str]] = no_extras
    extra_fix: str = ""

    def runs_on(self, device: str) -> bool:
        """Whether `device` ("cpu", "cuda", "cuda:1") is one of this kind's."""
        return device.split(":", 1)[0] in self.devices


def modelless_kind(
    name: str,
    load: Callable[[StageSpec, LoadTarget], Runner],
    *,
    devices: tuple[str, ...] = ("cpu",),
    stage1: bool = True,
) -> RunnerKind:
    """A kind that reads no model files (tests, plugins): `load(spec, target)` builds it."""
    return RunnerKind(
        name=name,
        load=lambda spec, _store, target: load(spec, target),
        fetch=lambda _spec, _store: None,
        check_directory=lambda _directory, _spec: None,
        claims=lambda _names: False,
        devices=devices,
        stage1=stage1,
        needs_model=False,
    )
