"""Named cascades: the file `RERANKER_CASCADES` names, read and checked (docs/cascades.md).

    [cascades.english]                      # a request's `model` picks a cascade by name ...
    stage1 = "ms-marco-MiniLM-L-12-v2"
    stage2 = "cross-encoder/ms-marco-MiniLM-L-6-v2"
    aliases = ["rerank-v3.5"]               # ... or by alias
    default = true                          # unknown names go here (else: the first cascade)

    [cascades.multilingual]
    stage1 = "ms-marco-MultiBERT-L-12"
    stage2 = "BAAI/bge-reranker-v2-m3"
    candidates = 20

Without the file there is one cascade, `default`, from the stage settings (`RERANKER_STAGE1_MODEL`
and the rest), as before cascades existed. Every mistake in the file is one `ModelLoadError` line
naming the file, the cascade and the field; the server does not start.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ModelLoadError
from .settings import Settings

DEFAULT_NAME = "default"


class CascadeTable(BaseModel):
    """One `[cascades.NAME]` table as written in the file."""

    model_config = ConfigDict(extra="forbid", strict=True)

    stage1: str = Field(..., min_length=1)
    stage1_kind: str = Field("flashrank", min_length=1)
    stage2: str | None = Field(None, min_length=1)
    stage2_kind: str = Field("cross-encoder", min_length=1)
    stage2_on_cpu: bool | None = None
    candidates: int | None = Field(None, ge=1)
    aliases: list[str] = Field(default_factory=list)
    default: bool = False


@dataclass(frozen=True)
class Cascade:
    """One cascade, every field filled in (the settings give what the table leaves out).

    `stage2` None: stage 1 alone answers. `origin`: where it was defined, for error messages
    ("" for the cascade built from the settings)."""

    name: str
    stage1: str
    stage1_kind: str
    stage2: str | None
    stage2_kind: str
    stage2_on_cpu: bool
    candidates: int
    aliases: tuple[str, ...] = ()
    default: bool = False
    origin: str = ""

    def names(self) -> tuple[str, ...]:
        """What a request's `model` may say to pick this cascade."""
        return (self.name, *self.aliases)


def from_settings(settings: Settings) -> Cascade:
    """The one cascade of a server without a cascades file."""
    return Cascade(
        name=DEFAULT_NAME,
        stage1=settings.stage1_model,
        stage1_kind=settings.stage1_kind,
        stage2=settings.stage2_model,
        stage2_kind=settings.stage2_kind,
        stage2_on_cpu=settings.stage2_on_cpu,
        candidates=settings.candidates,
        default=True,
    )


def read_cascades(settings: Settings) -> list[Cascade]:
    """The cascades to serve, the default one first. Raises ModelLoadError (one line)."""
    path = settings.cascades
    if path is None:
        return [from_settings(settings)]
    where = f"RERANKER_CASCADES {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelLoadError(f"{where}: no such file; fix: the path or unset it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{where}: can't be read ({type(exc).__name__})") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelLoadError(f"{where}: not valid TOML: {exc}") from None
    return parse_cascades(document, settings, where)


def parse_cascades(document: dict[str, Any], settings: Settings, where: str) -> list[Cascade]:
    """The cascades of a parsed file (see `read_cascades`)."""
    extra = sorted(set(document) - {"cascades"})
    if extra:
        raise ModelLoadError(
            f"{where}: unknown top-level key {extra[0]!r}; fix: put each cascade in a "
            "[cascades.NAME] table"
        )
    tables = document.get("cascades")
    if not isinstance(tables, dict) or not tables:
        raise ModelLoadError(f"{where}: no cascades; fix: add a [cascades.NAME] table")
    cascades = [_cascade(name, table, settings, where) for name, table in tables.items()]
    _check_names(cascades, where)
    defaults = [c for c in cascades if c.default]
    if len(defaults) > 1:
        raise ModelLoadError(
            f"{where}: [cascades.{defaults[1].name}] default: cascade {defaults[0].name!r} is "
            "already the default; fix: set default = true on one cascade only"
        )
    first = defaults[0] if defaults else cascades[0]
    first = replace(first, default=True)
    return [first, *(c for c in cascades if c.name != first.name)]


def _cascade(name: str, table: Any, settings: Settings, where: str) -> Cascade:
    label = f"{where}: [cascades.{name}]"
    if not name.strip():
        raise ModelLoadError(f"{where}: a cascade name is empty; fix: [cascades.NAME]")
    if not isinstance(table, dict):
        raise ModelLoadError(f"{label}: must be a table; fix: write [cascades.{name}] above it")
    try:
        spec = CascadeTable.model_validate(table)
    except ValidationError as exc:
        raise ModelLoadError(f"{label} {_first_error(exc)}") from None
    for alias in spec.aliases:
        if not alias.strip():
            raise ModelLoadError(f"{label} aliases: an alias is empty")
    return Cascade(
        name=name,
        stage1=spec.stage1,
        stage1_kind=spec.stage1_kind,
        stage2=spec.stage2,
        stage2_kind=spec.stage2_kind,
        stage2_on_cpu=settings.stage2_on_cpu if spec.stage2_on_cpu is None else spec.stage2_on_cpu,
        candidates=settings.candidates if spec.candidates is None else spec.candidates,
        aliases=tuple(spec.aliases),
        default=spec.default,
        origin=where,
    )


def _first_error(exc: ValidationError) -> str:
    """`field: message (got value)` of a table's first error, on one line."""
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"]) or "table"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        known = ", ".join(CascadeTable.model_fields)
        return f"{field}: unknown field; fix: use one of {known}"
    if error["type"] != "missing":
        message += f" (got {error['input']!r})"
    return f"{field}: {message}"


def _check_names(cascades: list[Cascade], where: str) -> None:
    """No two cascades answer to the same name (names first, then aliases)."""
    owner = {cascade.name: cascade.name for cascade in cascades}
    for cascade in cascades:
        for alias in cascade.aliases:
            if alias in owner:
                raise ModelLoadError(
                    f"{where}: [cascades.{cascade.name}] aliases: {alias!r} already names "
                    f"cascade {owner[alias]!r}; fix: every name and alias must be unique"
                )
            owner[alias] = cascade.name
