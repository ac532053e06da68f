"""ray_certseg.results.metrics against hand-computed cases and scikit-learn's confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

from ray_certseg.certify import ABSTAIN
from ray_certseg.results.metrics import (
    DatasetMetrics,
    ImageStats,
    confusion_matrix,
    image_stats,
    pooled_metrics,
)

A = ABSTAIN
# Image 1, C = 3: 12 pixels, 2 ignored (255); 3 abstained in all, one of them on an ignored pixel.
LABEL_1 = np.array([[0, 0, 1, 255], [1, 2, 2, 255], [0, 1, 2, 2]], dtype=np.uint8)
PRED_1 = np.array([[0, A, 1, 2], [0, 2, A, A], [1, 1, 2, 0]], dtype=np.int16)
# rows: ground truth 0, 1, 2, (abstain); columns: prediction 0, 1, 2, abstain
CONFUSION_1 = [[1, 1, 0, 1], [1, 2, 0, 0], [1, 0, 2, 1], [0, 0, 0, 0]]
# Image 2, C = 3: 4 pixels, 1 ignored; 2 abstained in all (one ignored), classes 2 absent.
LABEL_2 = np.array([[0, 255], [1, 1]], dtype=np.uint8)
PRED_2 = np.array([[0, A], [1, A]], dtype=np.int16)
CONFUSION_2 = [[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]


def pool(stats: list[ImageStats]) -> DatasetMetrics:
    """Dataset metrics of per-image records as the reducer pools them (``aggregate.Pool``): the sum of their
    confusion matrices and the mean of their abstained fractions."""
    fractions = [s.abstain_fraction for s in stats]
    return pooled_metrics(np.sum([s.confusion for s in stats], axis=0), float(np.mean(fractions)), len(stats))


def test_confusion_matrix_by_hand():
    confusion = confusion_matrix(LABEL_1, PRED_1, num_classes=3)
    assert confusion.dtype == np.int64
    assert confusion.tolist() == CONFUSION_1


def test_confusion_matrix_matches_sklearn():
    rng = np.random.default_rng(0)
    num_classes = 19
    label = rng.integers(0, num_classes, size=(40, 50)).astype(np.uint8)
    label[rng.random(label.shape) < 0.1] = 255
    pred = rng.integers(-1, num_classes, size=label.shape).astype(np.int16)
    valid = label != 255
    expected = sklearn_confusion_matrix(
        label[valid],
        np.where(pred[valid] == ABSTAIN, num_classes, pred[valid]),
        labels=range(num_classes + 1),
    )
    assert np.array_equal(confusion_matrix(label, pred, num_classes), expected)


def test_image_stats_record():
    stats = image_stats(LABEL_1, PRED_1, num_classes=3)
    assert stats.confusion.tolist() == CONFUSION_1
    assert (stats.num_pixels, stats.num_abstained, stats.num_classes) == (12, 3, 3)
    assert stats.abstain_fraction == 0.25


def test_dataset_metrics_one_image_by_hand():
    m = pooled_metrics(np.array(CONFUSION_1), 0.25, 1)
    assert isinstance(m, DatasetMetrics)
    assert (m.num_classes, m.num_images, m.num_pixels) == (3, 1, 10)
    assert m.accuracy == pytest.approx(5 / 10)
    assert m.error_rate == pytest.approx(3 / 10)
    assert m.abstain_rate_pooled == pytest.approx(2 / 10)
    assert m.abstain_rate == 0.25
    # pos = (3, 3, 4), res = (3, 3, 2), tp = (1, 2, 2)
    assert m.iou == pytest.approx([1 / 5, 2 / 4, 2 / 4])
    assert m.miou == pytest.approx(0.4)
    assert m.miou_present == pytest.approx(0.4) and m.num_present_classes == 3
    assert m.abstain_rate_per_class == pytest.approx([1 / 3, 0, 1 / 4])


def test_pooling_sums_pixels_and_averages_abstain_per_image():
    """SegCertify pools confusion matrices over images but averages the abstain fraction per image."""
    records = [image_stats(LABEL_1, PRED_1, 3), image_stats(LABEL_2, PRED_2, 3)]
    assert records[1].confusion.tolist() == CONFUSION_2
    m = pool(records)
    # pooled rows: (2, 1, 0, 1), (1, 3, 0, 1), (1, 0, 2, 1); V = 13, tp = 7, abstained = 3
    assert (m.num_images, m.num_pixels) == (2, 13)
    assert m.accuracy == pytest.approx(7 / 13)
    assert m.error_rate == pytest.approx(3 / 13)
    assert m.abstain_rate_pooled == pytest.approx(3 / 13)
    assert m.abstain_rate == pytest.approx((3 / 12 + 2 / 4) / 2)
    # pos = (4, 5, 4), res = (4, 4, 2)
    assert m.iou == pytest.approx([2 / 6, 3 / 6, 2 / 4])
    assert m.miou == pytest.approx(4 / 9)


def test_absent_classes_count_as_zero_in_miou():
    """C = 4, only classes 0 and 1 in the ground truth: IoU 2, 3 are 0 in miou, left out of miou_present."""
    m = pool([image_stats(LABEL_2, PRED_2, num_classes=4)])
    assert m.iou == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert m.miou == pytest.approx(1.5 / 4)
    assert m.miou_present == pytest.approx(0.75)
    assert m.num_present_classes == 2
    per_class = m.abstain_rate_per_class
    assert per_class[:2] == pytest.approx([0.0, 0.5]) and np.isnan(per_class[2:]).all()


def test_confidently_wrong_prediction_shows_in_error_rate():
    """A class predicted but absent from the ground truth: IoU 0 for it, its pixels are certified errors."""
    m = pool([image_stats(np.array([[0, 0]], np.uint8), np.array([[0, 2]], np.int16), num_classes=3)])
    assert (m.accuracy, m.error_rate, m.abstain_rate_pooled) == (0.5, 0.5, 0.0)
    assert m.iou == pytest.approx([0.5, 0.0, 0.0])
    assert m.miou == pytest.approx(1 / 6) and m.miou_present == pytest.approx(0.5)


def test_plain_prediction_metrics():
    """Clean / majority-vote rows: no abstentions, accuracy = plain pixel accuracy over non-ignored pixels."""
    rng = np.random.default_rng(1)
    label = rng.integers(0, 5, size=(30, 30)).astype(np.uint8)
    label[:3] = 255
    pred = np.where(rng.random(label.shape) < 0.7, label, rng.integers(0, 5, size=label.shape)).astype(
        np.int64
    )
    pred[:3] = 0
    stats = image_stats(label, pred, num_classes=5)
    m = pool([stats])
    valid = label != 255
    assert stats.num_abstained == 0 and m.abstain_rate == 0.0 and m.abstain_rate_pooled == 0.0
    assert m.accuracy == pytest.approx(np.mean(label[valid] == pred[valid]))
    assert m.accuracy + m.error_rate == pytest.approx(1.0)


def test_uint16_labels_need_an_ignore_index_outside_the_classes():
    label = np.array([[299, 65535]], dtype=np.uint16)
    pred = np.array([[299, A]], dtype=np.int16)
    with pytest.raises(ValueError, match="ignore_index=255 is a real class"):
        confusion_matrix(label, pred, num_classes=300)
    confusion = confusion_matrix(label, pred, num_classes=300, ignore_index=65535)
    assert confusion.sum() == 1 and confusion[299, 299] == 1


def test_as_dict_is_plain_python():
    d = pooled_metrics(np.array(CONFUSION_1), 0.25, 1).as_dict()
    assert isinstance(d["iou"], list) and isinstance(d["miou"], float) and isinstance(d["num_pixels"], int)


# --- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "label, pred, num_classes, ignore_index, error, match",
    [
        (LABEL_1.astype(float), PRED_1, 3, 255, TypeError, "label must be an integer"),
        (LABEL_1, PRED_1.astype(float), 3, 255, TypeError, "pred must be an integer"),
        (LABEL_1, PRED_1[:2], 3, 255, ValueError, "same shape"),
        (LABEL_1, PRED_1, 0, 255, ValueError, "num_classes"),
        (LABEL_1, PRED_1, 3, 2, ValueError, "is a real class"),
        (LABEL_1, PRED_1, 3, 2.5, TypeError, "ignore_index"),
        (np.where(LABEL_1 == 2, 3, LABEL_1), PRED_1, 3, 255, ValueError, "label holds values outside"),
        (LABEL_1, np.where(PRED_1 == 2, 3, PRED_1), 3, 255, ValueError, "pred holds values outside"),
        (LABEL_1, np.where(PRED_1 == A, -2, PRED_1), 3, 255, ValueError, "pred holds values outside"),
    ],
)
def test_confusion_matrix_rejects_bad_input(label, pred, num_classes, ignore_index, error, match):
    with pytest.raises(error, match=match):
        confusion_matrix(label, pred, num_classes, ignore_index)


@pytest.mark.parametrize(
    "confusion, rate, images, error, match",
    [
        (np.array(CONFUSION_1), 0.1, 0, ValueError, "num_images"),
        (np.array(CONFUSION_1), 1.5, 1, ValueError, r"\[0, 1\]"),
        (np.array(CONFUSION_1, dtype=float), 0.1, 1, TypeError, "integer"),
        (np.array(CONFUSION_1)[:3], 0.1, 1, ValueError, r"\(C\+1\) x \(C\+1\)"),
        (np.array(CONFUSION_1) - 2, 0.1, 1, ValueError, "negative"),
        (np.ones((4, 4), dtype=np.int64), 0.1, 1, ValueError, "ground truth never abstains"),
        (np.zeros((4, 4), dtype=np.int64), 0.1, 1, ValueError, "no non-ignored pixel"),
    ],
)
def test_pooled_metrics_rejects_bad_input(confusion, rate, images, error, match):
    with pytest.raises(error, match=match):
        pooled_metrics(confusion, rate, images)


def test_dice_and_worst_case_bounds_by_hand():
    """CONFUSION_1: pos = (3, 3, 4), res = (3, 3, 2), tp = (1, 2, 2); abstained A_c = (1, 0, 1), A = 2."""
    m = pooled_metrics(np.array(CONFUSION_1), 0.25, 1)
    assert m.dice == pytest.approx([2 / 6, 4 / 6, 4 / 6])
    assert m.mdice == pytest.approx((2 / 6 + 4 / 6 + 4 / 6) / 3) == m.mdice_present
    # every other class's abstentions become false positives of the class scored: A - A_c = (1, 2, 1)
    assert m.worst_iou == pytest.approx([1 / 6, 2 / 6, 2 / 5])
    assert m.worst_dice == pytest.approx([2 / 7, 4 / 8, 4 / 7])
    assert m.worst_miou == pytest.approx(np.mean([1 / 6, 2 / 6, 2 / 5]))
    assert m.worst_accuracy == m.accuracy == pytest.approx(5 / 10)


def _iou_dice(label, pred, c):
    tp = np.sum((label == c) & (pred == c))
    fp = np.sum((label != c) & (pred == c))
    fn = np.sum((label == c) & (pred != c))
    return tp / max(1, tp + fp + fn), 2 * tp / max(1, 2 * tp + fp + fn)


@pytest.mark.parametrize("seed", range(6))
def test_worst_case_bounds_are_the_minimum_over_every_outcome_of_the_abstentions(seed):
    """Brute force: every way the abstained pixels could be classified under a perturbation (certified pixels
    keep theirs). The bounds are attained (equal to the minimum), hence tight lower bounds."""
    import itertools

    rng = np.random.default_rng(seed)
    C = 3
    label = rng.integers(0, C, 9)
    pred = np.where(rng.random(9) < 0.35, A, rng.integers(0, C, 9)).astype(np.int64)
    pred[0], label[0] = A, 1  # at least one abstention
    m = pooled_metrics(confusion_matrix(label, pred, C), float(np.mean(pred == A)), 1)
    holes = np.flatnonzero(pred == A)
    outcomes = []
    for fill in itertools.product(range(C), repeat=len(holes)):
        p = pred.copy()
        p[holes] = fill
        outcomes.append((np.mean(p == label), *[_iou_dice(label, p, c) for c in range(C)]))
    assert m.worst_accuracy == pytest.approx(min(o[0] for o in outcomes))
    for c in range(C):
        assert m.worst_iou[c] == pytest.approx(min(o[1 + c][0] for o in outcomes))
        assert m.worst_dice[c] == pytest.approx(min(o[1 + c][1] for o in outcomes))
        assert m.worst_iou[c] <= m.iou[c] and m.worst_dice[c] <= m.dice[c]


def test_flat_level_stats_from_the_confusion_equal_the_per_pixel_pass():
    """The reducer's shortcut for a flat certificate gives the very numbers (the float gain to the bit) of
    level_stats over the pixels, ignore labels and abstentions included."""
    from ray_certseg.results.metrics import confusion_matrix, flat_level_stats, level_stats

    rng = np.random.default_rng(3)
    for C in (2, 7, 19):
        label = rng.integers(0, C, (40, 50)).astype(np.uint8)
        label[rng.random(label.shape) < 0.1] = 255
        pred = np.where(rng.random(label.shape) < 0.7, label, rng.integers(0, C, label.shape)).astype(
            np.int16
        )
        pred[rng.random(label.shape) < 0.2] = ABSTAIN
        pred[label == 255] = np.where(rng.random(label.shape) < 0.5, 0, ABSTAIN)[label == 255]
        want = level_stats(label, pred, None, np.arange(C)[None], np.ones((1, C), dtype=np.int64), 255)
        got = flat_level_stats(confusion_matrix(label, pred, C, 255))
        assert (got.num_labelled, got.num_correct, got.info_gain) == (
            want.num_labelled,
            want.num_correct,
            want.info_gain,
        )
        for name in ("pixels", "certified", "wrong"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
