import pytest
import torch

from falip.ranking import score_name, score_table, winners


def test_a_clear_winner_is_not_a_tie():
    won = winners(torch.tensor([[1.0, 5.0], [3.0, 2.0]]))
    assert won.best == [1, 0]
    assert won.tie == [False, False]
    assert won.tied == [[1], [0]]


def test_identical_scores_tie_and_best_is_the_first():
    # method="none": every region is the whole image, so every score is the same number
    won = winners(torch.tensor([[15.84], [15.84], [15.84]]))
    assert won.best == [0] and won.tie == [True] and won.tied == [[0, 1, 2]]


def test_tie_tolerance_is_relative_to_the_best_score():
    won = winners(torch.tensor([[100.0, 1.0], [100.0 - 1e-4, 1.0 - 1e-4]]))
    assert won.tie == [True, False]


def test_non_finite_scores_are_refused():
    with pytest.raises(ValueError, match="NaN or infinity"):
        winners(torch.tensor([[float("nan")], [1.0]]))
    with pytest.raises(ValueError, match="K ≥ 1"):
        winners(torch.zeros(0, 2))


def test_score_table_shape_and_names():
    table = score_table(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), ["a", "a"], "sigmoid")
    assert table["best"] == [0, 0] and table["tie"] == [False, True] and table["texts"] == ["a", "a"]
    assert table["score"] == {"kind": "sigmoid", "name": score_name("sigmoid")}
    with pytest.raises(ValueError, match="unknown score kind"):
        score_name("cosine")
    with pytest.raises(ValueError, match="2 texts"):
        score_table(torch.zeros(2, 3), ["a", "b"], "softmax")
