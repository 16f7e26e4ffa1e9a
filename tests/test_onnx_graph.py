"""The fast ONNX graph (`onnx_graph = "fast"`, runners/onnx_graph.py): the attention mask's
additions go only where they add exactly zero, every pair still runs alone, and the setting
reaches both ONNX runners from the environment and a cascades file."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from reranker_server.app import create_app
from reranker_server.engine.loader import cache_namespaces
from reranker_server.model_generator import TestModelPaths
from reranker_server.runners.flashrank import FlashRankRunner
from reranker_server.runners.onnx_base import quantizes_per_batch
from reranker_server.runners.onnx_cross_encoder import OnnxCrossEncoderRunner
from reranker_server.runners.onnx_graph import MASK, unmasked
from reranker_server.settings import Settings
from reranker_server.specs import StageSpec

from .conftest import running
from .test_onnx_runner import PASSAGES, QUERY


def _session(model: str | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def _feed(session: ort.InferenceSession, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {
        "input_ids": rng.integers(5, 100, size=(1, length)).astype(np.int64),
        MASK: np.ones((1, length), dtype=np.int64),
        "token_type_ids": (np.arange(length) >= length // 3).astype(np.int64)[None],
    }
    names = {i.name for i in session.get_inputs()}
    return {name: tensor for name, tensor in tensors.items() if name in names}


def test_without_the_mask_every_int8_layout_scores_bit_for_bit_alike(
    model_matrix: dict[str, Path], tiny_models: TestModelPaths
) -> None:
    """Every int8 file the generator writes (FlashRank's layouts, ONNX exports): the rewrite
    drops the mask input, and unpadded pairs of any length give exactly the same logits."""
    files = [tiny_models.stage1, *model_matrix.values()]
    int8 = sorted({f for d in files for f in d.rglob("*.onnx") if quantizes_per_batch(f)})
    rewritten = []
    for onnx_file in int8:
        data = unmasked(onnx_file)
        if data is None:
            continue
        rewritten.append(onnx_file)
        original, bare = _session(str(onnx_file)), _session(data)
        assert MASK not in {i.name for i in bare.get_inputs()}, onnx_file
        for seed, length in enumerate((3, 17, 60)):
            feed = _feed(original, length, seed)
            expected = original.run(None, feed)[0]
            got = bare.run(None, {k: v for k, v in feed.items() if k != MASK})[0]
            assert np.array_equal(expected, got), (onnx_file, length)
    assert any("flashrank" in str(f) for f in rewritten)
    assert any(f.parent.name == "onnx" for f in rewritten)  # an ONNX cross-encoder export


def _mask_graph(tmp_path: Path, bias: str) -> Path:
    """y = sum(float(input_ids) + bias(mask)), with the bias (1 - mask) * -1e4 (zero when
    unpadded, as transformers builds it) or mask * -1e4 (not zero)."""
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Cast", [MASK], ["m"], to=TensorProto.FLOAT),
    ]
    if bias == "zero when unpadded":
        nodes.append(helper.make_node("Sub", ["one", "m"], ["inverted"]))
        nodes.append(helper.make_node("Mul", ["inverted", "big"], ["bias"]))
    else:
        nodes.append(helper.make_node("Mul", ["m", "big"], ["bias"]))
    nodes += [
        helper.make_node("Add", ["x", "bias"], ["scores"]),
        helper.make_node("ReduceSum", ["scores"], ["y"], keepdims=1),
    ]
    ints = [
        helper.make_tensor_value_info(n, TensorProto.INT64, [1, "n"]) for n in ("input_ids", MASK)
    ]
    graph = helper.make_graph(
        nodes,
        "mask",
        ints,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
            helper.make_tensor("big", TensorProto.FLOAT, [], [-1e4]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "mask.onnx"
    onnx.save(model, str(path))
    return path


def test_a_mask_bias_that_is_not_zero_when_unpadded_is_kept(tmp_path: Path) -> None:
    kept = _mask_graph(tmp_path, "not zero")
    assert unmasked(kept) is None
    removed = unmasked(_mask_graph(tmp_path, "zero when unpadded"))
    assert removed is not None
    model = onnx.load_from_string(removed)
    assert [i.name for i in model.graph.input] == ["input_ids"]
    assert [n.op_type for n in model.graph.node] == ["Cast", "ReduceSum"]


def test_the_fast_graph_runs_each_pair_alone(tiny_models: TestModelPaths) -> None:
    onnx_file = next(tiny_models.stage1.glob("*.onnx"))
    exact = FlashRankRunner(tiny_models.stage1, onnx_file)
    fast = FlashRankRunner(tiny_models.stage1, onnx_file, graph="fast")
    assert fast.max_pairs == 1
    alone = [fast.score(QUERY, [p])[0] for p in PASSAGES]
    assert fast.score(QUERY, PASSAGES) == alone  # batch-invariant, exactly
    drift = max(abs(a - b) for a, b in zip(exact.score(QUERY, PASSAGES), alone, strict=True))
    # the fast graph's rounding differs (no fused skip + layer norm, tanh GELU); measured 0.017
    # on this tiny random model, ~1e-3 on full-size ones (docs/models.md)
    assert 0 < drift < 0.05


def test_the_settings_reach_both_onnx_stages_over_http(
    tiny_models: TestModelPaths, model_matrix: dict[str, Path], tmp_path: Path
) -> None:
    """RERANKER_STAGE1_ONNX_GRAPH / RERANKER_STAGE2_ONNX_GRAPH: the server answers with the fast
    runners' own order and scores."""
    export = model_matrix["onnx/bert"]
    settings = Settings(
        stage1_model=str(tiny_models.stage1),
        stage2_model=str(export),
        stage2_device="cpu",
        stage1_onnx_graph="fast",
        stage2_onnx_graph="fast",
        candidates=4,
        model_cache_dir=tmp_path / "cache",
        offline=True,
        cpu_threads=1,
    )
    stage1 = FlashRankRunner(
        tiny_models.stage1, next(tiny_models.stage1.glob("*.onnx")), graph="fast"
    )
    stage2 = OnnxCrossEncoderRunner(export, graph="fast")
    first = stage1.score(QUERY, PASSAGES)
    kept = sorted(range(len(PASSAGES)), key=lambda i: -first[i])[:4]
    second = stage2.score(QUERY, [PASSAGES[i] for i in kept])
    expected = sorted(zip(kept, second, strict=True), key=lambda pair: -pair[1])
    with running(create_app(settings)) as url:
        body = {"query": QUERY, "documents": PASSAGES, "top_k": 4}
        answer = httpx.post(f"{url}/rerank", json=body, timeout=60).json()
    assert [r["index"] for r in answer["results"]] == [i for i, _ in expected]
    assert [r["score"] for r in answer["results"]] == pytest.approx([s for _, s in expected])
    # stage 1 alone: its scores are the fast graph's, not the exact one's
    alone = settings.model_copy(update={"stage2_model": ""})
    exact = FlashRankRunner(tiny_models.stage1, next(tiny_models.stage1.glob("*.onnx")))
    assert exact.score(QUERY, PASSAGES) != first
    with running(create_app(alone)) as url:
        body = {"query": QUERY, "documents": PASSAGES, "top_k": len(PASSAGES)}
        answer = httpx.post(f"{url}/rerank", json=body, timeout=60).json()
    assert sorted((r["index"], r["score"]) for r in answer["results"]) == [
        (i, pytest.approx(score)) for i, score in enumerate(first)
    ]


def test_the_score_cache_keeps_the_graphs_apart(tiny_models: TestModelPaths) -> None:
    """A shared (Redis) cache must never answer the fast graph's scores for the exact graph."""
    runner = FlashRankRunner(tiny_models.stage1, next(tiny_models.stage1.glob("*.onnx")))
    exact = StageSpec(model=str(tiny_models.stage1))
    fast = exact.model_copy(update={"onnx_graph": "fast"})
    keys = [
        cache_namespaces({"stage1": runner}, {"stage1": spec})["stage1"] for spec in (exact, fast)
    ]
    assert keys[0] != keys[1]


def _save(tmp_path: Path, nodes: list[onnx.NodeProto], mask_type: int, outputs: list[str]) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "n"]),
            helper.make_tensor_value_info(MASK, mask_type, [1, "n"]),
        ],
        [
            helper.make_tensor_value_info(
                o, mask_type if o == "mask_out" else TensorProto.FLOAT, None
            )
            for o in outputs
        ],
        [
            helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
            helper.make_tensor("big", TensorProto.FLOAT, [], [-1e4]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    return path


BIAS = [
    helper.make_node("Cast", ["input_ids"], ["x"], to=TensorProto.FLOAT),
    helper.make_node("Cast", [MASK], ["m"], to=TensorProto.FLOAT),
    helper.make_node("Sub", ["one", "m"], ["inverted"]),
    helper.make_node("Mul", ["inverted", "big"], ["bias"]),
]


@pytest.mark.parametrize("case", ["int32 mask", "two additions in a row", "mask is an output"])
def test_graphs_the_rewrite_does_not_expect_still_load(tmp_path: Path, case: str) -> None:
    """A mask in another type, additions in a row, or the mask read as an output: the rewrite is
    exact or the mask is kept, and the result always loads and scores as the file does."""
    nodes = list(BIAS)
    outputs = ["y"]
    mask_type = TensorProto.INT32 if case == "int32 mask" else TensorProto.INT64
    if case == "two additions in a row":
        nodes += [
            helper.make_node("Add", ["x", "bias"], ["s1"]),
            helper.make_node("Add", ["s1", "bias"], ["s2"]),
            helper.make_node("ReduceSum", ["s2"], ["y"], keepdims=1),
        ]
    else:
        nodes += [
            helper.make_node("Add", ["x", "bias"], ["s1"]),
            helper.make_node("ReduceSum", ["s1"], ["y"], keepdims=1),
        ]
    if case == "mask is an output":
        nodes.append(helper.make_node("Identity", [MASK], ["mask_out"]))
        outputs.append("mask_out")
    path = _save(tmp_path, nodes, mask_type, outputs)
    data = unmasked(path)
    original = _session(str(path))
    feed = {
        "input_ids": np.arange(5, dtype=np.int64)[None],
        MASK: np.ones((1, 5), dtype=np.int32 if case == "int32 mask" else np.int64),
    }
    expected = original.run(None, feed)
    if data is None:
        assert case == "mask is an output"
        return
    bare = _session(data)
    names = {i.name for i in bare.get_inputs()}
    got = bare.run(None, {k: v for k, v in feed.items() if k in names})
    assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))
