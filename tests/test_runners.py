"""Runners against the reference libraries, on generated models."""

from __future__ import annotations

import numpy as np
import pytest
from flashrank import Ranker, RerankRequest
from sentence_transformers import CrossEncoder

from reranker_server.model_generator import STAGE1_FILE, TestModelPaths
from reranker_server.runners.cross_encoder import CrossEncoderRunner
from reranker_server.runners.flashrank import FlashRankRunner, plan_batches

QUERY = "what is the capital of france"
PASSAGES = [
    "paris is the capital of france",
    "berlin is the capital of germany",
    "the eiffel tower is a famous tower in paris",
    "music and art and film",
    "a dog and a cat are animals",
    "the river in the city",
    "",
]


def flashrank_runner(models: TestModelPaths, **kwargs: int) -> FlashRankRunner:
    return FlashRankRunner(models.stage1, models.stage1 / STAGE1_FILE, **kwargs)


def flashrank_alone(models: TestModelPaths, passages: list[str]) -> list[float]:
    """flashrank.Ranker's score of each passage scored alone (a group of one)."""
    ranker = Ranker(model_name=models.stage1.name, cache_dir=str(models.stage1.parent))
    return [
        float(ranker.rerank(RerankRequest(query=QUERY, passages=[{"text": t}]))[0]["score"])
        for t in passages
    ]


def test_flashrank_scores_equal_flashrank_itself(tiny_models: TestModelPaths) -> None:
    """Parity with FlashRank on single passages: each score is FlashRank's for that passage alone.

    For a larger group FlashRank's own scores move with the group (its int8 model quantizes the
    whole padded batch with one scale); ours do not (see the batch-invariance tests), so they
    equal FlashRank's group-of-one scores, not its group scores.
    """
    expected = flashrank_alone(tiny_models, PASSAGES)

    ours = flashrank_runner(tiny_models).score(QUERY, PASSAGES)

    assert ours == pytest.approx(expected, abs=1e-5)
    assert len(set(np.round(ours, 4))) > 3, "generated model should spread scores"
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in ours)


def test_flashrank_group_scores_depend_on_batch_mates(tiny_models: TestModelPaths) -> None:
    """Why stage 1 runs int8 pairs alone: in one FlashRank batch a passage's score moves."""
    ranker = Ranker(model_name=tiny_models.stage1.name, cache_dir=str(tiny_models.stage1.parent))
    passages = [{"id": i, "text": t} for i, t in enumerate(PASSAGES)]
    grouped = {p["id"]: float(p["score"]) for p in ranker.rerank(RerankRequest(QUERY, passages))}
    alone = flashrank_alone(tiny_models, PASSAGES)
    assert max(abs(grouped[i] - alone[i]) for i in range(len(PASSAGES))) > 1e-3
    assert flashrank_runner(tiny_models).max_pairs == 1  # so ours runs each pair alone


def test_stage1_scores_do_not_depend_on_batch_mates(tiny_models: TestModelPaths) -> None:
    """A passage scores the same alone, in a request with others, and with other batch-mates."""
    runner = flashrank_runner(tiny_models)
    target = PASSAGES[0]
    alone = runner.score(QUERY, [target])[0]
    for mates in (PASSAGES[1:], PASSAGES[4:], ["a long " * 60, "x"], [target] * 5):
        with_mates = runner.score(QUERY, [*mates, target])[-1]
        assert with_mates == pytest.approx(alone, abs=1e-5)
    other_query = runner.score_pairs([("something else", "dog"), (QUERY, target)])[1]
    assert other_query == pytest.approx(alone, abs=1e-5)


def test_flashrank_does_not_mutate_input(tiny_models: TestModelPaths) -> None:
    docs = list(PASSAGES)
    flashrank_runner(tiny_models).score(QUERY, docs)
    assert docs == PASSAGES


def test_bounded_batches_equal_flashrank_on_the_same_groups(tiny_models: TestModelPaths) -> None:
    """With a budget that fits one pair per batch, each score equals FlashRank scoring it alone."""
    chunked = flashrank_runner(tiny_models, batch_tokens=16).score(QUERY, PASSAGES)
    assert chunked == pytest.approx(flashrank_alone(tiny_models, PASSAGES), abs=1e-5)


def test_plan_batches_caps_pairs() -> None:
    assert plan_batches([5, 4, 3], 10_000, max_pairs=1) == [[0], [1], [2]]
    assert plan_batches([5, 4, 3], 10_000, max_pairs=2) == [[0, 1], [2]]


@pytest.mark.parametrize(
    ("lengths", "budget"),
    [([512] * 40, 8192), ([5, 300, 12, 512, 77, 512, 3] * 20, 2048), ([600], 512), ([], 100)],
)
def test_plan_batches_bounds_padded_tokens(lengths: list[int], budget: int) -> None:
    batches = plan_batches(lengths, budget)
    seen = sorted(i for batch in batches for i in batch)
    assert seen == list(range(len(lengths)))  # every item exactly once
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert len(batch) == 1 or width * len(batch) <= budget
        # longest first: little padding
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)


def test_cross_encoder_scores_equal_predict_plus_sigmoid(tiny_models: TestModelPaths) -> None:
    model = CrossEncoder(str(tiny_models.stage2), device="cpu")
    logits = model.predict(
        [(QUERY, p) for p in PASSAGES], activation_fn=lambda x: x, show_progress_bar=False
    )
    expected = 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))

    ours = CrossEncoderRunner(str(tiny_models.stage2), batch_size=3).score(QUERY, PASSAGES)

    assert ours == pytest.approx(expected.tolist(), abs=1e-5)
    assert len(set(np.round(ours, 4))) > 3
    assert all(isinstance(s, float) for s in ours)
