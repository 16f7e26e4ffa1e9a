"""docs/models.md: its cascade examples load with the real parser, and it names every runner kind,
every FlashRank model and the ONNX files the runner may choose."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from reranker_server.cascade_file import parse_cascades
from reranker_server.model_generator import flashrank_pairwise_names
from reranker_server.model_store import ONNX_ARM64, ONNX_BY_CPU_FLAG
from reranker_server.runners.registry import RUNNER_KINDS
from reranker_server.settings import Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def test_the_cascade_examples_load_with_the_real_parser() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 3  # English, multilingual, CPU-only
    names = []
    for block in blocks:
        for cascade in parse_cascades(tomllib.loads(block), Settings(), "docs/models.md"):
            names.append(cascade.name)
            for _, stage in cascade.stages():
                assert stage.kind is None or stage.kind in RUNNER_KINDS, cascade.name
    assert {"english", "multilingual", "cpu-fast", "products"} <= set(names)


def test_every_kind_is_in_the_kinds_table() -> None:
    text = DOC.read_text()
    for kind in RUNNER_KINDS:
        assert f"| `{kind}` |" in text, kind


def test_every_flashrank_model_and_onnx_file_is_named() -> None:
    text = DOC.read_text()
    for name in [*flashrank_pairwise_names(), "rank_zephyr_7b_v1_full"]:
        assert f"`{name}`" in text, name
    for stem in [ONNX_ARM64, *(stem for _, stem in ONNX_BY_CPU_FLAG)]:
        assert f"{stem}.onnx" in text, stem
