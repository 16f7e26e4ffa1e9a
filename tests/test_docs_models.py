"""docs/models.md: its cascade examples are valid TOML in the documented shape, and it names every
FlashRank model and the ONNX files the runner may choose."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from reranker_server.model_generator import flashrank_pairwise_names
from reranker_server.model_store import ONNX_ARM64, ONNX_BY_CPU_FLAG, STAGE2_KINDS

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
CASCADE_FIELDS = {"stage1", "stage2", "candidates", "aliases", "default"}
STAGE_FIELDS = {"model", "kind", "onnx_file", "instruction"}
KINDS = {"flashrank", *STAGE2_KINDS}


def test_the_cascade_examples_parse_in_the_documented_shape() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 3  # English, multilingual, CPU-only
    names = []
    for block in blocks:
        for name, cascade in tomllib.loads(block)["cascades"].items():
            names.append(name)
            assert set(cascade) <= CASCADE_FIELDS and "stage1" in cascade, name
            for stage in ("stage1", "stage2"):
                value = cascade.get(stage)
                if isinstance(value, dict):
                    assert set(value) <= STAGE_FIELDS and "model" in value, name
                    assert value.get("kind", "flashrank") in KINDS, name
    assert {"english", "multilingual", "cpu-fast"} <= set(names)


def test_every_flashrank_model_and_onnx_file_is_named() -> None:
    text = DOC.read_text()
    for name in [*flashrank_pairwise_names(), "rank_zephyr_7b_v1_full"]:
        assert f"`{name}`" in text, name
    for stem in [ONNX_ARM64, *(stem for _, stem in ONNX_BY_CPU_FLAG)]:
        assert f"{stem}.onnx" in text, stem
