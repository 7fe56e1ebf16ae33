"""gem.labels: the one label-scale rule, oracle-scale class scores, the true impact matrix, u for extractors."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gem.data import scale_classes
from gem.interfaces import ImageDataset
from test_somersd import scipy_matrix

from gem.labels import (MAX_SCORE, SCORE_LEVELS, auxiliary_scale, auxiliary_variable, class_scores, label_scale,
                        true_impact)

ROOT = Path(__file__).resolve().parents[1]
IMAGES = np.zeros((3, 4, 4, 3), dtype=np.uint8)


def test_label_scale_is_levels_minus_one_at_least_one():
    np.testing.assert_array_equal(label_scale([1, 2, 10]), [1.0, 1.0, 9.0])
    assert label_scale([1, 2, 10]).dtype == np.float64
    assert float(label_scale(SCORE_LEVELS)) == 5.0 == MAX_SCORE
    assert float(label_scale(0)) == 1.0


def test_auxiliary_scale_uses_levels_else_the_largest_class_else_five():
    factors = np.array([[0, 0, 0], [0, 3, 0], [0, 1, 0]])
    with_levels = ImageDataset(images=IMAGES, attributes=["a", "b", "c"], factors=factors, factor_levels=[1, 2, 10])
    np.testing.assert_array_equal(auxiliary_scale(with_levels), [1.0, 1.0, 9.0])
    # levels missing (or of the wrong length): largest class present, at least 1
    no_levels = ImageDataset(images=IMAGES, attributes=["a", "b", "c"], factors=factors)
    np.testing.assert_array_equal(auxiliary_scale(no_levels), [1.0, 3.0, 1.0])
    wrong_length = ImageDataset(images=IMAGES, attributes=["a", "b", "c"], factors=factors, factor_levels=[4])
    np.testing.assert_array_equal(auxiliary_scale(wrong_length), [1.0, 3.0, 1.0])
    empty = ImageDataset(images=IMAGES[:0], attributes=["a", "b"], factors=np.zeros((0, 2), dtype=int))
    np.testing.assert_array_equal(auxiliary_scale(empty), [1.0, 1.0])
    scores = ImageDataset(images=IMAGES, attributes=["a", "b"], attribute_scores=np.array([[0, 1], [2, 3], [1, 1]]))
    np.testing.assert_array_equal(auxiliary_scale(scores), [5.0, 5.0])
    assert auxiliary_scale(ImageDataset(images=IMAGES, attributes=["a"])) is None
    assert auxiliary_scale(None) is None


def test_class_scores_and_scale_classes_by_hand():
    classes = np.array([[0, 0, 0, 0], [1, 1, 5, 0], [2, 1, 9, 0], [1, 0, 1, 0]])
    levels = [3, 2, 10, 1]
    # column 0: 1/2*5 = 2.5 rounds up to 3; column 2: 5/9*5 = 2.78 -> 3, 1/9*5 = 0.56 -> 1; one-level factor -> 0
    expected = np.array([[0, 0, 0, 0], [3, 5, 3, 0], [5, 5, 5, 0], [3, 0, 1, 0]])
    scores = class_scores(classes, levels)
    np.testing.assert_array_equal(scores, expected)
    assert scores.dtype == np.int64
    np.testing.assert_allclose(scale_classes(classes, levels),
                               [[0, 0, 0, 0], [0.5, 1, 5 / 9, 0], [1, 1, 1, 0], [0.5, 0, 1 / 9, 0]])


def test_true_impact_is_scipy_somers_d_row_independent():
    scores = np.array([[0, 0, 5], [0, 1, 3], [1, 1, 3], [1, 1, 0], [3, 2, 0], [5, 1, 1]])
    impact = true_impact(scores)
    np.testing.assert_allclose(impact, scipy_matrix(scores), rtol=0, atol=1e-12)
    assert impact[0, 1] != pytest.approx(impact[1, 0])  # asymmetric: row i is the independent variable
    weights = np.array([1, 0, 2, 1, 3, 1])
    np.testing.assert_allclose(true_impact(scores, weights=weights),
                               scipy_matrix(np.repeat(scores, weights, axis=0)), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="6"):
        true_impact(np.array([[0, 6], [1, 0]]))


def test_auxiliary_variable_errors_and_choices():
    factors = np.array([[0, 1], [1, 0], [2, 1]])
    scores = np.array([[5, 0], [0, 3], [1, 1]])
    labelled = ImageDataset(images=IMAGES, attributes=["a", "b"], factors=factors, attribute_scores=scores)
    wants_labels = SimpleNamespace(auxiliary="labels")
    u = auxiliary_variable(wants_labels, labelled, "ivae")
    assert u.dtype == np.float32
    np.testing.assert_array_equal(u, factors)  # factors first, then scores
    only_scores = ImageDataset(images=IMAGES, attributes=["a", "b"], attribute_scores=scores)
    np.testing.assert_array_equal(auxiliary_variable(wants_labels, only_scores), scores)
    assert auxiliary_variable(SimpleNamespace(), labelled) is None
    assert auxiliary_variable(SimpleNamespace(auxiliary=None), labelled) is None
    with pytest.raises(ValueError, match=r"extractor 'x' asks for the auxiliary variable 'time'.*'labels'"):
        auxiliary_variable(SimpleNamespace(auxiliary="time"), labelled, "x")
    unlabelled = ImageDataset(images=IMAGES, attributes=["a", "b"])
    with pytest.raises(ValueError, match=r"extractor 'ivae' learns from labels.*neither ground-truth factors"):
        auxiliary_variable(wants_labels, unlabelled, "ivae")
