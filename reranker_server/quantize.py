"""`reranker-server quantize MODEL OUT`: a sentence-transformers cross-encoder as an int8 ONNX
model that the torch-free `onnx-cross-encoder` kind serves on the CPU.

    OUT/config.json, tokenizer files         the model's, as transformers saves them
    OUT/onnx/model.onnx                      fp32 export (eager attention: the classic graph)
    OUT/onnx/<this CPU's int8 name>.onnx     dynamic int8 quantization of it (ONNX Runtime's
                                             `quantize_dynamic`), named as on the hub, so that
                                             `onnx_file = "auto"` picks it on this CPU
    OUT/quantize.json                        the parity report below

The int8 file's name is the first of `model_store.onnx_preference` for this CPU (AVX-512 VNNI,
AVX-512, AVX2 or ARM64; else the CPU-neutral `model_int8`); weights are unsigned for the AVX2
name (`quint8`, whose kernels would saturate signed weights), signed otherwise.

Parity: the fp32 export and the int8 file score generated queries and passages against the
fp32 torch model (the source), reported as top-10 agreement and the largest score difference.

Exporting needs torch, transformers and sentence-transformers (the `torch` extra); serving the
result does not. The output is written beside OUT and renamed into place when complete.
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .model_store import CpuFeatures, cpu_features, onnx_preference
from .staging import make_readable, staged

logger = logging.getLogger(__name__)

EXPORT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
REPORT_FILE = "quantize.json"
PARITY_DOCUMENTS = 50  # passages per parity query (top 10 of 50)
# The words parity queries and passages are made of (the generated test models' vocabulary, so
# that they tokenize into real tokens there; any BERT vocabulary has them too).
PARITY_WORDS = """
the of and to in is was for on that with as by at from city capital country france paris
germany berlin europe tower river population largest located known famous built history
century war king government language people world water food health disease treatment study
research science computer software program data model learning search query document rank
relevance passage answer question music art book film game sport team company market price
""".split()


class QuantizeError(Exception):
    """The model can't be exported or quantized; the message is one line naming the fix."""


@dataclass(frozen=True)
class Parity:
    """How an ONNX file scores against the fp32 torch model on the parity set."""

    file: str
    queries: int
    documents: int  # per query
    same_top10_order: int  # queries whose top-10 order equals the fp32 model's
    top10_overlap: float  # mean share of the fp32 model's top 10 also in this file's top 10
    max_abs_diff: float  # largest |score - fp32 score|, scores after the sigmoid
    smallest_top10_gap: float  # the fp32 model's smallest gap between neighbouring top-11 scores


@dataclass(frozen=True)
class QuantizeResult:
    directory: Path
    int8_file: str  # relative to `directory`
    parity: tuple[Parity, ...]


def int8_stem(cpu: CpuFeatures) -> str:
    """The int8 file stem for this CPU: the one `onnx_file = "auto"` tries first here."""
    return onnx_preference(cpu)[0]


def export_onnx(model: Any, path: Path, input_names: Sequence[str] = EXPORT_INPUTS) -> None:
    """A float32 ONNX file of a sequence classifier, dynamic batch and sequence axes."""
    import torch

    ids = torch.ones((2, 8), dtype=torch.long)
    dummy = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dummy["token_type_ids"] = torch.zeros_like(ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes about Python bools are expected here
        torch.onnx.export(
            model,
            (),
            str(path),
            kwargs={n: dummy[n] for n in input_names},
            input_names=list(input_names),
            output_names=["logits"],
            dynamic_axes={
                **{n: {0: "batch", 1: "sequence"} for n in input_names},
                "logits": {0: "batch"},
            },
            opset_version=14,
            dynamo=False,
        )


def quantize_int8(fp32: Path, path: Path, *, unsigned: bool = False) -> None:
    """Dynamic int8 quantization (activations quantized per batch), as FlashRank's and the hub's
    int8 files are."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight_type = QuantType.QUInt8 if unsigned else QuantType.QInt8
    root = logging.getLogger()
    root.addFilter(_no_preprocessing_advice)
    try:
        quantize_dynamic(str(fp32), str(path), weight_type=weight_type)
    finally:
        root.removeFilter(_no_preprocessing_advice)


def _no_preprocessing_advice(record: logging.LogRecord) -> bool:
    """Drop onnxruntime's advice to pre-process before quantizing (moot for these models)."""
    return not record.getMessage().startswith("Please consider")


def input_names_of(config: Any) -> tuple[str, ...]:
    """The inputs a BERT-like classifier takes: token types only where it has several."""
    return EXPORT_INPUTS if getattr(config, "type_vocab_size", 1) > 1 else EXPORT_INPUTS[:2]


def quantize(
    model: str,
    out: Path,
    *,
    cpu: CpuFeatures | None = None,
    parity_queries: int = 10,
    trust_remote_code: bool = False,
) -> QuantizeResult:
    """Export `model` (a directory or hub id of a sentence-transformers cross-encoder) and
    quantize it into `out` (new or empty); returns where the files went and their parity."""
    out = Path(out)
    _check_target(out)
    with staged(out, QuantizeError) as work:
        result = _write(model, work, cpu or cpu_features(), parity_queries, trust_remote_code)
        make_readable(work)
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        work.rename(out)
    return QuantizeResult(out, result.int8_file, result.parity)


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise QuantizeError(f"{out} is a file; fix: name a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise QuantizeError(f"{out} is not empty; fix: name a new or empty directory")


def _load(model: str, trust_remote_code: bool) -> Any:
    from sentence_transformers import CrossEncoder

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return CrossEncoder(model, device="cpu", trust_remote_code=trust_remote_code)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise QuantizeError(
            f"{model} could not be loaded as a sentence-transformers cross-encoder "
            f"({type(exc).__name__}: {first[:200]}); fix: name a local directory or hub id of "
            "a CrossEncoder"
        ) from None


def _write(
    model: str,
    work: Path,
    cpu: CpuFeatures,
    parity_queries: int,
    trust_remote_code: bool,
) -> QuantizeResult:
    encoder = _load(model, trust_remote_code)
    if getattr(encoder.tokenizer, "chat_template", None):
        raise QuantizeError(
            f"{model} has a chat template (an LLM-based reranker); quantize exports plain "
            "(query, document) cross-encoders for kind onnx-cross-encoder; fix: serve it as it "
            'is with kind "cross-encoder" (docs/models.md)'
        )
    classifier = encoder.model.eval()
    encoder.tokenizer.save_pretrained(str(work))
    classifier.config.save_pretrained(str(work))
    _write_special_tokens_map(work)
    classifier.config._attn_implementation = "eager"  # the classic attention graph
    fp32 = work / "onnx" / "model.onnx"
    try:
        export_onnx(classifier, fp32, input_names_of(classifier.config))
    except Exception as exc:
        raise QuantizeError(
            f"{model} could not be exported to ONNX ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); fix: quantize a BERT-like "
            "cross-encoder (BERT, MiniLM, XLM-RoBERTa, ELECTRA)"
        ) from None
    stem = int8_stem(cpu)
    unsigned = "quint8" in stem
    int8 = f"onnx/{stem}.onnx"
    quantize_int8(fp32, work / int8, unsigned=unsigned)
    parity = tuple(measure_parity(encoder, work, [int8], queries=parity_queries))
    report = {"source": model, "cpu_file": int8, "parity": [asdict(p) for p in parity]}
    (work / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return QuantizeResult(work, int8, parity)


def _write_special_tokens_map(directory: Path) -> None:
    """FlashRank's layout reads special_tokens_map.json (transformers 5 no longer writes it), so
    the output also serves as a `flashrank` stage 1."""
    path = directory / "special_tokens_map.json"
    if path.is_file():
        return
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    specials = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
    path.write_text(json.dumps(specials, indent=2), encoding="utf-8")


def parity_set(
    queries: int, documents: int = PARITY_DOCUMENTS, seed: int = 0
) -> list[tuple[str, list[str]]]:
    """Deterministic (query, passages) pairs: passages of 10 to 200 words."""
    rng = random.Random(seed)
    items = []
    for _ in range(queries):
        query = " ".join(rng.choice(PARITY_WORDS) for _ in range(rng.randint(3, 8)))
        passages = [
            " ".join(rng.choice(PARITY_WORDS) for _ in range(rng.choice([10, 30, 60, 120, 200])))
            for _ in range(documents)
        ]
        items.append((query, passages))
    return items


def top10(scores: Sequence[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:10]


def compare(file: str, reference: list[list[float]], scores: list[list[float]]) -> Parity:
    """Parity of `scores` against `reference` (one list of scores per query)."""
    same = sum(top10(a) == top10(b) for a, b in zip(scores, reference, strict=True))
    overlap = sum(
        len(set(top10(a)) & set(top10(b))) / 10 for a, b in zip(scores, reference, strict=True)
    ) / max(1, len(reference))
    pairs = zip(scores, reference, strict=True)
    diff = max((abs(x - y) for a, b in pairs for x, y in zip(a, b, strict=True)), default=0.0)
    gaps = []
    for ref in reference:
        ordered = sorted(ref, reverse=True)[:11]
        gaps += [ordered[i] - ordered[i + 1] for i in range(len(ordered) - 1)]
    return Parity(
        file=file,
        queries=len(reference),
        documents=len(reference[0]) if reference else 0,
        same_top10_order=same,
        top10_overlap=overlap,
        max_abs_diff=float(diff),
        smallest_top10_gap=float(min(gaps, default=0.0)),
    )


def measure_parity(
    encoder: Any, directory: Path, files: Sequence[str], *, queries: int = 10
) -> list[Parity]:
    """Each ONNX file (fp32 export first) against the torch model on `queries` parity queries."""
    import numpy as np

    from .runners.onnx_cross_encoder import OnnxCrossEncoderRunner

    data = parity_set(queries)
    reference = []
    for query, passages in data:
        logits = encoder.predict(
            [(query, p) for p in passages], activation_fn=_identity, show_progress_bar=False
        )
        logits = np.asarray(logits, dtype=np.float64).reshape(len(passages), -1)
        reference.append(_head(logits))
    results = []
    for file in ["onnx/model.onnx", *files]:
        runner = OnnxCrossEncoderRunner(directory, onnx_file=file)
        scores = [runner.score(query, passages) for query, passages in data]
        results.append(compare(file, reference, scores))
    return results


def _identity(x: Any) -> Any:
    return x


def _head(logits: Any) -> list[float]:
    """The onnx-cross-encoder runner's score head: sigmoid of one logit, else softmax's second."""
    import numpy as np

    if logits.shape[1] == 1:
        return [float(s) for s in 1.0 / (1.0 + np.exp(-logits[:, 0]))]
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return [float(s) for s in shifted[:, 1] / shifted.sum(axis=1)]
