"""The onnx-cross-encoder runner: batch-invariant scores, the scheduler's steps, and one-line
errors (parity with the reference libraries is in test_model_matrix.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reranker_server.errors import ModelLoadError
from reranker_server.model_generator import QWEN3_RERANKER_TEMPLATE
from reranker_server.model_store import CpuFeatures, choose_onnx_file
from reranker_server.runners.onnx_cross_encoder import OnnxCrossEncoderRunner

QUERY = "what is the capital of france"
PASSAGES = [
    "paris is the capital of france",
    "berlin is the capital of germany",
    "music and art and film " * 30,
    "a dog",
    "",
]


@pytest.mark.parametrize("onnx_file", ["auto", "fp32"])
def test_a_score_does_not_depend_on_its_batch_mates(
    model_matrix: dict[str, Path], onnx_file: str
) -> None:
    runner = OnnxCrossEncoderRunner(model_matrix["onnx/bert"], onnx_file=onnx_file)
    alone = [runner.score(QUERY, [p])[0] for p in PASSAGES]
    together = runner.score(QUERY, PASSAGES)
    mixed = runner.score_pairs([("another query", "x"), *((QUERY, p) for p in PASSAGES)])[1:]
    # int8: each pair runs alone, scores equal exactly; fp32: padding moves them by rounding only
    tolerance = 0.0 if runner.max_pairs == 1 else 1e-5
    assert together == pytest.approx(alone, abs=tolerance)
    assert mixed == pytest.approx(alone, abs=tolerance)


def test_auto_takes_the_int8_file_for_this_cpu(model_matrix: dict[str, Path]) -> None:
    export = model_matrix["onnx/bert"]
    names = [str(p.relative_to(export)) for p in export.rglob("*.onnx")]
    runner = OnnxCrossEncoderRunner(export)
    assert runner.onnx_file == export / str(choose_onnx_file(names))
    old_cpu = CpuFeatures(arm64=False, flags=frozenset({"sse4_2"}))
    fp32 = OnnxCrossEncoderRunner(export, cpu=old_cpu)  # no file quantized for it: fp32
    assert fp32.onnx_file.name == "model.onnx" and fp32.precision == "fp32"


def test_prepare_and_run_are_the_scheduler_steps(model_matrix: dict[str, Path]) -> None:
    runner = OnnxCrossEncoderRunner(model_matrix["onnx/bert-2-label"], onnx_file="fp32")
    items = runner.prepare([(QUERY, p) for p in PASSAGES])
    assert [runner.length(i) for i in items] == [len(i.ids) for i in items]
    assert max(runner.length(i) for i in items) <= runner.max_length
    assert runner.run(items) == pytest.approx(runner.score(QUERY, PASSAGES), abs=1e-6)
    assert runner.stats()["pairs"] >= 2 * len(PASSAGES)
    assert runner.device == "cpu" and runner.name == "bert-2-label"


def test_a_model_with_a_chat_template_is_refused_in_one_line(
    model_matrix: dict[str, Path], tmp_path: Path
) -> None:
    export = tmp_path / "llm-reranker-onnx"
    shutil.copytree(model_matrix["onnx/bert"], export)
    (export / "chat_template.jinja").write_text(QWEN3_RERANKER_TEMPLATE)
    with pytest.raises(ModelLoadError) as info:
        OnnxCrossEncoderRunner(export)
    message = str(info.value)
    assert "\n" not in message and "chat template" in message
    assert 'kind to "cross-encoder" (RERANKER_STAGE2_KIND; a cascades file: stage2.kind)' in message


def test_a_directory_without_onnx_files_names_what_it_holds(
    model_matrix: dict[str, Path],
) -> None:
    with pytest.raises(ModelLoadError) as info:
        OnnxCrossEncoderRunner(model_matrix["xlm-roberta"])
    message = str(info.value)
    assert "\n" not in message and "model.safetensors" in message and "fix:" in message
