"""Write deterministic, randomly-initialised BERT cross-encoders for offline tests and benchmarks.

    <dir>/flashrank/ms-marco-MiniLM-L-12-v2/   FlashRank's layout: int8 ONNX (`*_Q.onnx`, dynamic
                                               quantization like FlashRank's files), config and
                                               tokenizer files
    <dir>/cross-encoder/                       sentence-transformers' CrossEncoder layout

Tiny by default (2 layers, width 32: seconds to build). `full_size=True` uses the real shapes
(MiniLM-L12-H384 for stage 1, MiniLM-L6-H384 for stage 2) for benchmarks. Nothing is downloaded.
Needs torch, transformers, onnx and onnxruntime (the `dev` extra has onnx).
"""

from __future__ import annotations

import json
import logging
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
        quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)


def write_test_models(
    directory: Path, *, full_size: bool = False, tokenizer_dir: Path | None = None, seed: int = 0
) -> TestModelPaths:
    """Write both models under `directory` and return their paths."""
    from sentence_transformers import CrossEncoder

    directory = Path(directory)
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
    logger.info("test models written to %s", directory)
    return TestModelPaths(stage1=stage1, stage2=stage2)
