"""engine/windows.py tokenizes only the part of a long document its windows can reach (a prefix of
characters, minus the word the cut split; a longer one when that held too few tokens). The plans
must be exactly those of tokenizing every document whole, for any token density and policy."""

from __future__ import annotations

import random
import string
from collections.abc import Iterator, Sequence

import pytest

from reranker_server.engine import windows
from reranker_server.engine.windows import Windower
from reranker_server.model_generator import STAGE1_FILE, WORDS, TestModelPaths
from reranker_server.runners.flashrank import FlashRankRunner
from reranker_server.types import Cancellation, KeepSide, LongDocPolicy, TextTokens

QUERY = "what is the capital of france"


class WholeDocuments(Windower):
    """The reference: every document tokenized whole (what windows.py did before)."""

    def _tokenized(
        self, documents: Sequence[str], needed: int, keep: KeepSide, cancel: Cancellation | None
    ) -> Iterator[tuple[str, TextTokens]]:
        yield from zip(documents, self.encoder.encode_texts(documents), strict=True)


class Counting:
    """The real runner's tokenizer, counting the characters it is given."""

    def __init__(self, runner: FlashRankRunner) -> None:
        self.runner = runner
        self.max_length = runner.max_length
        self.pair_special_tokens = runner.pair_special_tokens
        self.characters = 0

    def encode_texts(self, texts: Sequence[str]) -> list[TextTokens]:
        self.characters += sum(len(t) for t in texts)
        return self.runner.encode_texts(texts)


@pytest.fixture(scope="module")
def stage1(tiny_models: TestModelPaths) -> FlashRankRunner:
    return FlashRankRunner(tiny_models.stage1, tiny_models.stage1 / STAGE1_FILE)


def _text(rng: random.Random, chars: int, word: object) -> str:
    parts: list[str] = []
    while sum(len(p) + 1 for p in parts) < chars:
        parts.append(word())  # type: ignore[operator]
    return " ".join(parts)[:chars]


def documents(rng: random.Random) -> list[str]:
    """Every density: prose, random letters, one token per character, [UNK] words of 40
    characters (a token per 41 characters: the first cut holds too few), accents and CJK, runs
    of whitespace, one giant word, short ones and the empty string."""
    letters = string.ascii_lowercase
    return [
        _text(rng, 10_000, lambda: rng.choice(WORDS)),
        _text(rng, 10_000, lambda: "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))),
        "".join(rng.choice(".,;:!?-") for _ in range(10_000)),
        _text(rng, 10_000, lambda: "\u02ac" + "".join(rng.choice(letters) for _ in range(39))),
        _text(rng, 9_000, lambda: rng.choice(["café", "naïve", "東京", "北京市", "🙂", "x\ty"])),
        _text(rng, 12_000, lambda: rng.choice(WORDS) + rng.choice([" ", "\n\n", "   ", ""])),
        "a" * 20_000,
        _text(rng, 4_200, lambda: rng.choice(WORDS)),  # near the first cut's length
        " ".join(rng.choice(WORDS) for _ in range(30)),
        "",
    ]


POLICIES = [
    LongDocPolicy(mode="truncate"),
    LongDocPolicy(mode="truncate", keep="end"),
    LongDocPolicy(mode="truncate", max_tokens=100),
    LongDocPolicy(mode="truncate", max_tokens=100, keep="end"),
    LongDocPolicy(mode="chunk"),
    LongDocPolicy(mode="chunk", keep="end"),
    LongDocPolicy(mode="chunk", max_chunks=2),
    LongDocPolicy(mode="chunk", max_tokens=600),
    LongDocPolicy(mode="chunk", max_tokens=600, keep="end"),
    LongDocPolicy(mode="chunk", max_tokens=5_000, max_chunks=3),
]


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_plans_equal_those_of_whole_documents(
    stage1: FlashRankRunner, policy: LongDocPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(windows, "GROUP", 3)  # several groups, documents split across them
    docs = documents(random.Random(11))
    for query in (QUERY, " ".join(WORDS[:80])):  # a long query leaves a smaller budget
        expected = WholeDocuments(stage1, max_query_tokens=50).plan(query, docs, policy)
        assert Windower(stage1, max_query_tokens=50).plan(query, docs, policy) == expected


def test_a_truncated_request_tokenizes_a_fraction_of_its_text(stage1: FlashRankRunner) -> None:
    docs = documents(random.Random(3))[:3] * 10  # 30 long documents, 300,000 characters
    counting = Counting(stage1)
    Windower(counting).plan(QUERY, docs, LongDocPolicy(mode="truncate"))
    assert counting.characters < sum(len(d) for d in docs) / 2
