"""Write deterministic, randomly-initialised BERT cross-encoders for offline tests and benchmarks.

    <dir>/flashrank/ms-marco-MiniLM-L-12-v2/   FlashRank's layout: int8 ONNX (`*_Q.onnx`, dynamic
                                               quantization like FlashRank's files), config and
                                               tokenizer files
    <dir>/cross-encoder/                       sentence-transformers' CrossEncoder layout

Tiny by default (2 layers, width 32: seconds to build). `full_size=True` uses the real shapes
(MiniLM-L12-H384 for stage 1, MiniLM-L6-H384 for stage 2) for benchmarks. Nothing is downloaded.
Needs torch, transformers, onnx and onnxruntime (all in the base install).

The models are written into a temporary directory beside `<dir>` and renamed into place, so an
interrupted run never leaves a half-written folder; every file is readable by any user (0644), so
a container running as another uid can read them from a mounted volume.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

STAGE1_NAME = "ms-marco-MiniLM-L-12-v2"
STAGE1_FILE = "flashrank-MiniLM-L-12-v2_Q.onnx"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = """
the of and to in is was for on that with as by at from it be are this an or which his her
their they he she we you not but have has had were been will would can could may one two three
first new city capital country france paris germany berlin europe tower river population
largest most located known famous built history century war king government language people
world water food health disease cancer treatment doctor patient drug study research science
computer software program data model learning machine neural network search query document
rank score relevance passage answer question what where when who how why does do did best
good great small large long short high low time year day week month music art book film game
sport football team player company market price money bank business job work school student
university teacher animal dog cat bird fish tree plant flower sun moon star earth space planet
""".split()


class GeneratorError(Exception):
    """The models can't be written where asked; the message is one line naming the fix."""


@dataclass(frozen=True)
class TestModelPaths:
    """Where `write_test_models` put the two models."""

    __test__ = False  # not a pytest test class

    stage1: Path
    stage2: Path


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    init_range: float = 0.02  # BERT's; tiny models use a wider one so that scores spread out


TINY = Shape(layers=2, hidden=32, heads=2, intermediate=64, init_range=0.5)
STAGE1_FULL = Shape(layers=12, hidden=384, heads=12, intermediate=1536)
STAGE2_FULL = Shape(layers=6, hidden=384, heads=12, intermediate=1536)


def _vocabulary() -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    punctuation = list(".,;:!?'\"()-/&%$#@*+=<>[]{}")
    pieces = ["##" + s for s in letters + digits]
    seen: dict[str, None] = {}
    for token in SPECIAL_TOKENS + letters + digits + punctuation + pieces + WORDS:
        seen.setdefault(token, None)
    return list(seen)


def _write_tokenizer(directory: Path, tokenizer_dir: Path | None) -> int:
    """Tokenizer files FlashRank and transformers both read; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "vocab.txt"):
            shutil.copy(tokenizer_dir / name, directory / name)
        vocab = (directory / "vocab.txt").read_text(encoding="utf-8").splitlines()
    else:
        vocab = _vocabulary()
        (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        ids = {token: i for i, token in enumerate(vocab)}
        tokenizer = Tokenizer(WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
        )
        tokenizer.decoder = decoders.WordPiece()
        tokenizer.save(str(directory / "tokenizer.json"))
    specials = {
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    tokenizer_config = {
        **specials,
        "model_max_length": 512,
        "do_lower_case": True,
        "tokenizer_class": "BertTokenizer",
        "clean_up_tokenization_spaces": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return len(vocab)


def _bert(shape: Shape, vocab_size: int, seed: int):  # type: ignore[no-untyped-def]
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(  # type: ignore[call-arg]
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=0,
        initializer_range=shape.init_range,
    )
    config._attn_implementation = "eager"  # classic attention graph, as in FlashRank's files
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval()


def _export_int8(model, path: Path) -> None:  # type: ignore[no-untyped-def]
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.ones((2, 8), dtype=torch.long)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes about Python bools are expected here
        fp32 = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model,
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            str(fp32),
            input_names=names,
            output_names=["logits"],
            dynamic_axes={
                **{n: {0: "batch", 1: "sequence"} for n in names},
                "logits": {0: "batch"},
            },
            opset_version=14,
            dynamo=False,
        )
        root = logging.getLogger()
        root.addFilter(_no_preprocessing_advice)
        try:
            quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)
        finally:
            root.removeFilter(_no_preprocessing_advice)


def _no_preprocessing_advice(record: logging.LogRecord) -> bool:
    """Drop onnxruntime's advice to pre-process before quantizing (moot for these models)."""
    return not record.getMessage().startswith("Please consider")


def write_test_models(
    directory: Path, *, full_size: bool = False, tokenizer_dir: Path | None = None, seed: int = 0
) -> TestModelPaths:
    """Write both models under `directory` (new, empty, or an earlier output) and return their
    paths."""
    directory = Path(directory)
    _check_target(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    except OSError as exc:
        raise GeneratorError(
            f"can't write under {directory.parent} ({exc.strerror}); fix: name a directory "
            "you can write to"
        ) from None
    try:
        _write_models(work, full_size=full_size, tokenizer_dir=tokenizer_dir, seed=seed)
        _make_readable(work)
        _move_into_place(work, directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("test models written to %s", directory)
    return TestModelPaths(
        stage1=directory / "flashrank" / STAGE1_NAME, stage2=directory / "cross-encoder"
    )


OUTPUT_NAMES = {"flashrank", "cross-encoder"}


def _check_target(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise GeneratorError(f"{directory} is a file; fix: name a new directory")
    if directory.is_dir():
        others = sorted(p.name for p in directory.iterdir() if p.name not in OUTPUT_NAMES)
        if others:
            raise GeneratorError(
                f"{directory} already holds other files ({', '.join(others[:3])}); fix: name a "
                "new or empty directory"
            )


def _move_into_place(work: Path, directory: Path) -> None:
    """Rename `work` to `directory`; an earlier output there is replaced."""
    old = None
    if directory.is_dir() and any(directory.iterdir()):
        old = directory.with_name(f".{directory.name}-old-{os.getpid()}")
        directory.rename(old)
    elif directory.is_dir():
        directory.rmdir()
    work.rename(directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_readable(root: Path) -> None:
    """Directories 0755 and files 0644 (some writers, safetensors among them, create 0600)."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _write_models(
    directory: Path, *, full_size: bool, tokenizer_dir: Path | None, seed: int
) -> None:
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # "Writing model shards" for a 100 kB file
    try:
        _write_both(directory, full_size=full_size, tokenizer_dir=tokenizer_dir, seed=seed)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


def _write_both(directory: Path, *, full_size: bool, tokenizer_dir: Path | None, seed: int) -> None:
    from sentence_transformers import CrossEncoder

    stage1 = directory / "flashrank" / STAGE1_NAME
    stage2 = directory / "cross-encoder"
    vocab_size = _write_tokenizer(stage1, tokenizer_dir)

    model1 = _bert(STAGE1_FULL if full_size else TINY, vocab_size, seed)
    model1.config.to_json_file(str(stage1 / "config.json"))
    _export_int8(model1, stage1 / STAGE1_FILE)

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp)
        _bert(STAGE2_FULL if full_size else TINY, vocab_size, seed + 1).save_pretrained(raw)
        for name in (
            "tokenizer.json",
            "vocab.txt",
            "special_tokens_map.json",
            "tokenizer_config.json",
        ):
            shutil.copy(stage1 / name, raw / name)
        CrossEncoder(str(raw), device="cpu", local_files_only=True).save(str(stage2))
