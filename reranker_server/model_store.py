"""Resolve, download and verify model files. No model is loaded here.

Layout of the cache directory (`model_cache_dir`):

    flashrank/<name>/          FlashRank's own layout, plus `.complete` once fully unpacked
    hub/models--org--name/     the Hugging Face hub cache (HF_HOME=<cache dir> uses the same)

Downloads go to a temporary directory inside the cache and are renamed into place, and a marker
file says "complete": a half-finished download is never mistaken for a model.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError
from .settings import Settings

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
FLASHRANK_REQUIRED = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.model"]
MAX_UNPACKED_BYTES = 4 * 2**30  # FlashRank's largest pairwise archive unpacks to well under 1 GB
HUB_IGNORE = ["onnx/*", "openvino/*", "*/onnx/*", "*/openvino/*"]


@dataclass(frozen=True)
class FlashRankFiles:
    """A FlashRank model directory and the ONNX file in it."""

    directory: Path
    onnx_file: Path


def flashrank_model_files() -> dict[str, str]:
    """FlashRank's known pairwise models: name -> ONNX file name (from FlashRank itself)."""
    from flashrank.Config import listwise_rankers, model_file_map

    return {k: v for k, v in model_file_map.items() if k not in listwise_rankers}


def _find_onnx(directory: Path) -> Path | None:
    known = flashrank_model_files().get(directory.name)
    if known and (directory / known).is_file():
        return directory / known
    candidates = sorted(directory.glob("*.onnx"), key=lambda p: (not p.stem.endswith("_Q"), p.name))
    return candidates[0] if candidates else None


def _flashrank_files(directory: Path) -> FlashRankFiles:
    missing = [name for name in FLASHRANK_REQUIRED if not (directory / name).is_file()]
    onnx_file = _find_onnx(directory)
    if missing or onnx_file is None:
        what = ", ".join(missing + ([] if onnx_file else ["*.onnx"]))
        raise ModelLoadError(
            f"stage-1 model directory {directory} is incomplete (missing {what}); fix: point "
            "RERANKER_STAGE1_MODEL at a FlashRank model directory or delete it to download again"
        )
    return FlashRankFiles(directory=directory, onnx_file=onnx_file)


def resolve_stage1(
    name: str, cache_dir: Path, *, offline: bool, timeout_s: float, base_url: str = ""
) -> FlashRankFiles:
    """A local FlashRank directory, or a FlashRank model name fetched into the cache."""
    local = Path(name).expanduser()
    if local.is_dir():
        return _flashrank_files(local)
    known = flashrank_model_files()
    if name not in known:
        raise ModelLoadError(
            f"stage-1 model '{name}' is neither a directory nor a FlashRank model name; fix: use "
            f"one of {', '.join(sorted(known))} or a local directory in FlashRank's layout"
        )
    target = cache_dir / "flashrank" / name
    if (target / COMPLETE_MARKER).is_file():
        return _flashrank_files(target)
    if offline:
        raise ModelLoadError(
            f"stage-1 model '{name}' is not in the cache ({target}) and offline mode is on; fix: "
            "run `reranker-server download` once with internet, or set RERANKER_STAGE1_MODEL to a "
            "local directory"
        )
    _download_flashrank(f"{base_url.rstrip('/')}/{name}.zip", name, target, timeout_s)
    return _flashrank_files(target)


def _download_flashrank(url: str, name: str, target: Path, timeout_s: float) -> None:
    import requests
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading stage-1 model %s into %s", name, target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        archive = Path(tmp) / f"{name}.zip"
        try:
            with requests.get(url, stream=True, timeout=timeout_s) as response:
                response.raise_for_status()
                total = int(response.headers.get("content-length", 0))
                with (
                    archive.open("wb") as out,
                    tqdm(
                        desc=name, total=total, unit="iB", unit_scale=True, unit_divisor=1024
                    ) as bar,
                ):
                    for chunk in response.iter_content(chunk_size=1 << 16):
                        bar.update(out.write(chunk))
            if total and archive.stat().st_size != total:
                raise OSError(f"got {archive.stat().st_size} of {total} bytes")
            with zipfile.ZipFile(archive) as zipped:
                if zipped.testzip() is not None:
                    raise OSError("corrupt archive")
                unpacked_size = sum(info.file_size for info in zipped.infolist())
                if unpacked_size > MAX_UNPACKED_BYTES:
                    raise OSError(f"archive unpacks to {unpacked_size} bytes (a zip bomb?)")
                zipped.extractall(tmp)
        except (OSError, requests.RequestException, zipfile.BadZipFile) as exc:
            raise ModelLoadError(
                f"stage-1 model '{name}' could not be downloaded from {url} ({exc}); fix: check "
                "the network, or set RERANKER_STAGE1_MODEL to a local directory"
            ) from exc
        unpacked = Path(tmp) / name
        _flashrank_files(unpacked)  # verify before it becomes visible
        (unpacked / COMPLETE_MARKER).write_text("ok\n", encoding="utf-8")
        try:
            unpacked.rename(target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():
                shutil.rmtree(target, ignore_errors=True)  # a stale, incomplete copy
                unpacked.rename(target)
            # else: another replica on the same volume finished first; keep its copy


def resolve_stage2(
    name: str,
    cache_dir: Path,
    *,
    offline: bool,
    timeout_s: float,
    endpoint: str | None = None,
    trust_remote_code: bool = False,
) -> str:
    """A local cross-encoder directory, or a hub id fetched into the cache."""
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(
                f"stage-2 model directory {local} has no config.json; fix: point "
                "RERANKER_STAGE2_MODEL at a cross-encoder saved by sentence-transformers"
            )
        return str(local)
    from huggingface_hub import snapshot_download

    hub_cache = cache_dir / "hub"
    try:
        path = snapshot_download(
            name,
            cache_dir=hub_cache,
            local_files_only=offline,
            # a repository's own Python code only when the settings trust it
            allow_patterns=HUB_PATTERNS + (["*.py"] if trust_remote_code else []),
            ignore_patterns=HUB_IGNORE,
            etag_timeout=timeout_s,
            endpoint=endpoint,
        )
    except Exception as exc:  # the hub client raises many types; all mean "not available"
        how = "offline mode is on" if offline else f"download failed: {type(exc).__name__}"
        raise ModelLoadError(
            f"stage-2 model '{name}' is not in the cache ({hub_cache}) and {how}; fix: check the "
            "name, run `reranker-server download` once with internet, or set "
            "RERANKER_STAGE2_MODEL to a local directory"
        ) from exc
    return str(path)


def stage1_files(settings: Settings, model: str | None = None) -> FlashRankFiles:
    """A FlashRank model (default: the stage-1 model the settings name), fetched if needed."""
    return resolve_stage1(
        model or settings.stage1_model,
        settings.model_cache_dir,
        offline=settings.offline,
        timeout_s=settings.download_timeout_s,
        base_url=settings.flashrank_base_url,
    )


def stage2_path(settings: Settings, model: str | None = None) -> str:
    """A cross-encoder directory (default: the stage-2 model the settings name), fetched if
    needed."""
    return resolve_stage2(
        model or settings.stage2_model,
        settings.model_cache_dir,
        offline=settings.offline,
        timeout_s=settings.download_timeout_s,
        endpoint=settings.hub_endpoint,
        trust_remote_code=settings.trust_remote_code,
    )
