"""Named cascades (`RERANKER_CASCADES`): a request's `model` picks the cascade in every dialect, a
model two cascades use is loaded once, /health, /metrics and /v1/models report each cascade, every
mistake in the file is one line, and without the file nothing changes.

Stage 1 is the generated tiny FlashRank model (shared by every cascade); stage 2 is a cheap kind
added through the runner registry whose order is known: `longest` ranks longer documents first,
`shortest` shorter ones first, so each answer shows which cascade served it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import tomllib
from collections import Counter
from collections.abc import Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from reranker_server.app import RerankerApp, create_app
from reranker_server.cascade_file import DEFAULT_NAME, parse_cascades, read_cascades
from reranker_server.engine.loader import load_cascades
from reranker_server.errors import ModelLoadError
from reranker_server.model_generator import TestModelPaths
from reranker_server.model_store import ModelStore
from reranker_server.runners import flashrank, registry
from reranker_server.runners.base import Pair, PairwiseRunner, Runner
from reranker_server.runners.kind import LoadTarget, modelless_kind
from reranker_server.settings import Settings
from reranker_server.specs import StageSpec

from .conftest import running
from .keyword_server import keyword_app

ROOT = Path(__file__).resolve().parent.parent
QUERY = "which document is the right length"
DOCS = [
    "a medium length document here",  # 29 characters
    "short",  # 5
    "the longest document of them all, by quite a margin",  # 51
    "tiny one",  # 8
    "a somewhat longer document",  # 26
]
LONGEST_FIRST = sorted(range(len(DOCS)), key=lambda i: -len(DOCS[i]))
SHORTEST_FIRST = sorted(range(len(DOCS)), key=lambda i: len(DOCS[i]))

LOADS: Counter[tuple[str, str]] = Counter()  # (kind, model) -> loads


class ByLength(PairwiseRunner):
    """Stage 2 of known order: model `longest` scores longer documents higher, `shortest`
    shorter ones."""

    def __init__(self, model: str) -> None:
        self.name = f"by-length:{model}"
        self.max_pairs = 8
        self.longest = model == "longest"

    def score_pairs(self, pairs: Sequence[Pair]) -> list[float]:
        return [expected_score(self.longest, document) for _, document in pairs]


def expected_score(longest: bool, document: str) -> float:
    return len(document) / 100 if longest else 1 / (1 + len(document))


def load_by_length(spec: StageSpec, _target: LoadTarget) -> Runner:
    LOADS["by-length", spec.model] += 1
    return ByLength(spec.model)


def load_counted_flashrank(spec: StageSpec, store: ModelStore, target: LoadTarget) -> Runner:
    LOADS["counted-flashrank", spec.model] += 1
    return flashrank.KIND.load(spec, store, target)


BY_LENGTH = modelless_kind("by-length", load_by_length, stage1=False)
COUNTED_FLASHRANK = dataclasses.replace(
    flashrank.KIND, name="counted-flashrank", load=load_counted_flashrank
)


def cascades_toml(stage1: Path, **extra: str) -> str:
    """Three cascades over one stage-1 model: `longest`, `shortest` (the default), and stage 1
    alone."""
    common = f'stage1 = "{stage1}"\nstage1_kind = "counted-flashrank"\n'
    common += 'stage2_kind = "by-length"\nstage2_on_cpu = true\ncandidates = 5\n'
    return (
        f'[cascades.longest]\n{common}stage2 = "longest"\naliases = ["rerank-v3.5"]\n\n'
        f'[cascades.shortest]\n{common}stage2 = "shortest"\ndefault = true\n'
        'aliases = ["rerank-english-v3.0", "bge-reranker"]\n\n'
        f'[cascades.stage1-only]\nstage1 = "{stage1}"\nstage1_kind = "counted-flashrank"\n'
    )


def cascade_settings(models: TestModelPaths, directory: Path, **overrides: Any) -> Settings:
    path = directory / "cascades.toml"
    path.write_text(cascades_toml(models.stage1), encoding="utf-8")
    values: dict[str, Any] = {
        "cascades": path,
        "stage1_model": "not-used-with-a-cascades-file",
        "stage2_model": "not-used-either",
        "model_cache_dir": directory / "cache",
        "offline": True,
        "device": "cpu",
        "cpu_threads": 1,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def kinds() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry.RUNNER_KINDS, "by-length", BY_LENGTH)
        patch.setitem(registry.RUNNER_KINDS, "counted-flashrank", COUNTED_FLASHRANK)
        yield


@pytest.fixture(scope="module")
def app(
    kinds: None, tiny_models: TestModelPaths, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RerankerApp, str, dict[tuple[str, str], int]]]:
    """The three cascades served, and the loads their startup made."""
    LOADS.clear()
    application = create_app(cascade_settings(tiny_models, tmp_path_factory.mktemp("cascades")))
    with running(application) as url:
        yield application, url, dict(LOADS)


@pytest.fixture(scope="module")
def server(app: tuple[RerankerApp, str, dict[tuple[str, str], int]]) -> str:
    return app[1]


def post(server: str, route: str, body: dict[str, Any]) -> Any:
    response = httpx.post(f"{server}{route}", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def order(results: list[dict[str, Any]]) -> list[int]:
    return [r["index"] for r in results]


# --- routing by `model`, every dialect

PICKS = [  # (model sent, the order expected, the model the answer names)
    ("longest", LONGEST_FIRST, "by-length:longest"),
    ("rerank-v3.5", LONGEST_FIRST, "by-length:longest"),  # an alias
    ("by-length:longest", LONGEST_FIRST, "by-length:longest"),  # a model the cascade serves
    ("shortest", SHORTEST_FIRST, "by-length:shortest"),
    ("bge-reranker", SHORTEST_FIRST, "by-length:shortest"),
    ("no-such-model", SHORTEST_FIRST, "by-length:shortest"),  # unknown: the default cascade
    (None, SHORTEST_FIRST, "by-length:shortest"),
]


@pytest.mark.parametrize(("model", "expected", "served"), PICKS)
def test_native_rerank_runs_the_cascade_the_model_picks(
    server: str, model: str | None, expected: list[int], served: str
) -> None:
    answer = post(server, "/rerank", {"model": model, "query": QUERY, "documents": DOCS})
    assert order(answer["results"]) == expected
    assert answer["model"] == served
    assert [s["name"] for s in answer["stages"]][1] == served


@pytest.mark.parametrize(("model", "expected", "served"), PICKS[::3])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cohere_routes_run_the_cascade_the_model_picks(
    server: str, version: str, model: str | None, expected: list[int], served: str
) -> None:
    body = {"model": model, "query": QUERY, "documents": DOCS, "top_n": 3}
    answer = post(server, f"/{version}/rerank", body)
    assert order(answer["results"]) == expected[:3] and answer["model"] == served


@pytest.mark.parametrize(
    ("model", "expected"), [("rerank-v3.5", LONGEST_FIRST), (None, SHORTEST_FIRST)]
)
def test_tei_body_runs_the_cascade_the_model_picks(
    server: str, model: str | None, expected: list[int]
) -> None:
    answer = post(server, "/rerank", {"model": model, "query": QUERY, "texts": DOCS})
    assert order(answer) == expected


def test_batch_items_pick_their_own_cascade_or_the_batch_s(server: str) -> None:
    item = {"query": QUERY, "documents": DOCS}
    body = {
        "model": "longest",
        "requests": [item, {**item, "model": "shortest"}, {**item, "model": "stage1-only"}],
    }
    first, second, third = post(server, "/rerank/batch", body)["responses"]
    assert order(first["results"]) == LONGEST_FIRST and first["model"] == "by-length:longest"
    assert order(second["results"]) == SHORTEST_FIRST and second["model"] == "by-length:shortest"
    assert len(third["stages"]) == 1 and third["model"] == third["stages"][0]["name"]


@pytest.mark.parametrize("route", ["/score", "/v1/score"])
@pytest.mark.parametrize("model", ["longest", "shortest"])
def test_vllm_score_runs_the_cascade_the_model_picks(server: str, route: str, model: str) -> None:
    answer = post(server, route, {"model": model, "text_1": QUERY, "text_2": DOCS})
    expected = [expected_score(model == "longest", d) for d in DOCS]
    assert [d["score"] for d in answer["data"]] == pytest.approx(expected)
    assert answer["model"] == f"by-length:{model}"
    pairs = {"model": model, "text_1": [QUERY, QUERY], "text_2": DOCS[:2]}
    scores = [d["score"] for d in post(server, route, pairs)["data"]]
    assert scores == pytest.approx(expected[:2])


def test_a_cascade_without_stage_2_answers_from_stage_1(server: str) -> None:
    answer = post(server, "/rerank", {"model": "stage1-only", "query": QUERY, "documents": DOCS})
    assert len(answer["stages"]) == 1 and answer["stages"][0]["documents"] == len(DOCS)


def test_each_cascade_keeps_its_own_candidates(
    kinds: None, tiny_models: TestModelPaths, tmp_path: Path
) -> None:
    settings = cascade_settings(tiny_models, tmp_path, candidates=2)
    path = tmp_path / "cascades.toml"  # `longest` without candidates: RERANKER_CANDIDATES
    path.write_text(path.read_text().replace("candidates = 5\n", "", 1))
    with running(create_app(settings)) as url:
        for model, scored in (("longest", 2), ("shortest", 5)):  # the setting; the cascade's
            body = {"model": model, "query": QUERY, "documents": DOCS, "top_k": 1}
            assert post(url, "/rerank", body)["stages"][1]["documents"] == scored


# --- accepted_models: unknown names are refused


def test_with_accepted_models_an_unknown_name_is_a_404_in_every_dialect(
    kinds: None, tiny_models: TestModelPaths, tmp_path: Path
) -> None:
    settings = cascade_settings(tiny_models, tmp_path, accepted_models="legacy-name")
    item: dict[str, Any] = {"query": QUERY, "documents": DOCS}
    with running(create_app(settings)) as url:
        bodies: list[tuple[str, dict[str, Any]]] = [
            ("/rerank", {**item}),
            ("/rerank", {"query": QUERY, "texts": DOCS}),
            ("/rerank/batch", {"requests": [item, {**item, "model": "longest"}]}),
            ("/v1/rerank", item),
            ("/v2/rerank", item),
            ("/score", {"text_1": QUERY, "text_2": DOCS}),
        ]
        for route, body in bodies:
            for name in ("longest", "rerank-v3.5", "legacy-name"):  # known: served
                assert httpx.post(f"{url}{route}", json={**body, "model": name}).status_code == 200
            refused = httpx.post(f"{url}{route}", json={**body, "model": "nope"})
            assert refused.status_code == 404, (route, refused.text)
            error = refused.json()
            assert error["error_type"] == "model_not_found" and error["field"] == "model"
            assert "legacy-name" in error["error"] and "longest" in error["error"]
            for unused in (settings.stage1_model, settings.stage2_model):  # the file decides
                response = httpx.post(f"{url}{route}", json={**body, "model": unused})
                assert response.status_code == 404, (route, unused)
        batch_item = {"requests": [item, {**item, "model": "nope"}]}
        refused = httpx.post(f"{url}/rerank/batch", json=batch_item)
        assert refused.status_code == 404
        legacy = post(url, "/rerank", {**item, "model": "legacy-name"})
        assert order(legacy["results"]) == SHORTEST_FIRST  # an accepted name: the default


# --- one model, loaded once


def test_a_model_two_cascades_use_is_loaded_once(
    app: tuple[RerankerApp, str, dict[tuple[str, str], int]],
) -> None:
    application, _, loads = app
    stage1_loads = [count for (kind, _), count in loads.items() if kind == "counted-flashrank"]
    assert stage1_loads == [1]  # three cascades, one stage-1 model
    assert loads["by-length", "longest"] == 1 and loads["by-length", "shortest"] == 1
    status = application.service.status()
    engines = [c.engine for c in status.cascades]
    assert len({e.stage1 for e in engines}) == 1
    assert [s.name for s in status.schedulers] == ["cpu"]  # one CPU scheduler for every cascade


# --- /health, /metrics, /v1/models


def test_health_reports_every_cascade(server: str) -> None:
    health = httpx.get(f"{server}/health").json()
    cascades = health["cascades"]
    assert list(cascades) == ["shortest", "longest", "stage1-only"]  # the default first
    assert cascades["longest"] == {
        "stage1_model": cascades["stage1-only"]["stage1_model"],
        "stage2_model": "by-length:longest",
        "stage2_device": "cpu",
        "aliases": ["rerank-v3.5"],
        "default": False,
    }
    assert cascades["shortest"]["default"] is True
    assert cascades["stage1-only"]["stage2_model"] is None
    assert health["stage2_model"] == "by-length:shortest"  # top level: the default cascade


def cascade_count(server: str, cascade: str) -> float:
    text = httpx.get(f"{server}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "reranker_cascade_requests_total" and sample.labels == {
                "cascade": cascade
            }:
                return float(sample.value)
    return 0.0


def test_metrics_count_requests_per_cascade(server: str) -> None:
    before = {name: cascade_count(server, name) for name in ("longest", "shortest")}
    post(server, "/rerank", {"model": "rerank-v3.5", "query": QUERY, "documents": DOCS})
    post(server, "/v2/rerank", {"model": "rerank-v3.5", "query": QUERY, "documents": DOCS})
    batch = {"requests": [{"query": QUERY, "documents": DOCS, "model": m} for m in ("x", "y")]}
    post(server, "/rerank/batch", batch)  # two items on the default: counted once
    assert cascade_count(server, "longest") == before["longest"] + 2
    assert cascade_count(server, "shortest") == before["shortest"] + 1


def test_v1_models_lists_cascade_names_and_aliases(server: str) -> None:
    names = {m["id"] for m in httpx.get(f"{server}/v1/models").json()["data"]}
    cascades = {"longest", "shortest", "stage1-only"}
    aliases = {"rerank-v3.5", "rerank-english-v3.0", "bge-reranker"}
    assert cascades | aliases | {"by-length:longest", "by-length:shortest"} <= names


# --- the file's mistakes: one line naming the file, the cascade and the field

TABLE = '[cascades.{name}]\nstage1 = "ms-marco-MiniLM-L-12-v2"\n'
BAD_FILES = [
    ('[cascades.multi]\nstage2 = "x"\n', "[cascades.multi] stage1: Field required"),
    (TABLE.format(name="a") + 'stage3 = "x"\n', "[cascades.a] stage3: unknown field; fix: use"),
    (TABLE.format(name="a") + "candidates = 0\n", "[cascades.a] candidates: Input should be"),
    (TABLE.format(name="a") + 'candidates = "ten"\n', "[cascades.a] candidates: Input should"),
    (TABLE.format(name="a") + 'aliases = "x"\n', "[cascades.a] aliases: Input should be a"),
    (TABLE.format(name="a") + 'default = "yes"\n', "[cascades.a] default: Input should be"),
    (TABLE.format(name="a") + 'stage2 = ""\n', "[cascades.a] stage2.model: String should have"),
    (
        TABLE.format(name="a") + "default = true\n" + TABLE.format(name="b") + "default = true\n",
        "[cascades.b] default: cascade 'a' is already the default",
    ),
    (
        TABLE.format(name="a") + TABLE.format(name="b") + 'aliases = ["a"]\n',
        "[cascades.b] aliases: 'a' already names cascade 'a'",
    ),
    (
        TABLE.format(name="a") + 'aliases = ["x"]\n' + TABLE.format(name="b") + 'aliases = ["x"]\n',
        "[cascades.b] aliases: 'x' already names cascade 'a'",
    ),
    ("[cascades.a]\nstage1 = \n", "not valid TOML: "),
    ("", "no cascades; fix: add a [cascades.NAME] table"),
    ('stage1 = "x"\n', "unknown top-level key 'stage1'"),
    ("[cascades]\na = 5\n", "[cascades.a]: must be a table"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_FILES)
def test_each_mistake_in_the_file_is_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "cascades.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ModelLoadError) as info:
        read_cascades(Settings(cascades=path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"RERANKER_CASCADES {path}: ")
    assert expected in message


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"^RERANKER_CASCADES .*nope.toml: no such file"):
        read_cascades(Settings(cascades=tmp_path / "nope.toml"))


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('stage1_kind = "nope"\n', "[cascades.a] stage1.kind: unknown runner kind 'nope'; fix:"),
        ('stage2 = "demo"\nstage2_kind = "nope"\nstage2_on_cpu = true\n', "unknown runner kind"),
        ('stage1_kind = "by-length"\n', "[cascades.a] stage1.kind: runner kind 'by-length' can't"),
    ],
)
def test_a_model_a_cascade_cannot_load_is_one_line_naming_the_cascade(
    kinds: None, tiny_models: TestModelPaths, tmp_path: Path, table: str, expected: str
) -> None:
    path = tmp_path / "cascades.toml"
    good = f'[cascades.ok]\nstage1 = "{tiny_models.stage1}"\n\n'
    path.write_text(f'{good}[cascades.a]\nstage1 = "{tiny_models.stage1}"\n{table}')
    settings = Settings(cascades=path, offline=True, device="cpu", cpu_threads=1, warmup=False)
    with pytest.raises(ModelLoadError) as info:
        load_cascades(settings)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"RERANKER_CASCADES {path}: ")
    assert expected in message


def test_startup_fails_with_the_line(tmp_path: Path) -> None:
    path = tmp_path / "cascades.toml"
    path.write_text('[cascades.multi]\nstage2 = "x"\n')
    app = create_app(Settings(cascades=path, offline=True, device="cpu"))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    asyncio.run(app._lifespan(receive, send))
    assert sent == [
        {
            "type": "lifespan.startup.failed",
            "message": f"RERANKER_CASCADES {path}: [cascades.multi] stage1: Field required",
        }
    ]


# --- without the file: one cascade, `default`, from the settings


def test_without_a_file_there_is_one_default_cascade_from_the_settings() -> None:
    settings = Settings(cascades="", stage1_model="s1", stage2_model="s2", candidates=7)
    assert settings.cascades is None
    (cascade,) = read_cascades(settings)
    assert cascade.name == DEFAULT_NAME and cascade.default and not cascade.aliases
    assert cascade.stage2 is not None
    assert (cascade.stage1.model, cascade.stage1.kind) == ("s1", None)  # None: inferred
    assert (cascade.stage2.model, cascade.stage2.kind) == ("s2", None)
    assert (cascade.candidates, cascade.stage2.cpu_fallback, cascade.origin) == (7, False, "")


def test_without_a_file_health_and_answers_are_as_before() -> None:
    with running(keyword_app()) as url:
        health = httpx.get(f"{url}/health").json()
        answer = post(url, "/rerank", {"model": "anything", "query": "q", "documents": ["a"]})
    assert health["stage1_model"] == "keyword" and health["stage2_model"] is None
    assert health["cascades"] == {
        "default": {
            "stage1_model": "keyword",
            "stage2_model": None,
            "stage2_device": None,
            "aliases": [],
            "default": True,
        }
    }
    assert answer["model"] == "keyword"


# --- the documented examples are valid files


def test_the_example_files_in_the_docs_are_valid() -> None:
    text = (ROOT / "docs" / "cascades.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    for block in blocks:
        cascades = parse_cascades(tomllib.loads(block), Settings(), "docs/cascades.md")
        assert sum(c.default for c in cascades) == 1


def test_download_fetches_every_cascade_s_models(
    tiny_models: TestModelPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from reranker_server.cli import main

    path = tmp_path / "cascades.toml"
    path.write_text(
        f'[cascades.a]\nstage1 = "{tiny_models.stage1}"\nstage2 = "{tiny_models.stage2}"\n'
        f'[cascades.b]\nstage1 = "{tiny_models.stage1}"\nstage2 = "x"\nstage2_kind = "by-length"\n'
    )
    argv = ["download", "--cascades", str(path), "--model-cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"cascade a stage 1: {tiny_models.stage1} -> {tiny_models.stage1}",
        f"cascade a stage 2: {tiny_models.stage2} -> {tiny_models.stage2}",
        f"cascade b stage 1: {tiny_models.stage1} -> {tiny_models.stage1}",
        "cascade b stage 2: x -> (kind by-length: no files)",
    ]
    path.write_text("[cascades.a]\n")
    assert main(argv) == 1
    assert "[cascades.a] stage1: Field required" in capsys.readouterr().err
