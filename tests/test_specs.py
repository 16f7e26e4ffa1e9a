"""One configuration model (specs.py): the TOML shapes, per-cascade stage fields, kinds inferred and
checked before anything loads (preflight.py), `reranker-server check`, what `fallback` says, the
port checked before the models load, unknown variables named. Hosts here have no GPU (`detect`
returns None), as the done-when checks ask."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reranker_server.cascade_file import parse_cascades, read_cascades
from reranker_server.cli import main
from reranker_server.engine.cascades import Cascades
from reranker_server.engine.loader import load_cascades
from reranker_server.errors import ModelLoadError
from reranker_server.model_generator import TestModelPaths, write_onnx_export
from reranker_server.runners.keyword import KeywordRunner
from reranker_server.settings import Settings, load_settings, unknown_variables
from reranker_server.specs import StageSpec, default_cascade
from reranker_server.types import RerankJob

from .conftest import running

NO_GPU = {"offline": True, "device": "cpu", "cpu_threads": 1, "warmup": False}
LONG = " ".join(["paris is the capital and most populous city of france"] * 40)


@pytest.fixture(scope="module")
def onnx_only(tiny_models: TestModelPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny stage-2 model as a hub ONNX export: onnx/*.onnx and tokenizer.json, no weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_onnx_export(tiny_models.stage2, tmp_path_factory.mktemp("onnx") / "export")


def cascades_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cascades.toml"
    path.write_text(text, encoding="utf-8")
    return path


def no_gpu(_device: str, _limit: float) -> None:
    return None


# --- the one TOML shape: a model name, or a table of StageSpec fields (inline or nested)


def test_inline_and_nested_stage_tables_and_a_plain_name_parse_alike() -> None:
    inline = tomllib.loads(
        '[cascades.a]\nstage1 = "s1"\n'
        'stage2 = { model = "org/m", kind = "onnx-cross-encoder", onnx_file = "fp32", '
        'max_length = 128, instruction = "find it" }\n'
    )
    nested = tomllib.loads(
        '[cascades.a]\nstage1 = { model = "s1" }\n\n[cascades.a.stage2]\nmodel = "org/m"\n'
        'kind = "onnx-cross-encoder"\nonnx_file = "fp32"\nmax_length = 128\n'
        'instruction = "find it"\n'
    )
    (one,) = parse_cascades(inline, Settings(), "f")
    (two,) = parse_cascades(nested, Settings(), "f")
    assert one == two
    assert one.stage1 == StageSpec(model="s1")  # a plain name: the model, the rest defaults
    assert one.stage2 is not None
    assert (one.stage2.kind, one.stage2.onnx_file, one.stage2.max_length) == (
        "onnx-cross-encoder",
        "fp32",
        128,
    )
    assert one.stage2.instruction == "find it"


def test_a_stage_table_inherits_the_settings_but_not_model_or_kind() -> None:
    settings = Settings(max_length=256, stage2_batch_size=8, stage2_kind="cross-encoder")
    (cascade,) = parse_cascades(
        tomllib.loads('[cascades.a]\nstage1 = "s1"\nstage2 = { model = "org/m" }\n'),
        settings,
        "f",
    )
    assert cascade.stage2 is not None
    assert (cascade.stage2.max_length, cascade.stage2.batch_size) == (256, 8)
    assert cascade.stage2.kind is None  # inferred from the files, not RERANKER_STAGE2_KIND


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('stage2 = { model = "m", kindd = "x" }', "[cascades.a] stage2.kindd: unknown field"),
        ('stage2 = { model = "m", device = "gpu" }', "[cascades.a] stage2.device: must be auto"),
        ("stage2 = 5", "[cascades.a] stage2: must be a model name or a table"),
        ('onnx_file = "fp32"', "[cascades.a] onnx_file: unknown field (a stage's field"),
        ('stage2 = { model = "m", onnx_graph = "turbo" }', "[cascades.a] stage2.onnx_graph:"),
    ],
)
def test_a_bad_stage_field_is_one_line_naming_it(table: str, expected: str) -> None:
    text = f'[cascades.a]\nstage1 = "s1"\n{table}\n'
    with pytest.raises(ModelLoadError) as info:
        parse_cascades(tomllib.loads(text), Settings(), "F")
    assert "\n" not in str(info.value) and expected in str(info.value)


def test_the_environment_builds_the_default_cascade_with_every_stage_variable() -> None:
    settings = Settings(
        stage2_model="org/m",
        stage2_kind="onnx-cross-encoder",
        stage2_onnx_file="model_int8.onnx",
        stage2_device="cpu",
        stage2_instruction="x",
        stage2_on_cpu=True,
        max_length=64,
        stage1_onnx_graph="fast",
        stage2_onnx_graph="fast",
    )
    cascade = default_cascade(settings)
    assert cascade.stage1.onnx_graph == "fast"
    assert cascade.stage2 is not None
    assert cascade.stage2.model_dump(
        include={
            "kind",
            "onnx_file",
            "onnx_graph",
            "device",
            "instruction",
            "cpu_fallback",
            "max_length",
        }
    ) == {
        "kind": "onnx-cross-encoder",
        "onnx_file": "model_int8.onnx",
        "onnx_graph": "fast",
        "device": "cpu",
        "instruction": "x",
        "cpu_fallback": True,
        "max_length": 64,
    }


# --- checked before it runs, on a host without a GPU: startup and `check` stop in one line


@pytest.mark.parametrize(
    ("stage2", "expected"),
    [
        (
            '{{ model = "{stage2}", kind = "onnx-crossencoder" }}',
            "[cascades.a] stage2.kind: unknown runner kind 'onnx-crossencoder'; fix: did you "
            "mean 'onnx-cross-encoder'?",
        ),
        (
            '"./models/nope"',
            "[cascades.a] stage2.model './models/nope' is neither a directory nor a hub id",
        ),
        ('"org/bad..name"', "[cascades.a] stage2.model 'org/bad..name' is neither a directory"),
    ],
)
def test_a_mistake_stops_startup_and_check_on_a_host_without_a_gpu(
    tiny_models: TestModelPaths,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    stage2: str,
    expected: str,
) -> None:
    path = cascades_file(
        tmp_path,
        f'[cascades.a]\nstage1 = "{tiny_models.stage1}"\n'
        f"stage2 = {stage2.format(stage2=tiny_models.stage2)}\n",
    )
    settings = Settings(cascades=path, **NO_GPU)
    with pytest.raises(ModelLoadError) as info:
        load_cascades(settings, detect=no_gpu)  # stage 2 would not even run here
    assert "\n" not in str(info.value) and expected in str(info.value)
    assert main(["check", "--cascades", str(path), "--offline", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]


def test_the_environment_s_mistakes_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RERANKER_STAGE2_KIND", "onnx-crossencoder")
    assert main(["check", "--offline", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(
        "reranker-server: RERANKER_STAGE2_KIND: unknown runner kind 'onnx-crossencoder'"
    )


def test_check_prints_what_runs_where(
    tiny_models: TestModelPaths,
    onnx_only: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = cascades_file(
        tmp_path,
        f'[cascades.gpu]\nstage1 = "{tiny_models.stage1}"\nstage2 = "{tiny_models.stage2}"\n\n'
        f'[cascades.cpu]\nstage1 = "{tiny_models.stage1}"\nstage2 = "{onnx_only}"\n\n'
        '[cascades.zero]\nstage1 = "bm25"\n',
    )
    assert main(["check", "--cascades", str(path), "--offline", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"cascade gpu: stage 1 flashrank {tiny_models.stage1} on cpu; stage 2 cross-encoder "
        f'{tiny_models.stage2}: not on this host (no GPU); [cascades.gpu] stage2.device = "cpu" '
        "runs it here"
    )
    assert out[1].endswith(f"stage 2 onnx-cross-encoder {onnx_only} on cpu (a CPU-only kind)")
    assert out[2] == "cascade zero: stage 1 keyword bm25 on cpu; no stage 2"
    assert out[3] == "reranker-server check: settings and 3 cascade(s) OK"


# --- unknown variables


def test_an_unknown_reranker_variable_warns_with_the_closest_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RERANKER_CANDIATES", "20")
    monkeypatch.setenv("RERANKER_PROT", "5300")
    _, notes = load_settings()
    assert [n for n in notes if "CANDIATES" in n] == [
        "RERANKER_CANDIATES is not a setting (ignored); did you mean RERANKER_CANDIDATES?"
    ]
    assert unknown_variables({"RERANKER_PROT": "1"}) == [
        "RERANKER_PROT is not a setting (ignored); did you mean RERANKER_PORT?"
    ]
    assert unknown_variables({"RERANKER_PORT": "1", "OTHER": "x"}) == []


# --- the port: checked before any model loads


def test_a_port_in_use_stops_serve_before_the_models_load(tiny_models: TestModelPaths) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RERANKER_")}
        env.update(
            RERANKER_HOST="127.0.0.1",
            RERANKER_PORT=str(port),
            RERANKER_STAGE1_MODEL=str(tiny_models.stage1),
            RERANKER_STAGE2_MODEL=str(tiny_models.stage2),
            RERANKER_OFFLINE="true",
        )
        done = subprocess.run(
            [sys.executable, "-m", "reranker_server", "serve"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"reranker-server: port {port} on 127.0.0.1 is in use or can't be bound (Address already "
        "in use); fix: stop what holds it, or choose another port with --port or RERANKER_PORT"
    ]
    assert done.stdout == ""  # no log line: nothing was loaded


# --- two cascades, two specs: each gets its own


def test_two_cascades_with_different_max_length_truncate_differently(
    tiny_models: TestModelPaths, tmp_path: Path
) -> None:
    stage1 = tiny_models.stage1
    path = cascades_file(
        tmp_path,
        f'[cascades.short]\nstage1 = {{ model = "{stage1}", max_length = 32 }}\n\n'
        f'[cascades.long]\nstage1 = {{ model = "{stage1}", max_length = 256 }}\n\n'
        f'[cascades.same]\nstage1 = {{ model = "{stage1}", max_length = 256 }}\n',
    )
    cascades = load_cascades(Settings(cascades=path, **NO_GPU), detect=no_gpu)
    try:
        job = RerankJob("capital of france", [LONG, "paris"], top_k=2)
        short = cascades.pick("short").engine
        long = cascades.pick("long").engine
        assert (short.stage1.max_length, long.stage1.max_length) == (32, 256)
        assert cascades.pick("same").engine.stage1 is long.stage1  # one spec: loaded once
        tokens = {
            name: cascades.pick(name).engine.rerank(job).pair_tokens for name in ("short", "long")
        }
        assert tokens["short"] < tokens["long"]
        assert tokens["short"] <= 2 * 32 and tokens["long"] > 64  # each cut at its own length
    finally:
        cascades.close()


def test_two_cascades_with_different_instructions_have_their_own_cache_keys(
    tiny_models: TestModelPaths, tmp_path: Path
) -> None:
    stage2 = tiny_models.stage2
    path = cascades_file(
        tmp_path,
        f'[cascades.a]\nstage1 = "{tiny_models.stage1}"\n'
        f'stage2 = {{ model = "{stage2}", device = "cpu", instruction = "find products" }}\n\n'
        f'[cascades.b]\nstage1 = "{tiny_models.stage1}"\n'
        f'stage2 = {{ model = "{stage2}", device = "cpu", instruction = "find answers" }}\n',
    )
    cascades = load_cascades(Settings(cascades=path, **NO_GPU), detect=no_gpu)
    try:
        a, b = cascades.pick("a").engine, cascades.pick("b").engine
        assert a.stage2_cpu is not None and b.stage2_cpu is not None
        assert a.stage2_cpu is not b.stage2_cpu  # two specs: two runners
        assert a._namespaces["stage2_cpu"] != b._namespaces["stage2_cpu"]
    finally:
        cascades.close()


# --- say what ran: a cascade on the CPU by configuration is no fallback


def test_an_onnx_only_directory_without_a_kind_serves_as_stage_2_on_the_cpu(
    tiny_models: TestModelPaths, onnx_only: Path, tmp_path: Path
) -> None:
    settings = Settings(stage1_model=str(tiny_models.stage1), stage2_model=str(onnx_only), **NO_GPU)
    cascades = load_cascades(settings, detect=no_gpu)
    try:
        out = cascades.default.engine.rerank(RerankJob("capital", ["paris", "berlin"], top_k=2))
    finally:
        cascades.close()
    assert (out.backend, out.fallback) == ("cpu", None)  # ran in full, as configured
    assert [s.device for s in out.stages] == ["cpu", "cpu"]
    assert out.stages[1].name == onnx_only.name


def test_a_cpu_cascade_answers_fallback_null_and_stage_1_alone_no_gpu(
    tiny_models: TestModelPaths, tmp_path: Path
) -> None:
    path = cascades_file(
        tmp_path,
        f'[cascades.cpu]\nstage1 = "{tiny_models.stage1}"\n'
        f'stage2 = {{ model = "{tiny_models.stage2}", device = "cpu" }}\n\n'
        f'[cascades.seed]\nstage1 = "{tiny_models.stage1}"\nstage2 = "{tiny_models.stage2}"\n\n'
        f'[cascades.alone]\nstage1 = "{tiny_models.stage1}"\n',
    )
    cascades = load_cascades(Settings(cascades=path, **NO_GPU), detect=no_gpu)
    answers: dict[str, Any] = {}
    try:
        for name in ("cpu", "seed", "alone"):
            job = RerankJob("capital", ["paris", "berlin", "rome"], top_k=2)
            answers[name] = cascades.pick(name).engine.rerank(job)
    finally:
        cascades.close()
    assert (answers["cpu"].fallback, len(answers["cpu"].stages)) == (None, 2)
    assert (answers["seed"].fallback, len(answers["seed"].stages)) == ("no_gpu", 1)
    assert (answers["alone"].fallback, len(answers["alone"].stages)) == (None, 1)
    assert {a.backend for a in answers.values()} == {"cpu"}


# --- the keyword kind: no model files, a zero-model baseline


def test_the_keyword_kind_serves_a_cascade_without_model_files(tmp_path: Path) -> None:
    path = cascades_file(tmp_path, '[cascades.baseline]\nstage1 = "bm25"\n')
    from reranker_server.app import create_app

    settings = Settings(cascades=path, **NO_GPU)
    documents = ["bananas are yellow", "the capital of france is paris", "france"]
    with running(create_app(settings)) as url:
        answer = httpx.post(
            f"{url}/rerank", json={"query": "capital of France", "documents": documents}
        ).json()
    assert [r["index"] for r in answer["results"]] == [1, 2, 0]
    assert answer["results"][2]["score"] == 0.0 and answer["fallback"] is None


def test_keyword_scores_are_alone_and_truncated_to_max_length() -> None:
    runner = KeywordRunner(max_length=4)
    far = "a b c d e f paris"
    items = runner.prepare([("paris", far), ("paris", "paris")])
    assert runner.run(items) == [0.0, runner.run(runner.prepare([("paris", "paris")]))[0]]
    assert runner.run(items[1:]) == runner.run(items)[1:]  # no batch-mate changes a score


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Cascades]:
    cascades = load_cascades(
        Settings(cascades=cascades_file(tmp_path, '[cascades.k]\nstage1 = "keyword"\n'), **NO_GPU)
    )
    yield cascades
    cascades.close()


def test_read_cascades_gives_specs(served: Cascades, tmp_path: Path) -> None:
    assert served.default.name == "k"
    (spec,) = read_cascades(Settings(cascades=tmp_path / "cascades.toml"))
    assert spec.stage1.model == "keyword" and spec.stage1.kind is None


# --- architecture.md's rule: kinds are named in runners/registry.py (and their own modules) only


def test_no_module_outside_the_runners_branches_on_a_kind_name() -> None:
    import ast

    from reranker_server.runners.registry import RUNNER_KINDS

    package = Path(__file__).resolve().parents[1] / "reranker_server"
    found = []
    for path in package.rglob("*.py"):
        if path.parent.name == "runners":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                parts = [node.left, *node.comparators]
                for part in parts:
                    elements = (
                        part.elts if isinstance(part, (ast.Tuple, ast.List, ast.Set)) else [part]
                    )
                    for element in elements:
                        if isinstance(element, ast.Constant) and element.value in RUNNER_KINDS:
                            found.append(f"{path.name}:{node.lineno}")
    assert found == []
