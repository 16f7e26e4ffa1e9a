"""Stage 2 on the CPU without torch: a cross-encoder exported to ONNX, run by ONNX Runtime.

Kind `onnx-cross-encoder`. The model is a directory (or a hub repository, fetched by
model_store.py) with `onnx/*.onnx` (or `model.onnx` at the top) and the repository's
`tokenizer.json`; the ONNX file is the int8 one quantized for this CPU (`onnx_file="auto"`,
model_store.choose_onnx_file), `model.onnx` (`"fp32"`) or the one named.

Tokenization is the `tokenizers` library reading the repository's tokenizer.json, truncated the
way transformers truncates a pair (longest first) to the shortest of `max_length`, the tokenizer's
`model_max_length` and the model's position table. Scores are computed as by the torch runner
(runners/cross_encoder.py): sigmoid of a single logit, else softmax and the second label.

Batching, session options and the score head are shared with FlashRank's runner (onnx_base.py):
an int8 file that quantizes activations per batch runs every pair alone, so a pair's score never
depends on what else is scored with it.

Nothing here imports torch or transformers.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer

from ..errors import ModelLoadError
from ..model_store import (
    CpuFeatures,
    ModelStore,
    check_onnx_dir,
    choose_onnx_file,
    onnx_files_in,
    onnx_patterns,
    resolve_hub_model,
    weight_files,
)
from .kind import LoadTarget, RunnerKind
from .onnx_base import OnnxPairRunner, cpu_session

if TYPE_CHECKING:
    from ..specs import StageSpec

SUPPORTED_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# transformers' "no limit" sentinel for model_max_length is 1e30; anything this big means none
NO_LIMIT = 1_000_000


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def onnx_precision(onnx_file: Path) -> str:
    """ "int8" for a quantized file, "fp16" for a half-precision one, else "fp32"."""
    with (
        onnx_file.open("rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data,
    ):
        if data.find(b"QuantizeLinear") >= 0 or data.find(b"MatMulInteger") >= 0:
            return "int8"
    stem = onnx_file.stem.lower()
    return "fp16" if "fp16" in stem or stem.endswith("_o4") else "fp32"


class OnnxCrossEncoderRunner(OnnxPairRunner):
    """Scores pairs with an ONNX cross-encoder on the CPU (ONNX Runtime, no torch; the ONNX
    steps: onnx_base.py)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        onnx_file: str = "auto",
        max_length: int = 512,
        batch_tokens: int = 8192,
        threads: int = 1,
        name: str | None = None,
        cpu: CpuFeatures | None = None,
        graph: str = "exact",
    ) -> None:
        directory = Path(model_dir)
        check_onnx_dir(directory, WHAT, onnx_file=onnx_file, cpu=cpu)
        names = [str(p.relative_to(directory)) for p in directory.glob("**/*.onnx")]
        self.onnx_file = directory / str(choose_onnx_file(names, onnx_file, cpu))
        self.name = name or directory.name
        self.files = directory
        config = _read_json(directory / "config.json")
        tokenizer_config = _read_json(directory / "tokenizer_config.json")
        if "chat_template" in tokenizer_config or (directory / "chat_template.jinja").is_file():
            raise ModelLoadError(
                f"stage-2 model {self.name} has a chat template (an LLM-based reranker); "
                "onnx-cross-encoder scores plain (query, document) pairs; fix: set the stage's "
                'kind to "cross-encoder" (RERANKER_STAGE2_KIND; a cascades file: stage2.kind) '
                "and pip install 'reranker-server[torch]'"
            )
        limits = [max_length]
        model_max = tokenizer_config.get("model_max_length")
        if isinstance(model_max, (int, float)) and 0 < model_max < NO_LIMIT:
            limits.append(int(model_max))
        if isinstance(config.get("max_position_embeddings"), int):
            limits.append(int(config["max_position_embeddings"]))

        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        tokenizer.no_padding()  # padding is per batch (onnx_inputs.py)
        tokenizer.enable_truncation(max_length=min(limits), strategy="longest_first")
        try:
            session = cpu_session(self.onnx_file, threads, graph)
        except Exception as exc:
            raise ModelLoadError(
                f"stage-2 ONNX file {self.onnx_file} could not be loaded ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); fix: download it again or "
                "set onnx_file to another file of the model"
            ) from exc
        self._start(tokenizer, 0, session, self.onnx_file, batch_tokens)
        self._pad_id = _pad_token_id(tokenizer, config, tokenizer_config)
        unknown = [n for n in self._input_names if n not in SUPPORTED_INPUTS]
        if unknown or "input_ids" not in self._input_names:
            raise ModelLoadError(
                f"stage-2 ONNX file {self.onnx_file} takes inputs {', '.join(self._input_names)}; "
                f"onnx-cross-encoder feeds {', '.join(SUPPORTED_INPUTS)}; fix: export the model as "
                "a sequence classifier (optimum-cli export onnx --task text-classification)"
            )
        self.precision = onnx_precision(self.onnx_file)


def _pad_token_id(
    tokenizer: Tokenizer, config: dict[str, Any], tokenizer_config: dict[str, Any]
) -> int:
    if isinstance(config.get("pad_token_id"), int):
        return int(config["pad_token_id"])
    token = tokenizer_config.get("pad_token")
    if isinstance(token, dict):
        token = token.get("content")
    found = tokenizer.token_to_id(token) if isinstance(token, str) else None
    return int(found) if found is not None else 0


WHAT = "kind onnx-cross-encoder"


def display_name(model: str) -> str:
    """What clients see: a hub id, or a directory's last part (never a local path)."""
    return Path(model).name if Path(model).expanduser().is_dir() else model


def _fetch(spec: StageSpec, store: ModelStore) -> Path:
    return resolve_hub_model(
        spec.model,
        store,
        what=f"model ({WHAT})",
        patterns=lambda names: onnx_patterns(names, onnx_file=spec.onnx_file),
        check=lambda directory: _check_directory(directory, spec),
    )


def _check_directory(directory: Path, spec: StageSpec) -> None:
    check_onnx_dir(directory, WHAT, onnx_file=spec.onnx_file)


def _load(spec: StageSpec, store: ModelStore, target: LoadTarget) -> OnnxCrossEncoderRunner:
    """A hub repository or directory with `onnx/*.onnx`, on the CPU (ONNX Runtime, no torch);
    the ONNX file `onnx_file` picks (auto: the one that fits this CPU)."""
    path = _fetch(spec, store)
    try:
        return OnnxCrossEncoderRunner(
            path,
            onnx_file=spec.onnx_file,
            max_length=spec.max_length,
            batch_tokens=spec.batch_tokens,
            threads=target.threads,
            name=display_name(spec.model),
            graph=spec.onnx_graph,
        )
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"ONNX cross-encoder {path} could not be loaded ({type(exc).__name__}: {exc}); fix: "
            "point the model at a directory or hub repository with onnx/*.onnx and tokenizer.json"
        ) from exc


def _claims(names: Sequence[str]) -> bool:
    """An ONNX export without torch weights (torch weights: the cross-encoder kind)."""
    return bool(onnx_files_in(names)) and "tokenizer.json" in names and not weight_files(names)


KIND = RunnerKind(
    name="onnx-cross-encoder",
    load=_load,
    fetch=_fetch,
    check_directory=_check_directory,
    claims=_claims,
    devices=("cpu",),
    hub_patterns=lambda names, spec: onnx_patterns(names, onnx_file=spec.onnx_file),
)
