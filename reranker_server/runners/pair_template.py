"""A (query, text) pair built from token ids the tokenizer already made (tokenize once).

Stage 1's window plan (engine/windows.py) tokenizes the query and every document alone. A pair's
model input is those ids laid out by the tokenizer's post-processor ([CLS] query [SEP] text [SEP]
for BERT, with type ids), and no truncation when the pair fits `max_length` (the plan makes every
pair fit). `PairTemplate` learns that layout from one pair the tokenizer encodes, so a runner can
build a pair's input from the ids without tokenizing the text again: the same ids and type ids
as `Tokenizer.encode(query, text)` (tests/test_tokenize_once.py compares them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

PROBE = ("hello", "world")  # any two texts that give at least one token each


@dataclass(frozen=True, slots=True)
class PairIds:
    """A pair's model input without an `Encoding`: what `padded_inputs` and `length` read."""

    ids: list[int]
    type_ids: list[int]


# One part of the layout: (None, special token id, type id) or (sequence 0 | 1, None, type id).
_Part = tuple[int | None, int | None, int]


@dataclass(frozen=True)
class PairTemplate:
    """The tokenizer's pair layout: special tokens and where each sequence goes."""

    parts: tuple[_Part, ...]

    @classmethod
    def learn(cls, tokenizer: Tokenizer) -> PairTemplate | None:
        """The layout of `tokenizer`'s pairs; None when it is not a fixed template (each sequence
        once, in one piece, with one type id): then pairs are tokenized as text."""
        alone = tokenizer.encode_batch(list(PROBE), add_special_tokens=False)
        pair = tokenizer.encode(*PROBE)
        parts: list[_Part] = []
        seen: list[int] = []
        position = 0
        sequence_ids = pair.sequence_ids
        while position < len(pair.ids):
            sequence = sequence_ids[position]
            type_id = pair.type_ids[position]
            if sequence is None or pair.special_tokens_mask[position]:
                parts.append((None, pair.ids[position], type_id))
                position += 1
                continue
            end = position
            while end < len(pair.ids) and sequence_ids[end] == sequence:
                end += 1
            if (
                sequence in seen
                or pair.ids[position:end] != alone[sequence].ids
                or len(set(pair.type_ids[position:end])) != 1
            ):
                return None
            seen.append(sequence)
            parts.append((sequence, None, type_id))
            position = end
        return cls(tuple(parts)) if sorted(seen) == [0, 1] else None

    def build(self, query: Sequence[int], text: Sequence[int]) -> PairIds:
        """The pair's ids and type ids (untruncated: the caller checks that it fits)."""
        ids: list[int] = []
        type_ids: list[int] = []
        for sequence, token, type_id in self.parts:
            if sequence is None:
                assert token is not None
                ids.append(token)
                type_ids.append(type_id)
            else:
                piece = query if sequence == 0 else text
                ids.extend(piece)
                type_ids.extend([type_id] * len(piece))
        return PairIds(ids, type_ids)

    @property
    def special_tokens(self) -> int:
        return sum(1 for sequence, _, _ in self.parts if sequence is None)
