"""Balanced accuracy, its interval and the confusion matrix of the evaluation probes, against hand
computations; and the probe report's lines."""

import math

import pytest

from astrobio.data import ByteTokenizer, load_records
from astrobio.inference.evaluation import balanced_accuracy, confusion_matrix, probe_result, run_probe

from test_inference_cli import AlwaysNo


def test_confusion_matrix_counts_truth_rows_and_predicted_columns():
    truths = ["yes", "yes", "yes", "yes", "no", "no", "no", "no", "no", "no"]
    preds = ["yes", "no", "yes", "yes", "no", "no", "yes", "no", "no", "no"]
    assert confusion_matrix(truths, preds, ("yes", "no")) == [[3, 1], [1, 5]]
    three = confusion_matrix(["terran", "jovian", "jovian"], ["jovian", "jovian", "neptunian"],
                             ("terran", "neptunian", "jovian"))
    assert three == [[0, 0, 1], [0, 0, 0], [0, 1, 1]]


def test_balanced_accuracy_and_its_interval_by_hand():
    # recalls 3/4 (yes) and 5/6 (no): balanced accuracy (0.75 + 0.8333) / 2 = 0.79167.
    # Agresti-Coull, z^2 = 3.8415: yes (3 + 1.9207) / 7.8415 = 0.62752, variance 0.62752 * 0.37248 / 7.8415;
    # no (5 + 1.9207) / 9.8415 = 0.70322, variance 0.70322 * 0.29678 / 9.8415; centre 0.66537,
    # half width 1.96 * sqrt(0.029808 + 0.021206) / 2 = 0.22134.
    value, low, high = balanced_accuracy([[3, 1], [1, 5]])
    assert value == pytest.approx(0.791667, abs=1e-6)
    assert low == pytest.approx(0.44403, abs=1e-4) and high == pytest.approx(0.88672, abs=1e-4)


def test_classes_absent_from_the_truth_do_not_count():
    # no 'neptunian' truth: the mean runs over terran (1/2) and jovian (2/2)
    value, _, _ = balanced_accuracy([[1, 0, 1], [0, 0, 0], [0, 0, 2]])
    assert value == pytest.approx(0.75)


def test_a_constant_answer_scores_one_over_the_classes_however_skewed():
    truths = ["no"] * 95 + ["yes"] * 5
    result = probe_result("hz", "test", ("yes", "no"), truths, ["no"] * 100)
    assert result.accuracy == pytest.approx(0.95) and result.majority_baseline == pytest.approx(0.95)
    assert result.balanced_accuracy == pytest.approx(0.5) == result.majority_balanced_accuracy
    assert result.confusion == [[0, 5], [0, 95]]
    assert result.balanced_ci_low < 0.5 < result.balanced_ci_high  # not better than the baseline
    perfect = probe_result("hz", "test", ("yes", "no"), truths, truths)
    assert perfect.balanced_accuracy == 1.0 and perfect.balanced_ci_low > 0.5
    assert perfect.balanced_ci_high <= 1.0


def test_probe_of_a_constant_model_reports_its_confusion():
    records = load_records("builtin:40", seed=3)
    result = run_probe(AlwaysNo(259), ByteTokenizer(), records, "hz", "test", context=64, limit=60)
    yes, no = result.confusion
    assert yes[0] == no[0] == 0  # never predicts 'yes'
    assert no[1] == result.correct and yes[1] + no[1] == result.examples
    assert result.balanced_accuracy == pytest.approx(0.5)
    lines = result.lines()
    assert lines[0].startswith("hz on test: accuracy")
    assert "balanced accuracy 50.0%" in lines[1] and "majority class 50.0%" in lines[1]
    assert lines[2] == "  confusion matrix:" and lines[3].split()[-2:] == ["yes", "no"]
    assert lines[4].split() == ["yes", "0", str(yes[1])] and lines[5].split() == ["no", "0", str(no[1])]


def test_interval_shrinks_with_more_examples_and_stays_in_bounds():
    small = balanced_accuracy([[8, 2], [2, 8]])
    large = balanced_accuracy([[80, 20], [20, 80]])
    assert small[0] == large[0] == pytest.approx(0.8)
    assert (large[2] - large[1]) < (small[2] - small[1])
    assert 0.0 <= small[1] and small[2] <= 1.0
    # the large case against the normal approximation: half width ~ 1.96 * sqrt(2 * 0.16 / 100) / 2
    assert (large[2] - large[1]) / 2 == pytest.approx(1.96 * math.sqrt(0.0032) / 2, rel=0.05)
