"""Resolving and downloading models; a loopback HTTP server stands in for the model host."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from reranker_server.errors import ModelLoadError
from reranker_server.model_generator import STAGE1_FILE, TestModelPaths
from reranker_server.model_store import (
    COMPLETE_MARKER,
    CpuFeatures,
    ModelStore,
    choose_onnx_file,
    cpu_features,
    model_files,
    onnx_patterns,
    resolve_stage1,
)
from reranker_server.runners.cross_encoder import CrossEncoderRunner
from reranker_server.runners.flashrank import FlashRankRunner
from reranker_server.runners.onnx_cross_encoder import OnnxCrossEncoderRunner
from reranker_server.runners.registry import infer_kind, kind_of
from reranker_server.specs import StageSpec

from .conftest import free_port
from .hub_server import FakeHub

NAME = "ms-marco-MiniLM-L-12-v2"


def resolve_stage2(
    name: str,
    cache_dir: Path,
    *,
    offline: bool,
    timeout_s: float,
    endpoint: str | None = None,
    kind: str = "cross-encoder",
    onnx_file: str = "auto",
) -> str:
    """A stage-2 model's files, fetched by its kind as the server does."""
    store = ModelStore(cache_dir, offline=offline, timeout_s=timeout_s, hub_endpoint=endpoint)
    spec = StageSpec(model=name, kind=kind, onnx_file=onnx_file)
    return str(kind_of(kind).fetch(spec, store))


def hub_patterns(
    names: list[str],
    kind: str,
    *,
    onnx_file: str = "auto",
    trust_remote_code: bool = False,
    cpu: CpuFeatures | None = None,
) -> tuple[list[str], list[str]]:
    """What a kind downloads from a repository listing `names` (`cpu`: for that CPU)."""
    if cpu is not None:
        assert kind == "onnx-cross-encoder"
        return onnx_patterns(names, onnx_file=onnx_file, cpu=cpu)
    spec = StageSpec(
        model="org/x", kind=kind, onnx_file=onnx_file, trust_remote_code=trust_remote_code
    )
    return kind_of(kind).hub_patterns(names, spec)


def infer_stage2_kind(names: list[str]) -> str:
    return infer_kind("org/x", names, 2)


class ModelHost:
    """Serves `<name>.zip` like FlashRank's host; can cut a download short."""

    def __init__(self, archive: bytes) -> None:
        self.archive = archive
        self.truncate = False
        self.hits = 0
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.hits += 1
                if self.path != f"/{NAME}.zip":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(host.archive)))
                self.end_headers()
                body = host.archive[: len(host.archive) // 2] if host.truncate else host.archive
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def model_host(tiny_models: TestModelPaths) -> Iterator[ModelHost]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(tiny_models.stage1.iterdir()):
            archive.write(path, f"{NAME}/{path.name}")
    host = ModelHost(buffer.getvalue())
    yield host
    host.server.shutdown()
    host.server.server_close()


def test_download_verifies_and_renames_into_place(model_host: ModelHost, tmp_path: Path) -> None:
    files = resolve_stage1(NAME, tmp_path, offline=False, timeout_s=10, base_url=model_host.url)
    assert files.directory == tmp_path / "flashrank" / NAME
    assert (files.directory / COMPLETE_MARKER).is_file()
    assert files.onnx_file.name == STAGE1_FILE
    runner = FlashRankRunner(files.directory, files.onnx_file)
    assert len(runner.score("q", ["a", "b"])) == 2
    assert [p.name for p in (tmp_path / "flashrank").iterdir()] == [NAME]  # no temp dirs left
    # idempotent: the second resolve uses the cache and asks the host nothing
    resolve_stage1(NAME, tmp_path, offline=False, timeout_s=10, base_url=model_host.url)
    assert model_host.hits == 1


def test_interrupted_download_leaves_nothing_behind(model_host: ModelHost, tmp_path: Path) -> None:
    model_host.truncate = True
    with pytest.raises(ModelLoadError, match="could not be downloaded") as info:
        resolve_stage1(NAME, tmp_path, offline=False, timeout_s=10, base_url=model_host.url)
    assert "\n" not in str(info.value) and NAME in str(info.value)
    assert list((tmp_path / "flashrank").iterdir()) == []
    model_host.truncate = False
    files = resolve_stage1(NAME, tmp_path, offline=False, timeout_s=10, base_url=model_host.url)
    assert (files.directory / COMPLETE_MARKER).is_file()


def test_a_directory_without_the_marker_is_not_a_model(
    tmp_path: Path, tiny_models: TestModelPaths
) -> None:
    partial = tmp_path / "flashrank" / NAME
    shutil.copytree(tiny_models.stage1, partial)  # looks complete, but nobody marked it so
    with pytest.raises(ModelLoadError, match="offline mode is on"):
        resolve_stage1(NAME, tmp_path, offline=True, timeout_s=1)
    (partial / COMPLETE_MARKER).write_text("ok\n")
    assert resolve_stage1(NAME, tmp_path, offline=True, timeout_s=1).directory == partial


def test_local_directories(tiny_models: TestModelPaths, tmp_path: Path) -> None:
    files = resolve_stage1(str(tiny_models.stage1), tmp_path, offline=True, timeout_s=1)
    assert files.onnx_file == tiny_models.stage1 / STAGE1_FILE
    assert resolve_stage2(str(tiny_models.stage2), tmp_path, offline=True, timeout_s=1) == str(
        tiny_models.stage2
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"incomplete \(missing tokenizer.json"):
        resolve_stage1(str(broken), tmp_path, offline=True, timeout_s=1)


def test_unknown_names_and_offline_misses_are_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="neither a directory nor a FlashRank model"):
        resolve_stage1("ms-marco-MiniLM-L-12-v3", tmp_path, offline=True, timeout_s=1)
    with pytest.raises(ModelLoadError) as info:
        resolve_stage2("cross-encoder/ms-marco-MiniLM-L-6-v2", tmp_path, offline=True, timeout_s=1)
    message = str(info.value)
    assert "\n" not in message
    assert "cross-encoder/ms-marco-MiniLM-L-6-v2" in message and str(tmp_path / "hub") in message
    assert "fix:" in message


def test_download_command_fetches_both_and_says_where(
    model_host: ModelHost,
    tiny_models: TestModelPaths,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from reranker_server.cli import main

    argv = [
        "download",
        "--stage1-model",
        NAME,
        "--flashrank-base-url",
        model_host.url,
        "--stage2-model",
        str(tiny_models.stage2),
        "--model-cache-dir",
        str(tmp_path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"stage 1: {NAME} -> {tmp_path / 'flashrank' / NAME}" in out
    assert f"stage 2: {tiny_models.stage2} -> {tiny_models.stage2}" in out
    model_host.archive = b"not a zip"
    assert main([*argv, "--model-cache-dir", str(tmp_path / "other")]) == 1
    assert "could not be downloaded" in capsys.readouterr().err


def test_a_copy_finished_by_another_replica_is_kept(model_host: ModelHost, tmp_path: Path) -> None:
    from reranker_server import model_store

    target = tmp_path / "flashrank" / NAME
    first = resolve_stage1(NAME, tmp_path, offline=False, timeout_s=10, base_url=model_host.url)
    marker_time = (first.directory / COMPLETE_MARKER).stat().st_mtime_ns
    # a second replica that started before the first finished downloads too, then finds it done
    model_store._download_flashrank(f"{model_host.url}/{NAME}.zip", NAME, target, 10)
    assert (target / COMPLETE_MARKER).stat().st_mtime_ns == marker_time
    assert [p.name for p in (tmp_path / "flashrank").iterdir()] == [NAME]


def test_an_archive_that_unpacks_too_big_is_refused(
    model_host: ModelHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reranker_server import model_store

    monkeypatch.setattr(model_store, "MAX_UNPACKED_BYTES", 1000)
    with pytest.raises(ModelLoadError, match="zip bomb"):
        resolve_stage1(NAME, tmp_path, offline=False, timeout_s=10, base_url=model_host.url)
    assert list((tmp_path / "flashrank").iterdir()) == []


FIXES = (
    "a mirror (RERANKER_FLASHRANK_BASE_URL)",
    "`reranker-server download` where there is internet",
    "a local directory (RERANKER_STAGE1_MODEL)",
    "`reranker-server make-test-models`",
)


@pytest.mark.parametrize("failure", ["refused", "http 404"])
def test_a_failed_download_is_one_short_line_naming_the_fixes(
    model_host: ModelHost, tmp_path: Path, failure: str
) -> None:
    base_url = f"http://127.0.0.1:{free_port()}" if failure == "refused" else model_host.url + "/x"
    with pytest.raises(ModelLoadError) as info:
        resolve_stage1(NAME, tmp_path, offline=False, timeout_s=5, base_url=base_url)
    message = str(info.value)
    reason = "can't reach 127.0.0.1" if failure == "refused" else "HTTP 404 from 127.0.0.1"
    assert message.startswith(f"stage-1 model '{NAME}' could not be downloaded ({reason}); fix: ")
    assert all(fix in message for fix in FIXES), message
    assert "\n" not in message and len(message) < 400 and "urllib3" not in message
    assert info.value.__cause__ is None  # no chained traceback text either
    assert list((tmp_path / "flashrank").iterdir()) == []


def _without_root_privileges() -> list[str]:
    """A command prefix under which permission bits apply, as for uid 1000 in a container."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): permissions can't be tested")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


def test_an_unwritable_cache_is_one_line_naming_the_uid(tmp_path: Path) -> None:
    cache = tmp_path / "hf_cache"
    cache.mkdir(mode=0o555)
    argv = [
        *_without_root_privileges(),
        str(Path(sys.executable).parent / "reranker-server"),
        "download",
        "--model-cache-dir",
        str(cache),
        "--flashrank-base-url",
        f"http://127.0.0.1:{free_port()}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANKER_")}
    try:
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    finally:
        cache.chmod(0o755)
    assert out.returncode == 1
    uid = os.getuid()
    assert out.stderr.splitlines() == [
        f"reranker-server: model cache {cache} is not writable by uid {uid}; fix: give uid {uid} "
        f'write access (e.g. `chown -R {uid} <the cache>`; Docker: `docker run --user "$(id -u):'
        '$(id -g)"`), or set RERANKER_MODEL_CACHE_DIR to a writable directory'
    ]


# --- stage 2: which files a runner kind needs, from the hub or a directory ---------------------

# File listings of real hub repositories (abridged), as `HfApi.list_repo_files` returns them.
MINILM_L6 = [  # cross-encoder/ms-marco-MiniLM-L6-v2
    ".gitattributes",
    "README.md",
    "config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "flax_model.msgpack",
    "tf_model.h5",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "onnx/model.onnx",
    "onnx/model_O1.onnx",
    "onnx/model_O4.onnx",
    "onnx/model_qint8_arm64.onnx",
    "onnx/model_qint8_avx512.onnx",
    "onnx/model_qint8_avx512_vnni.onnx",
    "onnx/model_quint8_avx2.onnx",
    "openvino/openvino_model.bin",
    "openvino/openvino_model.xml",
]
QWEN3_SEQ_CLS = [  # tomaarsen/Qwen3-Reranker-0.6B-seq-cls
    "README.md",
    "chat_template.jinja",
    "config.json",
    "config_sentence_transformers.json",
    "merges.txt",
    "model.safetensors",
    "modules.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
]
BIN_ONLY = ["config.json", "pytorch_model.bin", "tokenizer.json", "vocab.txt", "README.md"]
XENOVA = ["config.json", "tokenizer.json", "onnx/model.onnx", "onnx/model_quantized.onnx"]


def downloaded(names: list[str], allow: list[str], ignore: list[str]) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    return sorted(filter_repo_objects(names, allow_patterns=allow, ignore_patterns=ignore))


def test_cross_encoder_downloads_keep_templates_and_weights() -> None:
    assert downloaded(QWEN3_SEQ_CLS, *hub_patterns(QWEN3_SEQ_CLS, "cross-encoder")) == sorted(
        n for n in QWEN3_SEQ_CLS if n != "README.md"
    )
    got = downloaded(MINILM_L6, *hub_patterns(MINILM_L6, "cross-encoder"))
    assert "model.safetensors" in got and "pytorch_model.bin" not in got  # one copy of weights
    assert not [n for n in got if n.startswith(("onnx/", "openvino/")) or n.endswith(".h5")]
    assert downloaded(BIN_ONLY, *hub_patterns(BIN_ONLY, "cross-encoder")) == [
        "config.json",
        "pytorch_model.bin",
        "tokenizer.json",
        "vocab.txt",
    ]
    assert "modeling_x.py" not in downloaded(
        [*BIN_ONLY, "modeling_x.py"], *hub_patterns(BIN_ONLY, "cross-encoder")
    )
    trusted = hub_patterns(BIN_ONLY, "cross-encoder", trust_remote_code=True)
    assert "modeling_x.py" in downloaded([*BIN_ONLY, "modeling_x.py"], *trusted)


AVX2 = CpuFeatures(arm64=False, flags=frozenset({"avx", "avx2"}))
VNNI = CpuFeatures(arm64=False, flags=frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni"}))
ARM = CpuFeatures(arm64=True, flags=frozenset({"asimd"}))
OLD_X86 = CpuFeatures(arm64=False, flags=frozenset({"sse4_2"}))


@pytest.mark.parametrize(
    ("names", "requested", "cpu", "chosen"),
    [
        (MINILM_L6, "auto", VNNI, "onnx/model_qint8_avx512_vnni.onnx"),
        (MINILM_L6, "auto", AVX2, "onnx/model_quint8_avx2.onnx"),
        (MINILM_L6, "auto", ARM, "onnx/model_qint8_arm64.onnx"),
        (MINILM_L6, "auto", OLD_X86, "onnx/model.onnx"),
        (MINILM_L6, "fp32", VNNI, "onnx/model.onnx"),
        (MINILM_L6, "model_O1.onnx", AVX2, "onnx/model_O1.onnx"),
        (MINILM_L6, "onnx/model_qint8_arm64.onnx", AVX2, "onnx/model_qint8_arm64.onnx"),
        (MINILM_L6, "model_q4.onnx", AVX2, None),
        (XENOVA, "auto", AVX2, "onnx/model_quantized.onnx"),
        (["model.onnx", "tokenizer.json"], "auto", VNNI, "model.onnx"),
        (["weird-name.onnx"], "auto", AVX2, "weird-name.onnx"),
        (["onnx/a.onnx", "onnx/b.onnx"], "auto", AVX2, None),
        (BIN_ONLY, "auto", AVX2, None),
    ],
)
def test_the_onnx_file_that_fits_the_cpu(
    names: list[str], requested: str, cpu: CpuFeatures, chosen: str | None
) -> None:
    assert choose_onnx_file(names, requested, cpu) == chosen


def test_cpu_flags_come_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512bw avx512_vnni\n\n")
    assert {"avx2", "avx512_vnni"} <= cpu_features(cpuinfo).flags
    assert cpu_features(tmp_path / "absent").flags == frozenset()


def test_onnx_downloads_take_the_one_file_the_cpu_runs() -> None:
    allow, ignore = hub_patterns(MINILM_L6, "onnx-cross-encoder", cpu=AVX2)
    got = downloaded(MINILM_L6, allow, ignore)
    assert [n for n in got if n.endswith((".onnx", ".bin", ".safetensors", ".h5"))] == [
        "onnx/model_quint8_avx2.onnx"
    ]
    assert {"tokenizer.json", "config.json", "vocab.txt"} <= set(got)
    allow, ignore = hub_patterns(MINILM_L6, "onnx-cross-encoder", onnx_file="fp32", cpu=AVX2)
    assert "onnx/model.onnx" in downloaded(MINILM_L6, allow, ignore)


def test_the_kind_follows_the_files() -> None:
    assert infer_stage2_kind(MINILM_L6) == "cross-encoder"
    assert infer_stage2_kind(BIN_ONLY) == "cross-encoder"
    assert infer_stage2_kind(XENOVA) == "onnx-cross-encoder"
    assert infer_stage2_kind(["config.json", "README.md"]) == "cross-encoder"  # nothing known


@pytest.fixture
def fake_hub(model_matrix: dict[str, Path], tmp_path: Path) -> Iterator[FakeHub]:
    import torch
    from safetensors.torch import load_file

    bin_only = tmp_path / "bin-only"  # an older repository: pytorch_model.bin, no safetensors
    shutil.copytree(model_matrix["bert"], bin_only)
    torch.save(load_file(bin_only / "model.safetensors"), bin_only / "pytorch_model.bin")
    (bin_only / "model.safetensors").unlink()
    hub = FakeHub(
        {
            "org/qwen3-reranker-seq-cls": model_matrix["qwen3-template"],
            "org/bin-only": bin_only,
            "org/minilm-onnx": model_matrix["onnx/bert"],
        }
    )
    yield hub
    hub.close()


def test_hub_downloads_bring_what_the_model_needs(fake_hub: FakeHub, tmp_path: Path) -> None:
    path = resolve_stage2(
        "org/qwen3-reranker-seq-cls", tmp_path, offline=False, timeout_s=10, endpoint=fake_hub.url
    )
    assert (Path(path) / "chat_template.jinja").is_file()  # the scores depend on it
    path = resolve_stage2(
        "org/bin-only", tmp_path, offline=False, timeout_s=10, endpoint=fake_hub.url
    )
    assert (Path(path) / "pytorch_model.bin").is_file()
    assert len(CrossEncoderRunner(path).score("paris", ["paris is a city", "a dog"])) == 2
    fake_hub.downloaded.clear()
    path = resolve_stage2(
        "org/minilm-onnx",
        tmp_path,
        offline=False,
        timeout_s=10,
        endpoint=fake_hub.url,
        kind="onnx-cross-encoder",
    )
    onnx_files = [n for n in fake_hub.downloaded if n.endswith(".onnx")]
    assert onnx_files == [choose_onnx_file(fake_hub.files("org/minilm-onnx"))]
    runner = OnnxCrossEncoderRunner(path)
    assert runner.onnx_file.name == Path(onnx_files[0]).name
    # with no kind given, the repository's files choose it
    assert (
        infer_stage2_kind(
            model_files("org/minilm-onnx", tmp_path, offline=False, endpoint=fake_hub.url)
        )
        == "onnx-cross-encoder"
    )
    assert infer_stage2_kind(model_files("org/bin-only", tmp_path, offline=True)) == "cross-encoder"
    # later starts offline: the same files, from the cache, checked complete
    fake_hub.close()
    for repo, kind in (
        ("org/qwen3-reranker-seq-cls", "cross-encoder"),
        ("org/bin-only", "cross-encoder"),
        ("org/minilm-onnx", "onnx-cross-encoder"),
    ):
        assert Path(resolve_stage2(repo, tmp_path, offline=True, timeout_s=1, kind=kind)).is_dir()


def test_a_model_without_what_its_kind_runs_names_the_files_found(
    model_matrix: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ModelLoadError) as info:  # ONNX only, asked to run through torch
        resolve_stage2(str(model_matrix["onnx/bert"]), tmp_path, offline=True, timeout_s=1)
    message = str(info.value)
    assert "\n" not in message and "onnx/model.onnx" in message and "tokenizer.json" in message
    assert '"onnx-cross-encoder" (RERANKER_STAGE2_KIND; a cascades file: stage2.kind)' in message
    with pytest.raises(ModelLoadError) as info:  # torch weights only, asked to run ONNX
        resolve_stage2(
            str(model_matrix["bert"]),
            tmp_path,
            offline=True,
            timeout_s=1,
            kind="onnx-cross-encoder",
        )
    assert "model.safetensors" in str(info.value) and "fix:" in str(info.value)
    with pytest.raises(ModelLoadError, match=r"model_q4.onnx.*found: .*onnx/model.onnx"):
        resolve_stage2(
            str(model_matrix["onnx/bert"]),
            tmp_path,
            offline=True,
            timeout_s=1,
            kind="onnx-cross-encoder",
            onnx_file="model_q4.onnx",
        )


def test_a_hub_onnx_export_loads_as_stage_1(model_matrix: dict[str, Path], tmp_path: Path) -> None:
    export = model_matrix["onnx/bert"]
    files = resolve_stage1(str(export), tmp_path, offline=True, timeout_s=1)
    assert files.onnx_file == export / str(choose_onnx_file(fake_names(export)))
    stage1 = FlashRankRunner(files.directory, files.onnx_file)
    same_file = OnnxCrossEncoderRunner(export, onnx_file=files.onnx_file.name)
    docs = ["paris is the capital of france", "a dog", ""]
    assert stage1.score("capital of france", docs) == pytest.approx(
        same_file.score("capital of france", docs), abs=1e-5
    )


def fake_names(directory: Path) -> list[str]:
    return [str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()]


def test_flashrank_listwise_models_are_refused_as_such(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        resolve_stage1("rank_zephyr_7b_v1_full", tmp_path, offline=True, timeout_s=1)
    message = str(info.value)
    assert "listwise" in message and "not supported" in message and "neither" not in message
    assert "ms-marco-MiniLM-L-12-v2" in message and "\n" not in message
