"""Write deterministic, randomly-initialised rerankers for offline tests and benchmarks.

    <dir>/flashrank/ms-marco-MiniLM-L-12-v2/   FlashRank's layout: int8 ONNX (`*_Q.onnx`, dynamic
                                               quantization like FlashRank's files), config and
                                               tokenizer files
    <dir>/cross-encoder/                       sentence-transformers' CrossEncoder layout
    <dir>/onnx-cross-encoder/                  (onnx=True) the same cross-encoder as a hub ONNX
                                               export: onnx/model.onnx (fp32) and int8 variants
                                               named as on the hub (ONNX_VARIANTS), no torch weights

Tiny by default (2 layers, width 32: seconds to build). `full_size=True` uses the real shapes
(MiniLM-L12-H384 for stage 1, MiniLM-L6-H384 for stage 2) for benchmarks. Nothing is downloaded.

The coverage matrix (tests/test_model_matrix.py) uses `write_family` (one tiny stage-2 model per
architecture the server supports: STAGE2_FAMILIES) and `write_flashrank_layout` (each FlashRank
pairwise model's file layout). Needs torch, transformers, onnx and onnxruntime (the `dev` extra).

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .quantize import EXPORT_INPUTS, export_onnx, quantize_int8
from .staging import make_readable, staged

logger = logging.getLogger(__name__)

STAGE1_NAME = "ms-marco-MiniLM-L-12-v2"
STAGE1_FILE = "flashrank-MiniLM-L-12-v2_Q.onnx"
BERT_INPUTS = EXPORT_INPUTS
# int8 files of a hub ONNX export (name -> unsigned weights), as sentence-transformers names them
ONNX_VARIANTS = {"model_qint8_avx512_vnni.onnx": False, "model_quint8_avx2.onnx": True}
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
    """Where `write_test_models` put the models (`onnx`: the stage-2 model's ONNX export)."""

    __test__ = False  # not a pytest test class

    stage1: Path
    stage2: Path
    onnx: Path | None = None


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


def _export_int8(model, path: Path, input_names: Sequence[str] = BERT_INPUTS) -> None:  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.onnx"
        export_onnx(model, fp32, input_names)
        quantize_int8(fp32, path)


def write_onnx_export(source: Path, target: Path, model: Any = None) -> Path:
    """The sequence classifier in `source` (or `model`, already loaded) as a hub ONNX export in
    `target`: its config, tokenizer and template files, onnx/model.onnx (fp32) and the int8
    variants of ONNX_VARIANTS. No torch weights: only an ONNX runner can load it."""
    if model is None:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(source)).eval()
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.suffix in (".json", ".txt", ".model", ".jinja"):
            shutil.copy(path, target / path.name)
    model.config._attn_implementation = "eager"  # the classic attention graph
    fp32 = target / "onnx" / "model.onnx"
    inputs = BERT_INPUTS if model.config.type_vocab_size > 1 else BERT_INPUTS[:2]
    export_onnx(model, fp32, inputs)
    for name, unsigned in ONNX_VARIANTS.items():
        quantize_int8(fp32, target / "onnx" / name, unsigned=unsigned)
    return target


# --- the coverage matrix: one tiny model per supported architecture --------------------------

STAGE2_FAMILIES = (
    "bert",  # ms-marco-MiniLM-L-6-v2, the default stage 2
    "bert-2-label",  # (not relevant, relevant) heads: softmax
    "xlm-roberta",  # bge-reranker-v2-m3 (multilingual)
    "electra",  # ms-marco-electra-base
    "modernbert",  # gte-reranker-modernbert-base
    "deberta-v2",  # mxbai-rerank-*-v1
    "qwen3",  # Qwen3-Reranker seq-cls conversions, without a chat template
    "qwen3-template",  # ... with Qwen3-Reranker's prompt in chat_template.jinja
)
# Qwen3-Reranker's documented prompt (model card of Qwen/Qwen3-Reranker-0.6B: system line,
# then "<Instruct>: / <Query>: / <Document>:", then an empty think block), as a chat template over
# sentence-transformers' pair roles: `query`, `document`, and `system` for the instruction.
QWEN3_RERANKER_TEMPLATE = """\
{%- set instruction = messages | selectattr("role", "eq", "system") | map(attribute="content") \
| first | default("Given a web search query, retrieve relevant passages that answer the query") -%}
{%- set query = messages | selectattr("role", "eq", "query") | map(attribute="content") | first -%}
{%- set document = messages | selectattr("role", "eq", "document") | map(attribute="content") \
| first -%}
<|im_start|>system
Judge whether the Document meets the requirements based on the Query and the Instruct provided. \
Note that the answer can only be "yes" or "no".<|im_end|>
<|im_start|>user
<Instruct>: {{ instruction }}
<Query>: {{ query }}
<Document>: {{ document }}<|im_end|>
<|im_start|>assistant
<think>

</think>

"""
# A plain ChatML template: renders system/user/assistant turns, drops other roles, so it
# cannot carry a (query, document) pair (the error case).
CHATML_TEMPLATE = """\
{%- for message in messages if message.role in ("system", "user", "assistant") -%}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor -%}
<|im_start|>assistant
"""
FLASHRANK_T5 = "rank-T5-flan"


def _pieces(specials: Sequence[str], mask: str) -> list[tuple[str, float]]:
    """A small sentencepiece-style Unigram vocabulary: specials first, then words and letters."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    letters += list(".,;:!?'\"()-/")
    words = ["\u2581", *("\u2581" + w for w in WORDS), *letters, *("\u2581" + c for c in letters)]
    seen: dict[str, None] = {}
    for piece in [*specials, *words, mask]:
        seen.setdefault(piece, None)
    special = {*specials, mask}
    return [(p, 0.0 if p in special else -1.0 - (i % 7)) for i, p in enumerate(seen)]


def _save_tokenizer(family: str, directory: Path) -> int:
    """The family's own tokenizer class, saved as transformers saves it; returns its size."""
    if family in ("bert", "bert-2-label", "electra", "modernbert"):
        size = _write_tokenizer(directory, None)
        if family == "modernbert":  # a generic fast tokenizer, as gte-reranker-modernbert's
            config_file = directory / "tokenizer_config.json"
            config = json.loads(config_file.read_text(encoding="utf-8"))
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
        return size
    tokenizer: Any
    if family == "xlm-roberta":
        from transformers import XLMRobertaTokenizer

        tokenizer = XLMRobertaTokenizer(vocab=_pieces(["<s>", "<pad>", "</s>", "<unk>"], "<mask>"))
    elif family == "deberta-v2":
        from transformers import DebertaV2Tokenizer

        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        tokenizer = DebertaV2Tokenizer(vocab=_pieces(specials, "[MASK]"), unk_id=1)
    elif family == FLASHRANK_T5:
        from transformers import T5Tokenizer

        tokenizer = T5Tokenizer(vocab=_pieces(["<pad>", "</s>", "<unk>"], "<unk>"), extra_ids=0)
    else:  # qwen3: byte-level BPE over single bytes (no merges), ChatML special tokens
        from transformers import Qwen2Tokenizer
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        alphabet = list(bytes_to_unicode().values())
        tokenizer = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(alphabet)}, merges=[])
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(str(directory))
    return len(tokenizer)


def _family_model(family: str, vocab_size: int, pad_id: int, seed: int):  # type: ignore[no-untyped-def]
    """A tiny randomly initialised sequence classifier of the family's architecture."""
    import torch
    import transformers as tf

    config: Any
    model_class: Any
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": TINY.hidden,
        "num_hidden_layers": TINY.layers,
        "num_attention_heads": TINY.heads,
        "intermediate_size": TINY.intermediate,
        "num_labels": 2 if family == "bert-2-label" else 1,
        "pad_token_id": pad_id,
        "initializer_range": TINY.init_range,
    }
    if family in ("bert", "bert-2-label"):
        config = tf.BertConfig(max_position_embeddings=512, **common)
        model_class = tf.BertForSequenceClassification
    elif family == "xlm-roberta":
        config = tf.XLMRobertaConfig(
            max_position_embeddings=514, type_vocab_size=1, bos_token_id=0, eos_token_id=2, **common
        )
        model_class = tf.XLMRobertaForSequenceClassification
    elif family == "electra":
        config = tf.ElectraConfig(embedding_size=TINY.hidden, max_position_embeddings=512, **common)
        model_class = tf.ElectraForSequenceClassification
    elif family == "modernbert":
        config = tf.ModernBertConfig(  # type: ignore[call-arg]
            max_position_embeddings=512,
            global_attn_every_n_layers=1,
            local_attention=64,
            cls_token_id=2,
            sep_token_id=3,
            bos_token_id=2,
            eos_token_id=3,
            **common,
        )
        model_class = tf.ModernBertForSequenceClassification
    elif family == "deberta-v2":
        config = tf.DebertaV2Config(  # type: ignore[call-arg]
            max_position_embeddings=512,
            relative_attention=True,
            position_buckets=32,
            pos_att_type=["p2c", "c2p"],
            **common,
        )
        model_class = tf.DebertaV2ForSequenceClassification
    else:  # qwen3, qwen3-template
        config = tf.Qwen3Config(
            max_position_embeddings=512,
            num_key_value_heads=1,
            head_dim=TINY.hidden // TINY.heads,
            tie_word_embeddings=False,
            **common,
        )
        model_class = tf.Qwen3ForSequenceClassification
    torch.manual_seed(seed)
    return model_class(config).eval()


def write_family(
    directory: Path, family: str, *, seed: int = 0, template: str | None = None
) -> Path:
    """One tiny stage-2 model of `family` (STAGE2_FAMILIES) in `directory`, saved as transformers
    saves it (config, model.safetensors, the family's tokenizer files); `template` overrides the
    chat_template.jinja that qwen3-template gets."""
    if family not in STAGE2_FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(STAGE2_FAMILIES)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = _save_tokenizer(family, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    pad_id = _pad_id(directory, config)
    _family_model(family, vocab_size, pad_id, seed).save_pretrained(str(directory))
    if family == "qwen3-template" or template is not None:
        (directory / "chat_template.jinja").write_text(
            template or QWEN3_RERANKER_TEMPLATE, encoding="utf-8"
        )
    return directory


def _pad_id(directory: Path, tokenizer_config: dict[str, object]) -> int:
    from tokenizers import Tokenizer

    pad = tokenizer_config.get("pad_token") or "[PAD]"
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    found = tokenizer.token_to_id(str(pad))
    return int(found) if found is not None else 0


def _t5_ranker(vocab_size: int, seed: int):  # type: ignore[no-untyped-def]
    """A T5 encoder with a one-logit head: rank-T5's shape as a pairwise scorer."""
    import torch
    from transformers import T5Config, T5EncoderModel

    class T5Ranker(torch.nn.Module):
        def __init__(self, config: T5Config) -> None:
            super().__init__()
            self.config = config
            self.encoder = T5EncoderModel(config)
            self.head = torch.nn.Linear(config.d_model, 1)

        def forward(self, input_ids, attention_mask):  # type: ignore[no-untyped-def]
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
            return self.head(hidden[:, 0])

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=TINY.hidden,
        d_kv=TINY.hidden // TINY.heads,
        d_ff=TINY.intermediate,
        num_layers=TINY.layers,
        num_heads=TINY.heads,
        pad_token_id=0,
        eos_token_id=1,
        initializer_factor=5.0,
    )
    return T5Ranker(config).eval()


def write_flashrank_layout(directory: Path, name: str, *, seed: int = 0) -> Path:
    """FlashRank's layout for the pairwise model `name` (flashrank.Config.model_file_map): its
    ONNX file name (int8 for `*_Q.onnx`, else fp32), config and tokenizer files, a tiny model."""
    from flashrank.Config import listwise_rankers, model_file_map

    if name not in model_file_map or name in listwise_rankers:
        raise ValueError(f"{name!r} is not a FlashRank pairwise model")
    target = Path(directory) / name
    onnx_file = target / model_file_map[name]
    if name == FLASHRANK_T5:
        vocab_size = _save_tokenizer(FLASHRANK_T5, target)
        model = _t5_ranker(vocab_size, seed)
        model.config.to_json_file(str(target / "config.json"))
        inputs: Sequence[str] = ("input_ids", "attention_mask")
    else:
        vocab_size = _write_tokenizer(target, None)
        model = _bert(TINY, vocab_size, seed)
        model.config.to_json_file(str(target / "config.json"))
        inputs = BERT_INPUTS
    _write_special_tokens_map(target)
    if onnx_file.stem.endswith("_Q"):
        _export_int8(model, onnx_file, inputs)
    else:
        export_onnx(model, onnx_file, inputs)
    return target


def _write_special_tokens_map(directory: Path) -> None:
    """FlashRank reads special_tokens_map.json (transformers 5 no longer writes it)."""
    path = directory / "special_tokens_map.json"
    if path.is_file():
        return
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    specials = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
    path.write_text(json.dumps(specials, indent=2), encoding="utf-8")


ONNX_FAMILIES = ("bert", "bert-2-label", "xlm-roberta")


def flashrank_pairwise_names() -> list[str]:
    """FlashRank's pairwise models (the layouts `write_flashrank_layout` writes)."""
    from flashrank.Config import listwise_rankers, model_file_map

    return sorted(n for n in model_file_map if n not in listwise_rankers)


def write_matrix(directory: Path, *, seed: int = 0) -> dict[str, Path]:
    """The whole coverage matrix under `directory`: `<family>` for STAGE2_FAMILIES,
    `flashrank/<name>` for FlashRank's pairwise layouts, `onnx/<family>` for the ONNX exports of
    ONNX_FAMILIES. Returns those relative names -> directories."""
    directory = Path(directory)
    paths = {f: write_family(directory / f, f, seed=seed) for f in STAGE2_FAMILIES}
    for name in flashrank_pairwise_names():
        paths[f"flashrank/{name}"] = write_flashrank_layout(
            directory / "flashrank", name, seed=seed
        )
    for family in ONNX_FAMILIES:
        paths[f"onnx/{family}"] = write_onnx_export(paths[family], directory / "onnx" / family)
    return paths


def write_test_models(
    directory: Path,
    *,
    full_size: bool = False,
    tokenizer_dir: Path | None = None,
    seed: int = 0,
    onnx: bool = False,
) -> TestModelPaths:
    """Write both models (and with `onnx` the stage-2 model's ONNX export) under `directory`
    (new, empty, or an earlier output) and return their paths."""
    directory = Path(directory)
    _check_target(directory)
    with staged(directory, GeneratorError) as work:
        _write_models(work, full_size=full_size, tokenizer_dir=tokenizer_dir, seed=seed, onnx=onnx)
        make_readable(work)
        _move_into_place(work, directory)
    logger.info("test models written to %s", directory)
    exported = directory / "onnx-cross-encoder"
    return TestModelPaths(
        stage1=directory / "flashrank" / STAGE1_NAME,
        stage2=directory / "cross-encoder",
        onnx=exported if onnx else None,
    )


# What a run writes, replaced when found (with "stage1-cross-encoder", which earlier versions wrote)
OUTPUT_NAMES = {
    "flashrank",
    "cross-encoder",
    "onnx-cross-encoder",
    "matrix",
    "stage1-cross-encoder",
}


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


def _write_models(
    directory: Path, *, full_size: bool, tokenizer_dir: Path | None, seed: int, onnx: bool
) -> None:
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # "Writing model shards" for a 100 kB file
    try:
        _write_both(
            directory, full_size=full_size, tokenizer_dir=tokenizer_dir, seed=seed, onnx=onnx
        )
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


def _write_both(
    directory: Path, *, full_size: bool, tokenizer_dir: Path | None, seed: int, onnx: bool
) -> None:
    stage1 = directory / "flashrank" / STAGE1_NAME
    stage2 = directory / "cross-encoder"
    vocab_size = _write_tokenizer(stage1, tokenizer_dir)

    model1 = _bert(STAGE1_FULL if full_size else TINY, vocab_size, seed)
    model1.config.to_json_file(str(stage1 / "config.json"))
    _export_int8(model1, stage1 / STAGE1_FILE)

    model2 = _bert(STAGE2_FULL if full_size else TINY, vocab_size, seed + 1)
    _save_cross_encoder(model2, stage1, stage2)
    if onnx:
        write_onnx_export(stage2, directory / "onnx-cross-encoder", model2)


def _save_cross_encoder(model, tokenizer_dir: Path, target: Path) -> None:  # type: ignore[no-untyped-def]
    """`model` with the tokenizer files in `tokenizer_dir`, saved by sentence-transformers."""
    from sentence_transformers import CrossEncoder

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp)
        model.save_pretrained(raw)
        for name in (
            "tokenizer.json",
            "vocab.txt",
            "special_tokens_map.json",
            "tokenizer_config.json",
        ):
            shutil.copy(tokenizer_dir / name, raw / name)
        CrossEncoder(str(raw), device="cpu", local_files_only=True).save(str(target))
