"""fastvl.finetune.metrics against hand-computed cases: VQA normalisation and accuracy, soft scores,
recall@K with ties and several positives."""

import numpy as np
import pytest
import torch

from fastvl.finetune import metrics


@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),  # a period not before a digit goes, number word -> digit
    ("the cat", "cat"),  # articles dropped
    ("a", ""),
    ("An apple", "apple"),
    ("dont know", "don't know"),  # contraction gets its apostrophe
    ("couldnt've", "couldn't've"),
    ("isnt", "isn't"),
    ("yes!", "yes"),  # punctuation not touching a space becomes a space
    ("red-white", "red white"),
    ("red - white", "red white"),  # touching a space: deleted
    ("1,000", "1000"),  # a comma between digits: every mark is deleted
    ("3.5", "3.5"),  # the period before a digit stays
    ("  Ten\tPeople\n", "10 people"),
    ("none", "0"),
])
def test_normalize_answer(raw, expected):
    assert metrics.normalize_answer(raw) == expected


def test_vqa_accuracy_ten_choose_nine():
    # n matching humans -> 0, 0.3, 0.6, 0.9, 1 (hand-computed leave-one-out means)
    for n, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        humans = ["2"] * n + ["3"] * (10 - n)
        assert metrics.vqa_accuracy("2", humans) == pytest.approx(expected)
        assert metrics.soft_score(n) == pytest.approx(expected)
    # 3 of 10 say "2": leaving out one of them leaves 2 matches (2/3, three times), else 3 (1, seven times)
    humans = ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]
    assert metrics.vqa_accuracy("Two.", humans) == pytest.approx((3 * 2 / 3 + 7) / 10)


def test_vqa_accuracy_normalises_only_when_humans_disagree():
    # the official script's rule: unanimous humans are compared without normalisation
    assert metrics.vqa_accuracy("two", ["2"] * 10) == 0.0
    assert metrics.vqa_accuracy(" 2\n", ["2"] * 10) == 1.0
    assert metrics.vqa_accuracy("two", ["2"] * 9 + ["3"]) == 1.0
    with pytest.raises(ValueError, match="human_answers"):
        metrics.vqa_accuracy("2", [])


def test_vqa_metrics_and_soft_score():
    humans = {1: ["yes"] * 10, 2: ["2"] * 2 + ["3"] * 8, 3: ["cat"] * 10}
    predictions = {1: "yes", 2: "two", 3: "dog"}
    out = metrics.vqa_metrics(predictions, humans)
    assert out["vqa_accuracy"] == pytest.approx(100 * (1 + 0.6 + 0) / 3)
    assert out["soft_score"] == pytest.approx(100 * (1 + 0.6 + 0) / 3)
    assert out["questions"] == 3
    assert metrics.answer_scores(["Two", "2", "3"]) == {"2": pytest.approx(0.6), "3": pytest.approx(0.3)}
    with pytest.raises(ValueError, match="question_id 9"):
        metrics.vqa_metrics({9: "yes"}, humans)


def test_ranks_count_ties_against_the_query():
    scores = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.9, 0.9], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    positives = [[2], [1], [2], [1, 2]]
    assert metrics.ranks(scores, positives).tolist() == [2, 1, 0, 1]
    recall = metrics.recall_at_k(scores, positives, ks=(1, 2, 3))
    assert recall == {1: 25.0, 2: 75.0, 3: 100.0}
    with pytest.raises(ValueError, match="no ground-truth"):
        metrics.ranks(scores, [[2], [], [1], [0]])


def test_retrieval_metrics_by_hand():
    # 2 images, 4 texts (texts 0, 1 of image 0; 2, 3 of image 1)
    scores = np.array([[0.9, 0.1, 0.8, 0.2],  # image 0: best text 0 (its own) -> TR hit at 1
                       [0.7, 0.6, 0.5, 0.4]])  # image 1: its texts 2, 3 rank 3rd, 4th -> rank 2
    out = metrics.retrieval_metrics(scores, [0, 0, 1, 1], ks=(1, 2, 3))
    assert (out["tr_r1"], out["tr_r2"], out["tr_r3"]) == (50.0, 50.0, 100.0)
    # text -> image: text0 -> img0 (0.9 > 0.7) hit; text1 -> img1 scores 0.6 > 0.1: miss at 1;
    # text2 -> img0 0.8 > 0.5: miss; text3 -> img1 0.4 > 0.2: hit
    assert out["ir_r1"] == 50.0 and out["ir_r2"] == 100.0
    assert out["tr_mean"] == pytest.approx(200 / 3) and out["r_mean"] == pytest.approx((200 / 3 + 250 / 3) / 2)
    with pytest.raises(ValueError, match="no caption"):
        metrics.retrieval_metrics(scores[:, :2], [0, 0])
