"""Optional dependencies: torch, transformers and sentence-transformers come with the `[torch]`
extra. The base install runs stage 1 (FlashRank) and stage 2 on the CPU through ONNX Runtime
(`onnx-cross-encoder`) without them; what needs them says so in one line at startup."""

from __future__ import annotations

from .errors import ModelLoadError

TORCH_EXTRA = "pip install 'reranker-server[torch]'"
TORCH_MODULES = ("torch", "transformers", "sentence_transformers")


def missing_torch_modules() -> list[str]:
    """Which of torch, transformers and sentence-transformers can't be imported."""
    missing = []
    for module in TORCH_MODULES:
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    return missing


def require_torch(what: str) -> None:
    """Raise a one-line ModelLoadError naming the extra unless the torch stack imports."""
    missing = missing_torch_modules()
    if missing:
        raise ModelLoadError(
            f"{what} needs the torch extra ({', '.join(missing)} not installed); fix: "
            f"{TORCH_EXTRA} (on a CPU-only host `pip install torch==2.13.0` first), or run stage 2 "
            "on the CPU without torch: RERANKER_STAGE2_KIND=onnx-cross-encoder (a cascades file: "
            "stage2.kind; docs/models.md)"
        )
