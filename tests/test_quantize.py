"""`reranker-server quantize`: a cross-encoder as an int8 ONNX export named for the CPU, its
parity against the fp32 model, batch-invariant scores, and one-line errors."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pytest

from reranker_server.cascade_file import parse_cascades
from reranker_server.cli import build_parser, main
from reranker_server.model_generator import TestModelPaths
from reranker_server.model_store import CpuFeatures, choose_onnx_file
from reranker_server.quantize import (
    REPORT_FILE,
    QuantizeResult,
    compare,
    int8_stem,
    parity_set,
    quantize,
)
from reranker_server.runners.flashrank import FlashRankRunner
from reranker_server.runners.onnx_cross_encoder import OnnxCrossEncoderRunner
from reranker_server.runners.registry import infer_kind
from reranker_server.settings import Settings

from .test_onnx_runner import PASSAGES, QUERY
from .test_startup import env_for
from .test_torch_free import torch_free, torch_free_env, torch_free_server, torch_free_site

__all__ = ["torch_free_site"]  # a fixture, used by name

ROOT = Path(__file__).resolve().parents[1]
PRESET = "[cascades.cpu-host]"


@pytest.fixture(scope="module")
def quantized(
    tiny_models: TestModelPaths, tmp_path_factory: pytest.TempPathFactory
) -> QuantizeResult:
    out = tmp_path_factory.mktemp("quantized") / "int8"
    return quantize(str(tiny_models.stage2), out, parity_queries=3)


def test_the_output_is_an_onnx_export_for_this_cpu(quantized: QuantizeResult) -> None:
    out = quantized.directory
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    stem = int8_stem(_this_cpu())
    assert quantized.int8_file == f"onnx/{stem}.onnx"
    assert {"onnx/model.onnx", quantized.int8_file} <= set(names)
    assert {"tokenizer.json", "config.json", "special_tokens_map.json"} <= set(names)
    assert not [n for n in names if n.endswith((".safetensors", ".bin"))]  # torch-free to serve
    assert infer_kind(str(out), names, 2) == "onnx-cross-encoder"
    assert choose_onnx_file(names) == quantized.int8_file  # what `auto` runs here
    assert not list(out.parent.glob(".int8-*"))  # the work directory was renamed into place


@pytest.mark.parametrize(
    ("arm64", "flags", "stem"),
    [
        (False, {"avx2", "avx512bw", "avx512_vnni"}, "model_qint8_avx512_vnni"),
        (False, {"avx2", "avx512bw"}, "model_qint8_avx512"),
        (False, {"avx2"}, "model_quint8_avx2"),
        (True, set(), "model_qint8_arm64"),
        (False, {"sse4_2"}, "model_int8"),
    ],
)
def test_the_int8_file_is_named_for_the_cpu_and_auto_takes_it(
    arm64: bool, flags: set[str], stem: str
) -> None:
    cpu = CpuFeatures(arm64=arm64, flags=frozenset(flags))
    assert int8_stem(cpu) == stem
    assert choose_onnx_file(["onnx/model.onnx", f"onnx/{stem}.onnx"], "auto", cpu) == (
        f"onnx/{stem}.onnx"
    )


def test_parity_is_measured_against_the_fp32_model(
    quantized: QuantizeResult, tiny_models: TestModelPaths
) -> None:
    from sentence_transformers import CrossEncoder

    by_file = {p.file: p for p in quantized.parity}
    assert list(by_file) == ["onnx/model.onnx", quantized.int8_file]
    assert by_file["onnx/model.onnx"].max_abs_diff <= 1e-5  # the export itself is exact
    assert by_file["onnx/model.onnx"].same_top10_order == 3
    # the int8 figure, recomputed from sentence-transformers' own scores
    reference = CrossEncoder(str(tiny_models.stage2), device="cpu")
    runner = OnnxCrossEncoderRunner(quantized.directory, onnx_file=quantized.int8_file)
    diffs = []
    for query, passages in parity_set(3):
        expected = reference.predict([(query, p) for p in passages], show_progress_bar=False)
        diffs.append(np.max(np.abs(np.subtract(runner.score(query, passages), expected))))
    assert by_file[quantized.int8_file].max_abs_diff == pytest.approx(
        max(diffs), abs=1e-5
    )  # float32 sigmoid
    report = json.loads((quantized.directory / REPORT_FILE).read_text())
    assert [p["file"] for p in report["parity"]] == list(by_file)


def test_compare_counts_top10_agreement() -> None:
    reference = [[float(i) for i in range(20)], [float(i) for i in range(20)]]
    swapped = [list(reference[0]), list(reference[1])]
    swapped[1][19], swapped[1][18] = 18.0, 19.0  # the top two change places
    dropped = [list(reference[0]), [*reference[1][:10], -1.0, *reference[1][11:]]]
    same = compare("x", reference, swapped)
    assert (same.same_top10_order, same.top10_overlap, same.max_abs_diff) == (1, 1.0, 1.0)
    assert compare("x", reference, dropped).top10_overlap == pytest.approx(0.95)
    assert compare("x", reference, reference).smallest_top10_gap == 1.0


def test_int8_scores_do_not_depend_on_batch_mates(quantized: QuantizeResult) -> None:
    runner = OnnxCrossEncoderRunner(quantized.directory, onnx_file=quantized.int8_file)
    assert runner.max_pairs == 1 and runner.precision == "int8"
    alone = [runner.score(QUERY, [p])[0] for p in PASSAGES]
    together = runner.score_pairs([("another query", "x"), *((QUERY, p) for p in PASSAGES)])[1:]
    assert together == alone  # exactly


def test_the_command_prints_parity_and_refuses_a_full_directory(
    quantized: QuantizeResult,
    tiny_models: TestModelPaths,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["quantize", str(tiny_models.stage2), str(quantized.directory)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty; fix:" in err[0]


def test_the_command_writes_and_reports(
    tiny_models: TestModelPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "int8"
    assert main(["quantize", str(tiny_models.stage2), str(out), "--parity-queries", "1"]) == 0
    printed = capsys.readouterr().out
    stem = int8_stem(_this_cpu())
    assert f"onnx/{stem}.onnx: same top-10 order " in printed
    assert "onnx/model.onnx: same top-10 order 1/1, top-10 in common 100%" in printed
    assert f"RERANKER_STAGE2_MODEL={out} reranker-server serve" in printed
    assert (out / "onnx" / f"{stem}.onnx").is_file()


@pytest.mark.parametrize("model", ["/nonexistent/model-dir", "not a hub id!"])
def test_a_model_that_cannot_be_loaded_is_one_line(
    model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["quantize", model, str(tmp_path / "out"), "--parity-queries", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "could not be loaded as a sentence-transformers cross-encoder" in err[0]
    )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out-*"))


def test_an_llm_reranker_with_a_chat_template_is_refused_in_one_line(
    model_matrix: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["quantize", str(model_matrix["qwen3-template"]), str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has a chat template" in err[0] and 'kind "cross-encoder"' in err[0]
    assert not out.exists() and not list(tmp_path.glob(".out-*"))


def _this_cpu() -> CpuFeatures:
    from reranker_server.model_store import cpu_features

    return cpu_features()


def test_quantize_without_torch_is_one_line(torch_free_site: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        torch_free(["-m", "reranker_server", "quantize", "some/model", str(tmp_path / "out")]),
        env=torch_free_env(torch_free_site),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "quantize needs torch" in lines[0]
    assert "reranker-server[torch]" in lines[0]


def test_the_output_is_served_as_stage_2_on_the_cpu_without_torch(
    torch_free_site: Path, tiny_models: TestModelPaths, quantized: QuantizeResult, tmp_path: Path
) -> None:
    """What the command prints (RERANKER_STAGE2_MODEL=OUT: no kind, no device setting), on a
    host without a GPU and without torch: stage 2 runs the int8 file on the CPU."""
    env = torch_free_env(
        torch_free_site,
        env_for(
            tiny_models,
            tmp_path,
            RERANKER_DEVICE="auto",
            RERANKER_STAGE2_MODEL=str(quantized.directory),
            RERANKER_CANDIDATES="3",
        ),
    )
    with torch_free_server(env) as (url, _):
        body = httpx.post(
            f"{url}/rerank",
            json={"query": QUERY, "documents": PASSAGES, "top_k": 3},
            timeout=30,
        ).json()
    first = FlashRankRunner(tiny_models.stage1, next(tiny_models.stage1.glob("*.onnx"))).score(
        QUERY, PASSAGES
    )
    kept = sorted(range(len(PASSAGES)), key=lambda i: -first[i])[:3]
    second = OnnxCrossEncoderRunner(quantized.directory).score(QUERY, [PASSAGES[i] for i in kept])
    assert [s["device"] for s in body["stages"]] == ["cpu", "cpu"]
    assert [r["index"] for r in body["results"]] == [
        kept[j] for j in sorted(range(3), key=lambda j: -second[j])
    ]
    assert [r["score"] for r in body["results"]] == pytest.approx(
        sorted(second, reverse=True), abs=1e-6
    )


def test_the_cpu_host_preset_in_the_docs_is_served_without_torch(
    torch_free_site: Path, tiny_models: TestModelPaths, quantized: QuantizeResult, tmp_path: Path
) -> None:
    """docs/cascades.md's CPU host cascade, loaded by the real parser, served (models swapped for
    generated ones) on a host without a GPU and without torch: FlashRank, then the int8 stage 2
    on the CPU over stage 1's best `candidates`."""
    text = (ROOT / "docs" / "cascades.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```toml\n(.*?)```", text, flags=re.S) if PRESET in b)
    command = next(
        line.strip()
        for line in text.splitlines()
        if line.strip().startswith("reranker-server quantize ")
    )
    tokens = shlex.split(command)
    args = build_parser().parse_args(tokens[1:])
    assert args.command == "quantize" and f'"{args.model}"' in block  # the model it quantizes
    (preset,) = parse_cascades(tomllib.loads(block), Settings(), "docs/cascades.md")
    assert preset.stage2 is not None  # the device is left to the kind's policy
    assert (preset.stage2.kind, preset.stage2.device) == ("onnx-cross-encoder", "auto")
    stage1_name = preset.stage1.model
    served = block.replace(f'"{stage1_name}"', f'"{tiny_models.stage1}"').replace(
        f'"{args.model}"', f'"{quantized.directory}"'
    )
    cascades = tmp_path / "cascades.toml"
    cascades.write_text(served, encoding="utf-8")
    env = torch_free_env(
        torch_free_site,
        env_for(tiny_models, tmp_path, RERANKER_DEVICE="auto", RERANKER_CASCADES=str(cascades)),
    )
    docs = [*PASSAGES, "the tower of paris", "a capital city in europe"]
    with torch_free_server(env) as (url, _):
        body = httpx.post(
            f"{url}/rerank", json={"query": QUERY, "documents": docs, "top_k": 3}, timeout=30
        ).json()
    stage1_file = next(tiny_models.stage1.glob("*.onnx"))
    graphs = (preset.stage1.onnx_graph, preset.stage2.onnx_graph)
    assert graphs == ("exact", "fast")  # FlashRank's own scores, then the fast int8 stage 2
    first = FlashRankRunner(tiny_models.stage1, stage1_file, graph=graphs[0]).score(QUERY, docs)
    kept = sorted(range(len(docs)), key=lambda i: -first[i])[: preset.candidates]
    second = OnnxCrossEncoderRunner(quantized.directory, graph=graphs[1]).score(
        QUERY, [docs[i] for i in kept]
    )
    assert [s["device"] for s in body["stages"]] == ["cpu", "cpu"]
    assert body["stages"][1]["documents"] == preset.candidates
    assert [r["index"] for r in body["results"]] == [
        kept[j] for j in sorted(range(len(kept)), key=lambda j: -second[j])
    ][:3]
