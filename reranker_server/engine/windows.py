"""Long documents: the windows of text each stage scores (per request, see `LongDocPolicy`).

A cross-encoder reads at most `max_length` tokens of query + document. `Windower.plan` tokenizes
the query once and every document once with the stage-1 model's tokenizer, then turns each
document into the texts the stages score:

- a document that fits beside the query is scored whole;
- `truncate`: one window, the document's first tokens that fit (its last ones with keep="end");
- `chunk`: overlapping windows that fit, at most `max_chunks`; the document's score is its best
  window's score (`WindowPlan.best`), in stage 1 and again in stage 2.

Windows are substrings of the document cut at word boundaries, and the runners keep their contract
(query + texts -> scores): the score cache keys on the window text, and a stage-2 model sees the
same window. With a BERT (word-local) tokenizer, tokenizing a window again gives exactly its
tokens; a sentencepiece tokenizer marks a text's first word, so there a window's own tokens can
differ from its slice of the document's at the cut (the window's text is what is scored, and the
ONNX runners tokenize such windows alone: `word_local_tokens`). A query
longer than `max_query_tokens` is cut to that many tokens; the document gets the rest.

Memory: only text the windows can reach is tokenized. A policy decides from a document's first
`needed_tokens` tokens (its last ones with keep="end"), so a long document is tokenized from a
prefix of characters (`prefix_chars`), minus the word the cut may have split; when that gives too
few whole-word tokens (dense text, long words), from a four times longer prefix, up to the whole
document. Documents go through the tokenizer `GROUP` at a time (the first groups smaller:
`FIRST_GROUP`, doubling). A request of 1,000 documents of 16,000 one-token characters thus holds
~64 x 4,000 token offsets at once, not 16 million (bench/memory.py).

Tokenize once: when the encoder can build stage 1's pairs from token ids (`PairTokenizer`: the
ONNX runners, runners/onnx_base.py), the plan carries each window's pair, made from the ids it
tokenized (`WindowPlan.items`), and the scheduler queues those instead of tokenizing the pairs
again. A
`sink` gets each group's windows as soon as they are planned, so the engine queues them while the
next group is tokenized (the compute threads start at once).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import InvalidRequestError, raise_if_cancelled
from ..types import Cancellation, KeepSide, LongDocPolicy, TextTokens

Span = tuple[int, int]

GROUP = 64  # documents tokenized together (bounds the token arrays alive at once)
FIRST_GROUP = 8  # the first group's documents: stage 1 starts after these (then 16, 32, 64, ...)
CHARS_PER_TOKEN = 8  # first guess of the characters that hold a token (English: 4-7)


class TextEncoder(Protocol):
    """The tokenizer side of the stage-1 runner (FlashRankRunner has it)."""

    max_length: int  # tokens of query + document, special tokens included
    pair_special_tokens: int  # special tokens a (query, document) pair adds

    def encode_texts(self, texts: Sequence[str]) -> list[TextTokens]: ...


@runtime_checkable
class PairTokenizer(Protocol):
    """A stage-1 runner that builds its pair items from token ids (FlashRankRunner has it)."""

    word_local_tokens: bool  # a text cut at word boundaries tokenizes as that slice of tokens

    def prepare_tokens(
        self,
        query: str,
        query_ids: list[int] | None,
        texts: Sequence[str],
        ids: Sequence[list[int] | None],
    ) -> list[Any] | None: ...


@dataclass(frozen=True)
class WindowPlan:
    """What the stages score for one request: every window of every document, in order."""

    query: str  # the query as scored (cut to max_query_tokens when longer)
    texts: list[str]  # window texts
    owners: list[int]  # the document each window belongs to
    spans: list[Span | None]  # characters of each window in its document; None: all of it
    windows_of: list[list[int]]  # per document, the positions of its windows
    pair_tokens: list[int] | None = None  # tokens of each (query, window) pair; None: not counted
    # Stage 1's item of each (query, window) pair, from the plan's own tokens (tokenize once);
    # None: the scheduler tokenizes the pairs.
    items: list[Any] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def whole(cls, query: str, documents: Sequence[str]) -> WindowPlan:
        """Every document scored whole, as it is (no tokenizer: the runners truncate)."""
        count = len(documents)
        return cls(
            query, list(documents), list(range(count)), [None] * count, [[i] for i in range(count)]
        )

    def best(
        self, positions: Sequence[int], scores: Sequence[float]
    ) -> dict[int, tuple[float, int]]:
        """Per document: the best score among the scored windows `positions` and that window
        (the first on ties)."""
        found: dict[int, tuple[float, int]] = {}
        for window, score in zip(positions, scores, strict=True):
            doc = self.owners[window]
            if doc not in found or score > found[doc][0]:
                found[doc] = (score, window)
        return found


# Gets each group's new windows as soon as they are planned: the query as scored, the windows'
# texts and stage 1's items of them (None: the plan has no items).
Sink = Callable[[str, Sequence[str], Sequence[Any] | None], None]


class _PairItems:
    """Stage 1's items of a plan's windows, built from the ids the plan tokenized, a group at a
    time: a whole document's ids always (they are the tokenizer's own encoding of that text), a
    window's and a cut query's when the tokenizer is word-local (else the runner tokenizes that
    text alone). `items` is None when the encoder can't build pairs."""

    def __init__(
        self, encoder: TextEncoder, query: str, query_tokens: TextTokens, query_length: int
    ) -> None:
        self.builder = encoder if isinstance(encoder, PairTokenizer) else None
        self.local = self.builder is not None and self.builder.word_local_tokens
        self.query = query
        ids = query_tokens.ids
        self.query_ids = (
            ids if ids is None or len(ids) == query_length else self.cut(ids, 0, query_length)
        )
        self.items: list[Any] | None = [] if self.builder is not None else None
        self._ids: list[list[int] | None] = []  # of the windows since the last `made`

    def cut(self, ids: list[int] | None, start: int, end: int) -> list[int] | None:
        return ids[start:end] if ids is not None and self.local else None

    def window(self, ids: list[int] | None) -> None:
        self._ids.append(ids)

    def made(self, texts: Sequence[str]) -> list[Any] | None:
        """The items of the windows `texts` (those since the last call)."""
        ids, self._ids = self._ids, []
        if self.items is None or self.builder is None:
            return None
        made = self.builder.prepare_tokens(self.query, self.query_ids, texts, ids)
        if made is None:
            self.items = None
            return None
        self.items += made
        return made


class Windower:
    """Plans the windows of a request with the stage-1 tokenizer."""

    def __init__(
        self, encoder: TextEncoder, *, max_query_tokens: int = 256, overlap_tokens: int = 64
    ) -> None:
        self.encoder = encoder
        room = encoder.max_length - encoder.pair_special_tokens
        self.max_query_tokens = max(1, min(max_query_tokens, room - 1))
        self.overlap_tokens = max(0, overlap_tokens)

    def plan(
        self,
        query: str,
        documents: Sequence[str],
        policy: LongDocPolicy,
        cancel: Cancellation | None = None,
        sink: Sink | None = None,
    ) -> WindowPlan:
        """The windows of `documents` under `policy`; InvalidRequestError past `max_windows`,
        RequestCancelledError once `cancel` is set. `sink`: gets each group's windows as soon as
        they are planned (see `Sink`)."""
        (query_tokens,) = self.encoder.encode_texts([query])  # the query, once per request
        query, query_length = self._capped_query(query, query_tokens)
        overhead = query_length + self.encoder.pair_special_tokens
        budget = max(1, self.encoder.max_length - overhead)
        texts: list[str] = []
        owners: list[int] = []
        spans: list[Span | None] = []
        windows_of: list[list[int]] = []
        pair_tokens: list[int] = []
        pairs = _PairItems(self.encoder, query, query_tokens, query_length)
        needed = needed_tokens(policy, budget)
        for first, stop in group_bounds(len(documents)):
            raise_if_cancelled(cancel)
            done = len(texts)  # windows of the groups before
            group = self._tokenized(documents[first:stop], needed, policy.keep, cancel)
            for index, (doc, tokens) in enumerate(group, start=first):
                ranges = token_windows(tokens.words, budget, self.overlap_tokens, policy)
                mine = list(range(len(texts), len(texts) + max(1, len(ranges or ()))))
                if len(texts) + len(mine) > policy.max_windows:
                    raise _too_many_windows(documents, index, budget, policy)
                windows_of.append(mine)
                if ranges is None:
                    texts.append(doc)
                    owners.append(index)
                    spans.append(None)
                    pair_tokens.append(overhead + len(tokens.words))
                    pairs.window(tokens.ids)
                for start, end in ranges or ():
                    chars = (tokens.spans[start][0], tokens.spans[end - 1][1])
                    texts.append(doc[chars[0] : chars[1]])
                    owners.append(index)
                    spans.append(chars)
                    pair_tokens.append(overhead + end - start)
                    pairs.window(pairs.cut(tokens.ids, start, end))
            new = texts[done:]  # the group's windows: they can be scored now
            items = pairs.made(new)
            if sink is not None:
                sink(query, new, items)
        return WindowPlan(query, texts, owners, spans, windows_of, pair_tokens, pairs.items)

    def _tokenized(
        self, group: Sequence[str], needed: int, keep: KeepSide, cancel: Cancellation | None
    ) -> Iterator[tuple[str, TextTokens]]:
        """Each document of a group (`group_bounds`) with the tokens `token_windows` needs, in
        order: all of a short document's; of a long one, more than `needed` whole-word tokens
        from its start (keep="end": its end), with character spans in the document. (`cancel`
        is looked at between groups, by `plan`.)"""
        found: list[TextTokens | None] = [None] * len(group)
        chars = prefix_chars(needed)
        todo = list(range(len(group)))
        while todo:
            whole = [i for i in todo if len(group[i]) <= chars]
            if whole:
                encoded = self.encoder.encode_texts([group[i] for i in whole])
                for i, all_tokens in zip(whole, encoded, strict=True):
                    found[i] = all_tokens
            parts = [i for i in todo if len(group[i]) > chars]
            cut = [group[i][:chars] if keep == "start" else group[i][-chars:] for i in parts]
            retry = []
            for i, some in zip(parts, self.encoder.encode_texts(cut) if cut else [], strict=True):
                shift = 0 if keep == "start" else len(group[i]) - chars
                usable = _whole_words(some, keep, shift)
                if len(usable.words) > needed:
                    found[i] = usable
                else:  # too few tokens in that many characters: a longer cut
                    retry.append(i)
            todo = retry
            chars *= 4
        for doc, tokens in zip(group, found, strict=True):
            assert tokens is not None  # every document was tokenized whole, or enough of it
            yield doc, tokens

    def _capped_query(self, query: str, tokens: TextTokens) -> tuple[str, int]:
        """The query, cut to `max_query_tokens` at a word boundary when longer; its length."""
        length = len(tokens.words)
        if length <= self.max_query_tokens:
            return query, length
        cuts = word_cuts(tokens.words)
        end = _floor(cuts, self.max_query_tokens, 0) or self.max_query_tokens
        return query[: tokens.spans[end - 1][1]], end


def group_bounds(count: int) -> Iterator[tuple[int, int]]:
    """[first, stop) of each group of `count` documents: FIRST_GROUP, then twice as many each
    time up to GROUP (stage 1 starts on the first group while the next ones are tokenized)."""
    first, size = 0, FIRST_GROUP
    while first < count:
        yield first, min(count, first + size)
        first += size
        size = min(GROUP, size * 2)


def needed_tokens(policy: LongDocPolicy, budget: int) -> int:
    """How many of a document's first tokens (last ones with keep="end") decide its windows, when
    it has more: truncate reads one window of at most `budget` (and `max_tokens`); chunk reads at
    most `max_chunks` windows (each starts inside the one before), or, with `max_tokens`, up to
    the last word boundary within it."""
    if policy.mode == "truncate":
        return min(budget, policy.max_tokens or budget)
    return policy.max_tokens or budget * policy.max_chunks


def prefix_chars(tokens: int) -> int:
    """A first guess of the characters that hold `tokens` tokens and a word more."""
    return tokens * CHARS_PER_TOKEN + 256


def _whole_words(tokens: TextTokens, keep: KeepSide, shift: int) -> TextTokens:
    """The tokens of a cut-off text without the word at the cut (the text's last word; its first
    with keep="end"), spans moved by `shift` characters (where the cut-off text began)."""
    words = tokens.words
    if not words:
        return tokens
    if keep == "start":
        edge = words[-1]
        end = len(words)
        while end > 0 and words[end - 1] == edge:
            end -= 1
        kept = range(0, end if edge is not None else len(words) - 1)
    else:
        edge = words[0]
        start = 0
        while start < len(words) and words[start] == edge:
            start += 1
        kept = range(start if edge is not None else 1, len(words))
    return TextTokens(
        [(a + shift, b + shift) for a, b in tokens.spans[kept.start : kept.stop]],
        list(words[kept.start : kept.stop]),
        tokens.ids[kept.start : kept.stop] if tokens.ids is not None else None,
    )


def _too_many_windows(
    documents: Sequence[str], index: int, budget: int, policy: LongDocPolicy
) -> InvalidRequestError:
    field = "documents"  # the job's part; the HTTP layer names the request's field
    return InvalidRequestError(
        f"{field} would need more than {policy.max_windows} windows of {budget} tokens (reached "
        f"at {field}[{index}] of {len(documents)}); the limit is {policy.max_windows} windows per "
        "request (max_windows_per_request): send fewer or shorter documents, a lower "
        "max_chunks_per_doc, or long_documents=truncate",
        field=field,
    )


def word_cuts(words: Sequence[int | None]) -> list[int]:
    """Token positions where a text can be cut without splitting a word: 0, every word's first
    token, and the end."""
    cuts = [0]
    cuts += [p for p in range(1, len(words)) if words[p] is None or words[p] != words[p - 1]]
    if words:
        cuts.append(len(words))
    return cuts


def _floor(cuts: Sequence[int], limit: int, above: int) -> int | None:
    """The largest cut in (above, limit], or None."""
    i = bisect.bisect_right(cuts, limit) - 1
    return cuts[i] if i >= 0 and cuts[i] > above else None


def _ceil(cuts: Sequence[int], limit: int, below: int) -> int | None:
    """The smallest cut in [limit, below), or None."""
    i = bisect.bisect_left(cuts, limit)
    return cuts[i] if i < len(cuts) and cuts[i] < below else None


def token_windows(
    words: Sequence[int | None], budget: int, overlap: int, policy: LongDocPolicy
) -> list[Span] | None:
    """Token ranges [start, end) of a text's windows, each at most `budget` tokens and cut at
    word boundaries where one exists; None when the whole text is scored as it is."""
    length = len(words)
    limit = policy.max_tokens if policy.max_tokens is not None else length
    if length <= min(budget, limit):
        return None
    if policy.keep == "end":  # the same walk on the mirrored text
        mirrored = [None if w is None else -w for w in reversed(words)]
        forward = token_windows(mirrored, budget, overlap, _keep_start(policy)) or []
        return [(length - end, length - start) for start, end in reversed(forward)]
    cuts = word_cuts(words)
    stop = length if limit >= length else (_floor(cuts, limit, 0) or limit)
    if policy.mode == "truncate":
        return [(0, min(stop, _floor(cuts, budget, 0) or budget))]
    overlap = min(overlap, budget // 2)
    ranges: list[Span] = []
    start = 0
    while True:
        end = min(stop, _floor(cuts, start + budget, start) or start + budget)
        ranges.append((start, end))
        if end >= stop or len(ranges) >= policy.max_chunks:
            return ranges
        start = min(end, _ceil(cuts, max(end - overlap, start + 1), end + 1) or end)


def _keep_start(policy: LongDocPolicy) -> LongDocPolicy:
    return LongDocPolicy(
        mode=policy.mode,
        max_chunks=policy.max_chunks,
        max_tokens=policy.max_tokens,
        keep="start",
        max_windows=policy.max_windows,
    )
