"""Segmentation metrics with abstentions, pooled over a dataset as SegCertify reports them.

Per image the pipeline keeps a small record (``image_stats``): a (C+1) x (C+1) confusion matrix M whose last
row/column is ABSTAIN (rows = ground truth, columns = prediction, ignore-label pixels dropped), the number of
pixels and the number of abstained pixels. The reducer sums the matrices over images (SegCertify pools pixels
over the dataset; ``ray_certseg.results.aggregate.Pool``) and ``pooled_metrics`` derives every metric from the sum.

The same functions serve plain (uncertified) predictions such as the clean and majority-vote rows: such a
prediction never abstains, so its abstain column is zero and accuracy, mIoU are the usual ones.

Pure numpy: no torch, no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np

from ray_certseg.certify import ABSTAIN


@dataclass(frozen=True, eq=False)
class ImageStats:
    """Per-image record: ``confusion`` M ((C+1) x (C+1) int64, see ``confusion_matrix``), ``num_pixels`` (all
    pixels, ignore label included) and ``num_abstained`` (abstained pixels among them)."""

    confusion: np.ndarray
    num_pixels: int
    num_abstained: int

    @property
    def num_classes(self) -> int:
        """C, the number of real classes."""
        return self.confusion.shape[0] - 1

    @property
    def abstain_fraction(self) -> float:
        """num_abstained / num_pixels: abstained share of ALL the image's pixels (SegCertify's term)."""
        return self.num_abstained / self.num_pixels


@dataclass(frozen=True, eq=False)
class DatasetMetrics:
    """Dataset metrics from the pooled confusion matrix M (C real classes, index C = ABSTAIN).

    With V = sum(M) non-ignored pixels, tp_c = M[c, c], pos_c = sum_j M[c, j] (ground-truth pixels of c,
    abstained ones included) and res_c = sum_{g < C} M[g, c] (pixels predicted as c):

    * accuracy = sum_c tp_c / V (certified pixel accuracy; an abstention counts as wrong)
    * error_rate = (V - sum_c tp_c - sum_g M[g, C]) / V (certified with a wrong class; accuracy + error_rate +
      abstain_rate_pooled = 1)
    * iou_c = tp_c / max(1, pos_c + res_c - tp_c): an abstention is a false negative of its true class and a
      false positive of none
    * miou = mean of iou_c over all C classes (a class absent from ground truth counts as 0, as in
      SegCertify); miou_present = mean over the num_present_classes classes with pos_c > 0
    * abstain_rate = mean over images of (abstained pixels / ALL pixels, ignore label included), as
      SegCertify reports it
    * abstain_rate_pooled = sum_g M[g, C] / V; abstain_rate_per_class_c = M[c, C] / pos_c (NaN when pos_c = 0)
    * dice_c = 2 tp_c / max(1, pos_c + res_c) (certified Dice, Laousy et al. 2023; abstain counted as in the
      IoU: a false negative of its true class); mdice over all C classes, mdice_present over present ones

    Worst-case lower bounds, over every perturbation within the certified radius R. With A = sum_g M[g, C]
    (abstained labelled pixels) and A_c = M[c, C]: a certified pixel keeps its class under any such
    perturbation, an abstained one may become anything, so each abstention counts against every score, as a
    false negative of its true class and as a false positive of the class being scored:

    * worst_accuracy = sum_c tp_c / V (= accuracy: an abstention already counts as wrong there)
    * worst_iou_c = tp_c / max(1, pos_c + res_c - tp_c + A - A_c); worst_miou = mean over the C classes
    * worst_dice_c = 2 tp_c / max(1, pos_c + res_c + A - A_c); worst_mdice = mean over the C classes

    Each class's bound is the worst case for that class alone (not jointly attainable), so each, and their
    means, is a valid lower bound. They hold for an image with probability >= 1 - alpha over the sampling
    (the family-wise guarantee of its certified pixels); pooled over M images, for all of them at once with
    probability >= 1 - M alpha (union bound, no independence needed).
    """

    num_classes: int
    num_images: int
    num_pixels: int
    accuracy: float
    error_rate: float
    miou: float
    miou_present: float
    num_present_classes: int
    abstain_rate: float
    abstain_rate_pooled: float
    iou: np.ndarray
    abstain_rate_per_class: np.ndarray
    mdice: float
    mdice_present: float
    dice: np.ndarray
    worst_accuracy: float
    worst_miou: float
    worst_mdice: float
    worst_iou: np.ndarray
    worst_dice: np.ndarray

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values (per-class arrays as lists), e.g. for JSON or a results table."""
        return {
            name: value.tolist() if isinstance(value, np.ndarray) else value
            for name, value in self.__dict__.items()
        }


def confusion_matrix(
    label: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """M[g, p] = #{pixels with ground truth g != ignore_index and prediction p}, ABSTAIN mapped to p = C.

    Shape (C+1) x (C+1), int64; rows are ground truth, columns predictions; row C is always zero. Computed as
    bincount(g * (C+1) + p). ``label`` holds classes in [0, C) or ``ignore_index``; ``pred`` holds classes in
    [0, C) or ``ABSTAIN``; both integer arrays of the same shape.
    """
    num_classes = _check_num_classes(num_classes)
    label, pred = np.asarray(label), np.asarray(pred)
    for name, array in (("label", label), ("pred", pred)):
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"{name} must be an integer array, got dtype {array.dtype}")
    if label.shape != pred.shape:
        raise ValueError(f"label and pred must have the same shape, got {label.shape} and {pred.shape}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, Integral):
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(
            f"ignore_index={ignore_index} is a real class of num_classes={num_classes}; pass an ignore label "
            "outside [0, num_classes) (e.g. 255 for uint8 labels, 65535 for uint16)"
        )
    bad_pred = (pred != ABSTAIN) & ((pred < 0) | (pred >= num_classes))
    if bad_pred.any():
        raise ValueError(
            f"pred holds values outside [0, {num_classes}) and other than ABSTAIN={ABSTAIN}, "
            f"e.g. {pred[bad_pred][0]}; check num_classes"
        )
    valid = label != ignore_index
    gt = label[valid].astype(np.int64)
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(
            f"label holds values outside [0, {num_classes}) other than ignore_index={ignore_index} "
            f"(min {gt.min()}, max {gt.max()}); check num_classes and ignore_index"
        )
    predicted = pred[valid].astype(np.int64)
    predicted[predicted == ABSTAIN] = num_classes
    side = num_classes + 1
    return np.bincount(gt * side + predicted, minlength=side * side).reshape(side, side)


def image_stats(label: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = 255) -> ImageStats:
    """The per-image record: ``confusion_matrix(label, pred, ...)``, pixel count, abstained pixel count."""
    confusion = confusion_matrix(label, pred, num_classes, ignore_index)
    pred = np.asarray(pred)
    return ImageStats(
        confusion=confusion, num_pixels=int(pred.size), num_abstained=int(np.count_nonzero(pred == ABSTAIN))
    )


def pooled_metrics(confusion: np.ndarray, abstain_rate: float, num_images: int) -> DatasetMetrics:
    """``DatasetMetrics`` from the summed confusion matrix ((C+1, C+1)), the mean over the ``num_images``
    images of their abstained fraction of all pixels, and that number of images (what a streaming pool keeps)."""
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if not 0 <= abstain_rate <= 1:
        raise ValueError(f"abstain_rate must lie in [0, 1], got {abstain_rate}")
    total = _check_confusion(np.asarray(confusion))
    num_pixels = int(total.sum())
    if num_pixels == 0:
        raise ValueError("the confusion matrices count no non-ignored pixel; metrics are undefined")
    num_classes = total.shape[0] - 1
    tp = np.diag(total)[:num_classes].astype(np.float64)
    pos = total[:num_classes].sum(axis=1)
    res = total[:, :num_classes].sum(axis=0)
    abstained = total[:num_classes, num_classes]
    iou = tp / np.maximum(1, pos + res - tp)
    dice = 2 * tp / np.maximum(1, pos + res)
    others_abstained = abstained.sum() - abstained  # A - A_c: each a possible false positive of class c
    worst_iou = tp / np.maximum(1, pos + res - tp + others_abstained)
    worst_dice = 2 * tp / np.maximum(1, pos + res + others_abstained)
    present = pos > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        abstain_per_class = np.where(present, abstained / pos, np.nan)
    return DatasetMetrics(
        num_classes=num_classes,
        num_images=num_images,
        num_pixels=num_pixels,
        accuracy=float(tp.sum() / num_pixels),
        error_rate=float((num_pixels - tp.sum() - abstained.sum()) / num_pixels),
        miou=float(iou.mean()),
        miou_present=float(iou[present].mean()),
        num_present_classes=int(present.sum()),
        abstain_rate=float(abstain_rate),
        abstain_rate_pooled=float(abstained.sum() / num_pixels),
        iou=iou,
        abstain_rate_per_class=abstain_per_class,
        mdice=float(dice.mean()),
        mdice_present=float(dice[present].mean()),
        dice=dice,
        worst_accuracy=float(tp.sum() / num_pixels),
        worst_miou=float(worst_iou.mean()),
        worst_mdice=float(worst_dice.mean()),
        worst_iou=worst_iou,
        worst_dice=worst_dice,
    )


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return int(num_classes)


def _check_confusion(confusion: np.ndarray) -> np.ndarray:
    """Validate (..., C+1, C+1) non-negative integer matrices whose ground-truth row C (abstain) is zero."""
    if not np.issubdtype(confusion.dtype, np.integer):
        raise TypeError(f"confusion matrices must be integer counts, got dtype {confusion.dtype}")
    if confusion.ndim < 2 or confusion.shape[-1] != confusion.shape[-2] or confusion.shape[-1] < 2:
        raise ValueError(
            f"confusion must be (C+1) x (C+1) with C >= 1 (or a stack of them), got shape {confusion.shape}"
        )
    if confusion.size and confusion.min() < 0:
        raise ValueError("confusion matrices hold negative counts")
    if confusion[..., -1, :].any():
        raise ValueError("confusion row C (ground truth = ABSTAIN) must be zero: ground truth never abstains")
    return confusion.astype(np.int64, copy=False)


@dataclass(frozen=True, eq=False)
class LevelStats:
    """Per-image record of a certificate at hierarchy levels (a flat certificate is level 0 everywhere), over
    the labelled pixels: ``num_correct`` certified with a node that holds the true class, ``info_gain`` the
    sum over those of log C - log |classes under the node| (the certified information gain, CIG, before
    normalising), and per level l the ``pixels`` whose node is at l, how many of them are ``certified`` and
    how many certified ``wrong`` (a node without the true class)."""

    num_labelled: int
    num_correct: int
    info_gain: float
    pixels: np.ndarray
    certified: np.ndarray
    wrong: np.ndarray


def level_stats(
    label: np.ndarray,
    certified: np.ndarray,
    level: np.ndarray | None,
    node: np.ndarray,
    sizes: np.ndarray,
    ignore_index: int = 255,
) -> LevelStats:
    """:class:`LevelStats` of one certified map. ``certified``: node id at the pixel's ``level`` or ABSTAIN;
    ``node[l, c]``: the level-l node of fine class c ((1, C) identity for a flat certificate); ``sizes[l, v]``:
    |classes under node v of level l|. A pixel is correct iff certified[i] == node[level[i], label[i]]."""
    levels, num_classes = node.shape
    keep = np.asarray(label) != ignore_index
    y = np.asarray(label)[keep].astype(np.intp)
    c = np.asarray(certified)[keep].astype(np.intp)
    lv = np.zeros_like(y) if level is None else np.asarray(level)[keep].astype(np.intp)
    is_cert = c != ABSTAIN
    correct = is_cert & (c == node[lv, y])
    width = sizes.shape[1]
    gained = np.bincount(lv[correct] * width + c[correct], minlength=levels * width).reshape(levels, width)
    count = lambda mask: np.bincount(lv[mask], minlength=levels).astype(np.int64)
    return LevelStats(
        num_labelled=int(y.size),
        num_correct=int(correct.sum()),
        info_gain=info_gain(gained, sizes, num_classes),
        pixels=count(np.ones_like(is_cert)),
        certified=count(is_cert),
        wrong=count(is_cert & ~correct),
    )


def info_gain(gained: np.ndarray, sizes: np.ndarray, num_classes: int) -> float:
    """sum_{l, v} gained[l, v] (log C - log sizes[l, v]): the certified information gain of the pixels
    certified correctly with node v of level l, ``gained[l, v]`` of them. One formula for every path (pixels,
    confusion matrix, vote histograms), so that each gives the same float."""
    return float(np.sum(gained * (math.log(num_classes) - np.log(sizes))))


def flat_level_stats(confusion: np.ndarray) -> LevelStats:
    """:func:`level_stats` of a flat certificate (level 0 everywhere, every node one class) from its
    (C+1) x (C+1) confusion matrix alone, without another pass over the pixels: the labelled pixels are the
    matrix's sum, the correct ones its diagonal over the C classes, the certified ones its first C columns;
    each correct pixel gains log C - log 1 (:func:`info_gain`, so the float is the per-pixel pass's)."""
    C = confusion.shape[0] - 1
    labelled, correct = int(confusion.sum()), int(np.trace(confusion[:C, :C]))
    certified = int(confusion[:, :C].sum())
    return LevelStats(
        num_labelled=labelled,
        num_correct=correct,
        info_gain=info_gain(np.diag(confusion)[None, :C], np.ones((1, C), dtype=np.int64), C),
        pixels=np.array([labelled], dtype=np.int64),
        certified=np.array([certified], dtype=np.int64),
        wrong=np.array([certified - correct], dtype=np.int64),
    )
