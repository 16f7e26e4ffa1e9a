"""`reranker-server make-test-models`: readable files, no half-written folder, one-line errors."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from reranker_server import cli, model_generator
from reranker_server.model_generator import GeneratorError, TestModelPaths, write_test_models


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def test_every_file_is_readable_by_any_user(tiny_models: TestModelPaths) -> None:
    """A container running as another uid reads them from a mounted volume (0600 would not do)."""
    root = tiny_models.stage2.parent
    modes = _modes(root)
    assert modes["cross-encoder/model.safetensors"] == 0o644
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
    for name, mode in modes.items():
        assert mode == (0o755 if (root / name).is_dir() else 0o644), name


def test_a_failed_run_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_export(model: object, path: Path) -> None:
        (path.parent / "partial.onnx").write_bytes(b"half")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(model_generator, "_export_int8", broken_export)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_test_models(tmp_path / "models")
    assert list(tmp_path.iterdir()) == []  # no models/, no temporary folder


def test_an_earlier_output_is_replaced_whole(tiny_models: TestModelPaths, tmp_path: Path) -> None:
    target = tmp_path / "models"
    shutil.copytree(tiny_models.stage2.parent, target)
    (target / "cross-encoder" / "stale.bin").write_bytes(b"old")
    paths = write_test_models(target, seed=1)
    assert paths.stage2 == target / "cross-encoder"
    assert (paths.stage2 / "model.safetensors").is_file()
    assert not (paths.stage2 / "stale.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_a_folder_with_other_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(GeneratorError, match=r"already holds other files \(notes\.txt\)"):
        write_test_models(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_the_command_says_in_one_line_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_find_spec = cli.find_spec
    monkeypatch.setattr(
        cli, "find_spec", lambda name: None if name == "onnx" else real_find_spec(name)
    )
    assert cli.main(["make-test-models", str(tmp_path / "demo")]) == 1
    captured = capsys.readouterr()
    assert captured.err == (
        "reranker-server: make-test-models needs onnx (not installed); fix: pip install onnx\n"
    )
    assert not (tmp_path / "demo").exists()


def test_the_command_refuses_a_foreign_folder_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "data.csv").write_text("1,2")
    assert cli.main(["make-test-models", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fix: name a new or empty directory" in err


def test_the_directory_defaults_to_demo_models() -> None:
    args = cli.build_parser().parse_args(["make-test-models"])
    assert args.directory == Path("demo-models")
