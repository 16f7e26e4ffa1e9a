"""Checked before it runs: every stage of every cascade, on every host, before any model loads.

`plan_cascades` resolves each stage's kind (given, else inferred from the model's files), checks
what can be checked without loading a model -- the kind exists and can serve that stage on that
device, a local directory holds what the kind runs, a hub id is well-formed, the extras a stage
that runs here needs are installed -- and decides where each stage runs on this host. The first
mistake is one `ModelLoadError` line naming the field (`[cascades.X] stage2.kind`, or the
`RERANKER_*` variable). `describe` gives the plan as one line per cascade:

    cascade default: stage 1 flashrank ms-marco-MiniLM-L-12-v2 on cpu; stage 2 cross-encoder
    cross-encoder/ms-marco-MiniLM-L-6-v2: not on this host (no GPU); RERANKER_STAGE2_DEVICE=cpu
    runs it here

The server logs those lines at startup; `reranker-server check` prints them (and loads nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from .errors import ModelLoadError
from .model_store import ModelStore, check_model_name, is_hub_id, model_files
from .runners.kind import RunnerKind
from .runners.registry import infer_kind, kind_knowing, kind_of
from .specs import CascadeSpec, StageSpec

Placement = Literal["cpu", "gpu", "off"]
# "has a usable GPU for this device policy?" (the loader detects one; `check` asks the driver)
GpuProbe = Callable[[str], bool]


@dataclass(frozen=True)
class StagePlan:
    """Where one stage runs on this host.

    `placement`: "cpu", "gpu", or "off" (configured, not run here). `cpu_copy`: a CPU copy
    answers when the GPU can't (`cpu_fallback`). `home`: where the configuration means it to
    run ("cpu": the CPU by configuration, so an answer from it is no fallback; "gpu")."""

    stage: int
    spec: StageSpec  # its kind filled in
    kind: RunnerKind
    placement: Placement
    cpu_copy: bool
    home: Literal["cpu", "gpu"]
    note: str = ""

    def describe(self, cascade: CascadeSpec) -> str:
        head = f"stage {self.stage} {self.kind.name} {self.spec.model}"
        if self.placement == "off":
            return f"{head}: not on this host ({self.note}); {_cpu_fix(cascade, self.stage)}"
        where = "the GPU" if self.placement == "gpu" else "cpu"
        if self.placement == "gpu" and self.spec.device.startswith("cuda:"):
            where = self.spec.device
        copy = self.cpu_copy and self.placement == "gpu"
        extra = ", a CPU copy when the GPU can't" if copy else ""
        note = f" ({self.note})" if self.note else ""
        return f"{head} on {where}{extra}{note}"


@dataclass(frozen=True)
class CascadePlan:
    cascade: CascadeSpec
    stage1: StagePlan
    stage2: StagePlan | None

    def describe(self) -> str:
        parts = [p.describe(self.cascade) for p in (self.stage1, self.stage2) if p is not None]
        if self.stage2 is None:
            parts.append("no stage 2")
        return f"cascade {self.cascade.name}: " + "; ".join(parts)


def _cpu_fix(cascade: CascadeSpec, stage: int) -> str:
    field = cascade.where(stage, "device")
    if field.startswith("RERANKER_"):
        return f"{field}=cpu runs it here"
    return f'{field} = "cpu" runs it here'


def plan_cascades(
    cascades: list[CascadeSpec], store: ModelStore, gpu: GpuProbe, *, listings: bool = True
) -> list[CascadePlan]:
    """Every cascade checked and placed (see the module docstring). `listings`: a hub id's file
    listing may be asked for (offline: the cached one) to infer its kind; else only local files
    and known names are read."""
    return [plan_cascade(c, store, gpu, listings=listings) for c in cascades]


def plan_cascade(
    cascade: CascadeSpec, store: ModelStore, gpu: GpuProbe, *, listings: bool = True
) -> CascadePlan:
    try:
        stage1 = _plan_stage(cascade, 1, cascade.stage1, store, gpu, listings)
        stage2 = None
        if cascade.stage2 is not None:
            stage2 = _plan_stage(cascade, 2, cascade.stage2, store, gpu, listings)
    except ModelLoadError as exc:
        if not cascade.origin:
            raise
        raise ModelLoadError(f"{cascade.origin}: [cascades.{cascade.name}] {exc}") from exc
    return CascadePlan(cascade, stage1, stage2)


def plan_stage(cascade: CascadeSpec, stage: int, store: ModelStore, gpu: GpuProbe) -> StagePlan:
    """One stage of a cascade checked and placed (errors name the file and cascade)."""
    spec = cascade.stage1 if stage == 1 else cascade.stage2
    assert spec is not None
    try:
        return _plan_stage(cascade, stage, spec, store, gpu, True)
    except ModelLoadError as exc:
        if not cascade.origin:
            raise
        raise ModelLoadError(f"{cascade.origin}: [cascades.{cascade.name}] {exc}") from exc


def _field(cascade: CascadeSpec, stage: int, field: str) -> str:
    """A stage field as its error names it: `stage2.kind` inside a file's cascade (the caller
    prefixes the file and cascade), else the variable."""
    where = cascade.where(stage, field)
    return where.split("] ", 1)[1] if cascade.origin else where


def resolve_kind(
    cascade: CascadeSpec, stage: int, spec: StageSpec, store: ModelStore, online: bool
) -> tuple[StageSpec, RunnerKind, bool]:
    """The stage's spec with its kind filled in, the kind, and whether that kind is a guess (no
    kind given and no files known: the stage's usual kind). `online`: a hub id whose listing is
    not cached may be listed from the hub."""
    if spec.kind is not None:
        return spec, kind_of(spec.kind, _field(cascade, stage, "kind")), False
    known = kind_knowing(spec.model, stage)
    if known is not None:
        return spec.model_copy(update={"kind": known}), kind_of(known), False
    names: list[str] | None = None
    local = Path(spec.model).expanduser()
    if local.is_dir():
        names = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    elif is_hub_id(spec.model):
        for offline in (True, False) if online and not store.offline else (True,):
            try:
                names = model_files(
                    spec.model, store.cache_dir, offline=offline, endpoint=store.hub_endpoint
                )
            except Exception:  # an unreachable hub: the download says it, with its fix
                names = None
            if names:
                break
    kind = infer_kind(spec.model, names, stage)
    return spec.model_copy(update={"kind": kind}), kind_of(kind), not names


def _plan_stage(
    cascade: CascadeSpec,
    stage: int,
    spec: StageSpec,
    store: ModelStore,
    gpu: GpuProbe,
    listings: bool,
) -> StagePlan:
    """The stage checked and placed. A guessed kind (a hub id given without a kind, its listing
    not cached) is settled from the hub's listing only when the guess would run here: a stage
    that does not run on this host costs no request to the hub."""
    resolved, kind, guessed = resolve_kind(cascade, stage, spec, store, online=False)
    plan = _checked(cascade, stage, resolved, kind, gpu)
    if guessed and listings and plan.placement != "off" and not store.offline:
        resolved, kind, guessed = resolve_kind(cascade, stage, spec, store, online=True)
        plan = _checked(cascade, stage, resolved, kind, gpu)
    if guessed:
        note = f"kind {kind.name} assumed: no file listing; set the kind to be sure"
        plan = replace(plan, note=f"{plan.note}; {note}" if plan.note else note)
    return plan


def _checked(
    cascade: CascadeSpec, stage: int, spec: StageSpec, kind: RunnerKind, gpu: GpuProbe
) -> StagePlan:
    kind_field = _field(cascade, stage, "kind")
    device_field = _field(cascade, stage, "device")
    if stage == 1 and not kind.stage1:
        raise ModelLoadError(
            f"{kind_field}: runner kind {kind.name!r} can't be stage 1 (it has no tokenizer for "
            "long documents); fix: a stage-1 kind such as flashrank, onnx-cross-encoder or keyword"
        )
    policy = spec.device
    if policy != "auto" and not kind.runs_on(policy):
        raise ModelLoadError(
            f"{device_field}: runner kind {kind.name!r} runs on {', '.join(kind.devices)} only, "
            f"not {policy}; fix: device auto or {kind.devices[0]}"
        )
    if stage == 1 and policy not in ("auto", "cpu"):
        raise ModelLoadError(f"{device_field}: stage 1 runs on the CPU; fix: device auto or cpu")
    if kind.needs_model:
        _check_model(cascade, stage, spec, kind)
    placement, cpu_copy, home, note = _place(stage, spec, kind, gpu)
    if placement != "off":
        missing = kind.missing_extras()
        if missing:
            raise ModelLoadError(
                f'{kind_field}: kind "{kind.name}" needs {", ".join(missing)} (not '
                f"installed); fix: {kind.extra_fix}"
            )
    return StagePlan(stage, spec, kind, placement, cpu_copy, home, note)


def _check_model(cascade: CascadeSpec, stage: int, spec: StageSpec, kind: RunnerKind) -> None:
    model_field = _field(cascade, stage, "model")
    if kind.known_name(spec.model):
        return
    try:
        local = check_model_name(spec.model, model_field)
        if local is not None:
            kind.check_directory(local, spec)
    except ModelLoadError as exc:
        message = str(exc)
        if not message.startswith(model_field):
            message = f"{model_field}: {message}"
        raise ModelLoadError(message) from exc


def _place(
    stage: int, spec: StageSpec, kind: RunnerKind, gpu: GpuProbe
) -> tuple[Placement, bool, Literal["cpu", "gpu"], str]:
    """(placement, cpu copy, home, note) of a stage on this host."""
    if stage == 1 or spec.device == "cpu" or not kind.runs_on("cuda"):
        note = "" if spec.device == "cpu" or stage == 1 else "a CPU-only kind"
        return "cpu", False, "cpu", note
    if gpu(spec.device):
        return "gpu", spec.cpu_fallback, "gpu", ""
    if spec.cpu_fallback:
        return "cpu", False, "gpu", "no GPU: the CPU copy answers, fallback no_gpu"
    return "off", False, "gpu", "no GPU"


def describe(plans: list[CascadePlan]) -> list[str]:
    """One line per cascade: what runs where."""
    return [plan.describe() for plan in plans]
