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
from reranker_server.model_store import COMPLETE_MARKER, resolve_stage1, resolve_stage2
from reranker_server.runners.flashrank import FlashRankRunner

from .conftest import free_port

NAME = "ms-marco-MiniLM-L-12-v2"


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
