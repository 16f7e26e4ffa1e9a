"""Named cascades: the file `RERANKER_CASCADES` names, read and checked (docs/cascades.md).

    [cascades.english]                      # a request's `model` picks a cascade by name ...
    stage1 = "ms-marco-MiniLM-L-12-v2"      # a stage: a model ...
    stage2 = { model = "cross-encoder/ms-marco-MiniLM-L-6-v2", max_length = 256 }  # ... or a table
    aliases = ["rerank-v3.5"]               # ... or by alias
    default = true                          # unknown names go here (else: the first cascade)

A stage is a model name, or a table of StageSpec fields (specs.py): an inline table as above or a
`[cascades.NAME.stage2]` table, parsed alike. What a table leaves out comes from the settings
(`RERANKER_MAX_LENGTH`, ...), except `model` and `kind` (inferred from the files when unset).
Without the file there is one cascade, `default`, from the stage settings (`specs.default_cascade`).
Every mistake in the file is one `ModelLoadError` line naming the file, the cascade and the field;
the server does not start.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import ModelLoadError
from .settings import Settings
from .specs import (
    DEFAULT_NAME,
    STAGE_FIELDS,
    CascadeSpec,
    cascade_defaults,
    default_cascade,
    stage_defaults,
)

__all__ = ["DEFAULT_NAME", "from_settings", "parse_cascades", "read_cascades"]

CASCADE_FIELDS = (
    "stage1",
    "stage2",
    "candidates",
    "aliases",
    "default",
    "long_documents",
    "max_chunks_per_doc",
)
# Older flat spellings, still read: `stage2_kind = "x"` is `stage2 = { kind = "x" }`.
LEGACY_FIELDS = {
    "stage1_kind": ("stage1", "kind"),
    "stage2_kind": ("stage2", "kind"),
    "stage2_on_cpu": ("stage2", "cpu_fallback"),
}

from_settings = default_cascade


def read_cascades(settings: Settings) -> list[CascadeSpec]:
    """The cascades to serve, the default one first. Raises ModelLoadError (one line)."""
    path = settings.cascades
    if path is None:
        return [default_cascade(settings)]
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


def parse_cascades(document: dict[str, Any], settings: Settings, where: str) -> list[CascadeSpec]:
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
    first = (defaults[0] if defaults else cascades[0]).model_copy(update={"default": True})
    return [first, *(c for c in cascades if c.name != first.name)]


def _cascade(name: str, table: Any, settings: Settings, where: str) -> CascadeSpec:
    label = f"{where}: [cascades.{name}]"
    if not name.strip():
        raise ModelLoadError(f"{where}: a cascade name is empty; fix: [cascades.NAME]")
    if not isinstance(table, dict):
        raise ModelLoadError(f"{label}: must be a table; fix: write [cascades.{name}] above it")
    table = dict(table)
    unknown = sorted(set(table) - set(CASCADE_FIELDS) - set(LEGACY_FIELDS))
    if unknown:
        hint = ""
        if unknown[0] in STAGE_FIELDS:
            hint = f" (a stage's field: stage2 = {{ model = ..., {unknown[0]} = ... }})"
        raise ModelLoadError(
            f"{label} {unknown[0]}: unknown field{hint}; fix: use one of "
            f"{', '.join(CASCADE_FIELDS)}"
        )
    stages = _stage_tables(table, label)
    if stages["stage1"] is None:
        raise ModelLoadError(f"{label} stage1: Field required")
    for alias in table.get("aliases", []) if isinstance(table.get("aliases"), list) else []:
        if isinstance(alias, str) and not alias.strip():
            raise ModelLoadError(f"{label} aliases: an alias is empty")
    values: dict[str, Any] = {**cascade_defaults(settings), **table, "name": name, "origin": where}
    for number, stage in ((1, "stage1"), (2, "stage2")):
        fields = stages[stage]
        if fields is not None:
            values[stage] = {**stage_defaults(settings, number), **fields}
    if isinstance(values.get("aliases"), list):
        values["aliases"] = tuple(values["aliases"])
    try:
        return CascadeSpec.model_validate(values, strict=True)
    except ValidationError as exc:
        raise ModelLoadError(f"{label} {_first_error(exc)}") from None


def _stage_tables(table: dict[str, Any], label: str) -> dict[str, dict[str, Any] | None]:
    """`stage1` and `stage2` as tables of stage fields (popped from `table`, with the older flat
    spellings folded in): a model name is `{ model = NAME }`."""
    stages: dict[str, dict[str, Any] | None] = {}
    for stage in ("stage1", "stage2"):
        value = table.pop(stage, None)
        if value is None:
            stages[stage] = None
        elif isinstance(value, str):
            stages[stage] = {"model": value}
        elif isinstance(value, dict):
            stages[stage] = dict(value)
        else:
            raise ModelLoadError(
                f"{label} {stage}: must be a model name or a table of stage fields (got "
                f'{value!r}); fix: {stage} = "MODEL" or {stage} = {{ model = "MODEL", ... }}'
            )
    for legacy, (stage, field) in LEGACY_FIELDS.items():
        if legacy in table:
            value = table.pop(legacy)
            if stages[stage] is not None:
                stages[stage].setdefault(field, value)  # type: ignore[union-attr]
    return stages


def _first_error(exc: ValidationError) -> str:
    """`field: message (got value)` of a table's first error, on one line."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    if (
        len(loc) > 2
        and loc[0] in ("stage1", "stage2")
        and loc[1] in ("str", "StageSpec", "function-after[_device(), str]")
    ):
        del loc[1]
    field = ".".join(loc) or "table"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        known = ", ".join(STAGE_FIELDS)
        return f"{field}: unknown field; fix: use one of {known}"
    if error["type"] != "missing":
        message += f" (got {error['input']!r})"
    return f"{field}: {message}"


def _check_names(cascades: list[CascadeSpec], where: str) -> None:
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
