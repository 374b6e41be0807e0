"""Judging an encoder as an encoder: retrieval on held-out pairs. No I/O, no ML stack.

An MNTP adapter is an encoder (as in LLM2Vec): what it should improve is how
well its embeddings find related text. The soak measures that on pairs built
from the held-out data itself: the first and second half of the same text.
Each first half (the query) should be most similar to its own second half (the
document) among all the documents of the episode.

* ``retrieval_pairs`` — (query, document) pairs from texts long enough to halve;
* ``cosine_matrix`` — query x document cosine similarities of two vector lists;
* ``retrieval_scores`` — recall@1 and mean reciprocal rank from such a matrix,
  where query i's relevant document is document i.

The replica (``replica``) embeds the pairs with ``shared.ml.embed_texts``
(mean-pooled, bidirectional) and reports both scores per episode.
"""

from __future__ import annotations

import math
from typing import Sequence

RECALL, MRR = "retrieval_recall_at_1", "retrieval_mrr"


def retrieval_pairs(texts: Sequence[str], min_words: int = 4) -> list[tuple[str, str]]:
    """(first half, second half) of every text with at least ``min_words`` words, in order.

    The halves split on whitespace at the middle word; a text too short to give
    each half two words is skipped, as is a text whose halves are identical (it
    could be found by chance only)."""
    if min_words < 2:
        raise ValueError("min_words must be at least 2")
    pairs = []
    for text in texts:
        words = text.split()
        if len(words) < min_words:
            continue
        middle = len(words) // 2
        query, document = " ".join(words[:middle]), " ".join(words[middle:])
        if query != document:
            pairs.append((query, document))
    return pairs


def cosine_matrix(queries: Sequence[Sequence[float]], documents: Sequence[Sequence[float]]) -> list[list[float]]:
    """Cosine similarity of every query to every document (a zero vector is similar to nothing: 0)."""
    def unit(vector: Sequence[float]) -> list[float]:
        norm = math.sqrt(sum(x * x for x in vector))
        return [x / norm for x in vector] if norm > 0 else [0.0 for _ in vector]

    docs = [unit(d) for d in documents]
    return [[sum(a * b for a, b in zip(q, d)) for d in docs] for q in (unit(q) for q in queries)]


def retrieval_scores(similarity: Sequence[Sequence[float]]) -> dict[str, float]:
    """Recall@1 and MRR of a square similarity matrix whose row i's relevant column is i.

    A tie counts against the query: the relevant document's rank is one plus the
    number of other documents at least as similar, so a collapsed encoder (every
    vector alike) scores the worst, never a lucky first place."""
    n = len(similarity)
    if n == 0:
        raise ValueError("no pairs to score")
    if any(len(row) != n for row in similarity):
        raise ValueError("the similarity matrix must be square: one document per query")
    hits, reciprocal = 0, 0.0
    for i, row in enumerate(similarity):
        rank = 1 + sum(1 for j, value in enumerate(row) if j != i and value >= row[i])
        hits += rank == 1
        reciprocal += 1.0 / rank
    return {RECALL: hits / n, MRR: reciprocal / n}
