"""The coverage matrix: every supported architecture and layout loads and scores as its reference
library does, within 1e-5 (models from model_generator.write_matrix, built once per session).

- stage 2 through sentence-transformers (kind `cross-encoder`): `CrossEncoder.predict` raw logits,
  then sigmoid (one logit) or softmax (two labels);
- stage 1 (FlashRank layouts): `flashrank.Ranker` scoring each passage alone;
- ONNX exports (kind `onnx-cross-encoder`): fp32 against `CrossEncoder.predict` on the model they
  were exported from, int8 against ONNX Runtime run directly on transformers' tokenization.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from flashrank import Ranker, RerankRequest
from sentence_transformers import CrossEncoder
from transformers import AutoTokenizer

from reranker_server.errors import ModelLoadError
from reranker_server.model_generator import (
    CHATML_TEMPLATE,
    ONNX_FAMILIES,
    STAGE2_FAMILIES,
    flashrank_pairwise_names,
    write_family,
)
from reranker_server.model_store import resolve_stage1
from reranker_server.runners.cross_encoder import CrossEncoderRunner
from reranker_server.runners.flashrank import FlashRankRunner
from reranker_server.runners.onnx_cross_encoder import OnnxCrossEncoderRunner

QUERY = "what is the capital of france"
PASSAGES = [
    "paris is the capital of france",
    "berlin is the capital of germany",
    "the eiffel tower is a famous tower in paris",
    "music and art and film",
    "a dog and a cat are animals",
    "the river in the city " * 20,
    "",
]
PAIRS = [(QUERY, p) for p in PASSAGES]


def activation(logits: np.ndarray) -> list[float]:
    """sigmoid of one logit, else softmax's second label (float64)."""
    logits = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
    if logits.shape[1] == 1:
        return (1 / (1 + np.exp(-logits[:, 0]))).tolist()
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (exp[:, 1] / exp.sum(axis=1)).tolist()


def reference_cross_encoder(directory: Path, prompt: str | None = None) -> list[float]:
    model = CrossEncoder(str(directory), device="cpu")
    logits = model.predict(PAIRS, prompt=prompt, activation_fn=lambda x: x, show_progress_bar=False)
    return activation(logits)


def spread(scores: list[float]) -> bool:
    return len(set(np.round(scores, 4))) > 3


@pytest.mark.parametrize("family", STAGE2_FAMILIES)
def test_stage2_family_equals_cross_encoder_predict(
    model_matrix: dict[str, Path], family: str
) -> None:
    expected = reference_cross_encoder(model_matrix[family])

    ours = CrossEncoderRunner(str(model_matrix[family]), batch_size=3).score(QUERY, PASSAGES)

    assert ours == pytest.approx(expected, abs=1e-5)
    assert spread(ours), "the generated model should spread scores"


def test_the_chat_template_is_what_scores_qwen3(model_matrix: dict[str, Path]) -> None:
    """Same weights and tokenizer; only chat_template.jinja differs, and it changes the scores
    (the download filter that dropped it changed scores silently)."""
    plain = CrossEncoderRunner(str(model_matrix["qwen3"])).score(QUERY, PASSAGES)
    templated = CrossEncoderRunner(str(model_matrix["qwen3-template"])).score(QUERY, PASSAGES)
    assert max(abs(a - b) for a, b in zip(plain, templated, strict=True)) > 1e-2


def test_an_instruction_reaches_the_template(model_matrix: dict[str, Path]) -> None:
    instruction = "Given a product search query, retrieve product descriptions that match it"
    directory = model_matrix["qwen3-template"]
    expected = reference_cross_encoder(directory, prompt=instruction)

    ours = CrossEncoderRunner(str(directory), instruction=instruction).score(QUERY, PASSAGES)

    assert ours == pytest.approx(expected, abs=1e-5)
    default = CrossEncoderRunner(str(directory)).score(QUERY, PASSAGES)
    assert max(abs(a - b) for a, b in zip(ours, default, strict=True)) > 1e-3


def test_a_template_that_cannot_carry_a_pair_is_one_line_at_load(tmp_path: Path) -> None:
    directory = write_family(tmp_path / "chatml", "qwen3", template=CHATML_TEMPLATE)
    with pytest.raises(ModelLoadError) as info:
        CrossEncoderRunner(str(directory), name="org/chatml-reranker")
    message = str(info.value)
    assert "\n" not in message
    assert "org/chatml-reranker" in message and "cannot carry" in message
    assert "fix:" in message and "chat_template.jinja" in message


@pytest.mark.parametrize("name", flashrank_pairwise_names())
def test_flashrank_layout_equals_flashrank_alone(model_matrix: dict[str, Path], name: str) -> None:
    files = resolve_stage1(
        str(model_matrix[f"flashrank/{name}"]), Path("unused"), offline=True, timeout_s=1
    )
    ranker = Ranker(model_name=name, cache_dir=str(files.directory.parent))
    expected = [
        float(ranker.rerank(RerankRequest(query=QUERY, passages=[{"text": t}]))[0]["score"])
        for t in PASSAGES
    ]

    ours = FlashRankRunner(files.directory, files.onnx_file).score(QUERY, PASSAGES)

    assert ours == pytest.approx(expected, abs=1e-5)
    assert spread(ours)


@pytest.mark.parametrize("family", ONNX_FAMILIES)
def test_onnx_fp32_equals_cross_encoder_predict(model_matrix: dict[str, Path], family: str) -> None:
    expected = reference_cross_encoder(model_matrix[family])

    runner = OnnxCrossEncoderRunner(model_matrix[f"onnx/{family}"], onnx_file="fp32")

    assert runner.onnx_file.name == "model.onnx" and runner.precision == "fp32"
    assert runner.score(QUERY, PASSAGES) == pytest.approx(expected, abs=1e-5)
    assert runner.max_pairs > 1  # fp32 scores do not depend on the batch: pairs share calls


@pytest.mark.parametrize("family", ONNX_FAMILIES)
@pytest.mark.parametrize("onnx_file", ["model_qint8_avx512_vnni.onnx", "model_quint8_avx2.onnx"])
def test_onnx_int8_equals_onnx_runtime_alone(
    model_matrix: dict[str, Path], family: str, onnx_file: str
) -> None:
    directory = model_matrix[f"onnx/{family}"]
    session = ort.InferenceSession(str(directory / "onnx" / onnx_file))
    names = {i.name for i in session.get_inputs()}
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    expected = []
    for query, passage in PAIRS:  # each pair alone (the file quantizes per batch); as lists,
        # as sentence-transformers calls the tokenizer (a lone "" pair would lose its [SEP])
        encoded = tokenizer(
            [query], [passage], truncation=True, max_length=512, return_tensors="np"
        )
        feed = {k: np.asarray(v, dtype=np.int64) for k, v in encoded.items() if k in names}
        expected += activation(session.run(None, feed)[0])

    runner = OnnxCrossEncoderRunner(directory, onnx_file=onnx_file)

    assert runner.precision == "int8" and runner.max_pairs == 1
    ours = runner.score(QUERY, PASSAGES)
    assert ours == pytest.approx(expected, abs=1e-5)
    assert spread(ours)
