"""The padded input tensors of a batch of tokenized pairs, for an ONNX cross-encoder (shared by
the FlashRank and ONNX cross-encoder runners)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
from tokenizers import Encoding

from .pair_template import PairIds


def padded_inputs(
    encodings: Sequence[Encoding | PairIds], pad_id: int, input_names: Collection[str]
) -> dict[str, np.ndarray]:
    """`input_ids`, `attention_mask` and `token_type_ids` (those the model takes), padded on the
    right to the batch's longest pair."""
    shape = (len(encodings), max(len(e.ids) for e in encodings))
    tensors = {
        "input_ids": np.full(shape, pad_id, dtype=np.int64),
        "attention_mask": np.zeros(shape, dtype=np.int64),
        "token_type_ids": np.zeros(shape, dtype=np.int64),
    }
    for row, encoding in enumerate(encodings):
        n = len(encoding.ids)
        tensors["input_ids"][row, :n] = encoding.ids
        tensors["attention_mask"][row, :n] = 1
        tensors["token_type_ids"][row, :n] = encoding.type_ids
    return {name: tensor for name, tensor in tensors.items() if name in input_names}
