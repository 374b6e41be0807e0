"""Judging an encoder as an encoder: pairs from held-out text, recall@1 and MRR from similarities."""

import pytest

from services.validator.retrieval import MRR, RECALL, cosine_matrix, retrieval_pairs, retrieval_scores


def test_pairs_are_the_two_halves_of_each_text_long_enough_to_halve():
    texts = ["one two three four five", "too short", "alpha beta gamma delta"]
    assert retrieval_pairs(texts) == [("one two", "three four five"), ("alpha beta", "gamma delta")]


def test_a_text_whose_halves_are_the_same_gives_no_pair():
    assert retrieval_pairs(["la la la la"]) == []
    with pytest.raises(ValueError):
        retrieval_pairs(["a b"], min_words=1)


def test_every_query_finding_its_own_document_scores_one():
    similarity = [[0.9, 0.1, 0.2], [0.0, 0.8, 0.3], [0.1, 0.2, 0.7]]
    assert retrieval_scores(similarity) == {RECALL: 1.0, MRR: 1.0}


def test_a_document_found_second_counts_half_in_the_mrr_and_nothing_in_recall():
    # query 0 finds its document second, query 1 first
    similarity = [[0.5, 0.9], [0.1, 0.8]]
    assert retrieval_scores(similarity) == {RECALL: 0.5, MRR: 0.75}


def test_ties_count_against_the_query_so_a_collapsed_encoder_scores_the_worst():
    collapsed = cosine_matrix([[1.0, 1.0]] * 4, [[2.0, 2.0]] * 4)
    assert retrieval_scores(collapsed) == {RECALL: 0.0, MRR: 0.25}


def test_cosine_ignores_length_and_a_zero_vector_is_similar_to_nothing():
    matrix = cosine_matrix([[1.0, 0.0], [0.0, 0.0]], [[3.0, 0.0], [0.0, 2.0]])
    assert matrix == [[1.0, 0.0], [0.0, 0.0]]


def test_scores_need_a_square_matrix_with_rows():
    with pytest.raises(ValueError, match="no pairs"):
        retrieval_scores([])
    with pytest.raises(ValueError, match="square"):
        retrieval_scores([[1.0, 0.0]])
