"""Docs are the parser's examples: every TOML block in README.md and docs/*.md loads with the real
loader in the one documented shape, every `RERANKER_NAME=value` they show is a real setting with a
valid value, and the `cpu-fast` example serves both stages on a torch-free install, on the CPU,
with no device setting and `fallback: null`."""

from __future__ import annotations

import re
import tomllib
import warnings
from pathlib import Path

import httpx
import pytest

from reranker_server.cascade_file import LEGACY_FIELDS, parse_cascades
from reranker_server.model_generator import TestModelPaths, write_onnx_export
from reranker_server.model_store import ModelStore
from reranker_server.preflight import plan_cascades
from reranker_server.settings import Settings

from .test_startup import env_for
from .test_torch_free import torch_free_env, torch_free_server, torch_free_site  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOML = re.compile(r"```toml\n(.*?)```", flags=re.S)
# `RERANKER_NAME=value` anywhere (code blocks, inline code, shell lines)
ASSIGNMENT = re.compile(r"\b(RERANKER_[A-Z0-9_]+)=([^\s`'\"|)]*)")
NOT_SETTINGS = ("RERANKER_TEST_", "RERANKER_BENCH_")
FILE_SETTINGS = {"api_key_file"}  # read at validation: the docs' path is an example


def toml_blocks() -> list[tuple[str, str]]:
    return [(page.name, block) for page in PAGES for block in TOML.findall(page.read_text())]


def test_there_are_examples() -> None:
    assert {name for name, _ in toml_blocks()} >= {"cascades.md", "models.md"}


@pytest.mark.parametrize(("page", "block"), toml_blocks())
def test_every_toml_block_loads_with_the_real_loader_in_the_one_shape(
    page: str, block: str
) -> None:
    document = tomllib.loads(block)
    cascades = parse_cascades(document, Settings(), page)
    assert cascades
    for table in document["cascades"].values():
        assert not set(table) & set(LEGACY_FIELDS), f"{page}: use a stage table, not {table}"
    # and the checks that run before startup pass on every kind, device and field named
    plans = plan_cascades(cascades, ModelStore(offline=True), lambda _policy: False)
    assert len(plans) == len(cascades)


def assignments() -> list[tuple[str, str, str]]:
    found = []
    for page in PAGES:
        for name, value in ASSIGNMENT.findall(page.read_text()):
            if not name.startswith(NOT_SETTINGS):
                found.append((page.name, name, value))
    return found


def test_every_assignment_in_the_docs_is_a_real_setting_with_a_valid_value() -> None:
    found = assignments()
    assert len(found) > 10
    for page, variable, value in found:
        name = variable.removeprefix("RERANKER_").lower()
        assert name in Settings.model_fields, f"{page}: {variable} is not a setting"
        if name in FILE_SETTINGS or not value or value.startswith("$"):
            continue
        Settings(**{name: value})  # raises when the docs show a value the model refuses


def block_named(name: str) -> str:
    for _, block in toml_blocks():
        if f"[cascades.{name}]" in block and len(tomllib.loads(block)["cascades"]) == 1:
            return block
    raise AssertionError(f"no single-cascade example [cascades.{name}]")


@pytest.fixture(scope="module")
def onnx_export(tiny_models: TestModelPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_onnx_export(tiny_models.stage2, tmp_path_factory.mktemp("onnx") / "export")


def test_the_cpu_fast_example_serves_both_stages_torch_free_on_the_cpu(
    torch_free_site: Path,  # noqa: F811
    tiny_models: TestModelPaths,
    onnx_export: Path,
    tmp_path: Path,
) -> None:
    """docs/models.md's `cpu-fast`, as written, with the generated models in place of the hub's
    (a FlashRank model, then an ONNX export holding int8 files): no device setting."""
    block = block_named("cpu-fast")
    (cascade,) = parse_cascades(tomllib.loads(block), Settings(), "docs")
    assert cascade.stage2 is not None and cascade.stage2.device == "auto"
    local = block.replace(f'"{cascade.stage1.model}"', f'"{tiny_models.stage1}"')
    local = local.replace(f'"{cascade.stage2.model}"', f'"{onnx_export}"')
    path = tmp_path / "cascades.toml"
    path.write_text(local, encoding="utf-8")
    env = torch_free_env(
        torch_free_site,
        env_for(tiny_models, tmp_path, RERANKER_DEVICE="auto", RERANKER_CASCADES=str(path)),
    )
    with torch_free_server(env) as (url, _):
        body = httpx.post(
            f"{url}/rerank",
            json={"query": "capital of france", "documents": ["paris", "berlin", "a dog"]},
            timeout=30,
        ).json()
    assert [s["device"] for s in body["stages"]] == ["cpu", "cpu"]
    assert body["stages"][1]["name"] == onnx_export.name
    assert (body["backend"], body["fallback"]) == ("cpu", None)
