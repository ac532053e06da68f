"""Pooling per-image records into dataset rows, one chunk at a time.

A per-image record (:data:`ray_certseg.results.reduce.PER_IMAGE_SCHEMA`) holds one vote row certified at one grid point:
its (C+1) x (C+1) confusion matrices (certified, clean, majority vote), pixel counts and per-level counts. A
dataset row sums them per group of GROUP_KEY (dataset, method, denoiser, segmenter, sigma, point, n0, n):

    confusion = sum_i confusion_i,   abstain_rate = (1 / M) sum_i abstained_i / pixels_i,
    CIG = sum_i info_gain_i / (sum_i labelled_i * log C),

so :class:`Pool` keeps only those sums, O(groups x C^2) memory whatever the number of images: the reducer
feeds it chunks of records and never holds them all. Integer sums are exact; the float sums (info gain,
abstain fractions, seconds) are exact too (Shewchuk's partials, rounded once at the end), so a row does not
depend on how the records were chunked or ordered.

Like for like (``pooling="common"``): per (dataset, sigma), only the images that every method there has are
pooled. Which images those are is known only from every row's key, so a streaming caller finds them first from
the keys alone (:func:`left_out` on a frame of image_id, dataset, method, sigma) and passes them to the pool.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ray_certseg.results.metrics import pooled_metrics

log = logging.getLogger("ray_certseg")

GROUP_KEY = [
    "dataset",
    "method",
    "denoiser",
    "segmenter",
    "sigma",
    "procedure",
    "params",
    "tau",
    "alpha",
    "correction",
    "n0",
    "n",
]
RECORD_KEY = ["image_id", "method", "sigma", "procedure", "params", "tau", "alpha", "correction"]
VOTE_ROW_KEY = ["image_id", "method", "sigma"]
"""A vote row's key: one (image, method, sigma) is sampled once."""
LIKE_FOR_LIKE = [
    "dataset",
    "sigma",
]  # like for like: within a (dataset, sigma), every method over the same images
POOLINGS = ("common", "all")
MATRICES = ("confusion", "clean_confusion", "vote_confusion")
LEVELS = ("level_pixels", "level_certified", "level_wrong")
FLOAT_KEY = ("sigma", "tau", "alpha")

PER_IMAGE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("dataset", pa.string()),
        ("method", pa.string()),
        ("denoiser", pa.string()),
        ("segmenter", pa.string()),
        ("sigma", pa.float64()),
        ("procedure", pa.string()),
        ("params", pa.string()),
        ("tau", pa.float64()),
        ("alpha", pa.float64()),
        ("correction", pa.string()),
        ("n0", pa.int32()),
        ("n", pa.int32()),
        ("num_classes", pa.int32()),
        ("radius", pa.float64()),
        ("num_certified", pa.int64()),
        ("family_size", pa.int64()),
        ("certifiable", pa.bool_()),
        ("num_pixels", pa.int64()),
        ("num_abstained", pa.int64()),
        ("num_labelled", pa.int64()),
        ("num_correct", pa.int64()),
        ("info_gain", pa.float64()),
        ("level_pixels", pa.large_list(pa.int64())),
        ("level_certified", pa.large_list(pa.int64())),
        ("level_wrong", pa.large_list(pa.int64())),
        ("confusion", pa.large_list(pa.int64())),
        ("clean_confusion", pa.large_list(pa.int64())),
        ("vote_confusion", pa.large_list(pa.int64())),
        ("sample_seconds", pa.float64()),
    ]
)
"""One vote row certified at one grid point (``metrics/per_image.parquet``; :func:`ray_certseg.results.image_records.image_rows`)."""


class ExactSum:
    """The correctly rounded sum of every value added, in any order or chunking (Shewchuk's exact partials,
    the algorithm of ``math.fsum``, kept between calls)."""

    def __init__(self) -> None:
        self.partials: list[float] = []

    def add(self, values: Iterable[float]) -> None:
        partials = self.partials
        for x in values:
            x = float(x)
            i = 0
            for y in partials:
                if abs(x) < abs(y):
                    x, y = y, x
                hi = x + y
                lo = y - (hi - x)
                if lo:
                    partials[i] = lo
                    i += 1
                x = hi
            partials[i:] = [x]

    @property
    def value(self) -> float:
        return math.fsum(self.partials)


def deduplicate(per_image: pd.DataFrame) -> pd.DataFrame:
    """Sort into a canonical order; a vote row present twice (a defect upstream) is counted once, loudly."""
    per_image = canonical_order(per_image)
    dup = per_image.duplicated(RECORD_KEY)
    if dup.any():
        log.warning(
            "%d duplicated per-image rows (same image, method, sigma, grid point) ignored", int(dup.sum())
        )
        per_image = per_image[~dup].reset_index(drop=True)
    return per_image


def left_out(keys: pd.DataFrame) -> pd.DataFrame:
    """The images that like-for-like pooling leaves out: per (dataset, sigma), each image that some method
    there has and another lacks (its row failed). ``keys``: per-image records or vote-row keys (columns
    dataset, sigma, image_id, method). Columns dataset, sigma, image_id, has, lacks (method names joined by
    ", ")."""
    ids = keys[LIKE_FOR_LIKE + ["image_id", "method"]].drop_duplicates()
    methods = ids.groupby(LIKE_FOR_LIKE, sort=True)["method"].agg(lambda m: sorted(set(m)))
    rows = []
    for (dataset, sigma, image_id), g in ids.groupby(LIKE_FOR_LIKE + ["image_id"], sort=True):
        every = methods.loc[(dataset, sigma)]
        has = sorted(set(g["method"]))
        if has != every:
            rows.append(
                {
                    "dataset": dataset,
                    "sigma": sigma,
                    "image_id": image_id,
                    "has": ", ".join(has),
                    "lacks": ", ".join(m for m in every if m not in has),
                }
            )
    return pd.DataFrame(rows, columns=LIKE_FOR_LIKE + ["image_id", "has", "lacks"])


def _left_out_of(skipped: pd.DataFrame, row: dict[str, Any]) -> int:
    """How many of this row's method's images like-for-like pooling left out at its (dataset, sigma)."""
    here = (skipped["dataset"] == row["dataset"]) & (skipped["sigma"] == row["sigma"])
    return int((here & skipped["has"].str.split(", ").map(lambda h: row["method"] in h)).sum())


class _Group:
    """The running sums of one group (one GROUP_KEY value)."""

    def __init__(self, first: dict[str, Any]):
        self.num_classes = int(first["num_classes"])
        self.radius = float(first["radius"])
        side = self.num_classes + 1
        self.matrices = {m: np.zeros((side, side), dtype=np.int64) for m in MATRICES}
        self.levels = {m: np.zeros(len(first[m]), dtype=np.int64) for m in LEVELS}
        self.counts = {"images": 0, "labelled": 0, "correct": 0, "infeasible": 0, "max_family_size": 0}
        self.sums = {"abstained": ExactSum(), "info_gain": ExactSum(), "seconds": ExactSum()}

    def add(self, chunk: pa.Table, index: np.ndarray) -> None:
        rows = pa.array(index)
        take = lambda name: chunk.column(name).take(rows)
        side = self.num_classes + 1
        for m in MATRICES:
            values = take(m).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            self.matrices[m] += values.reshape(-1, side, side).sum(0)
        for m in LEVELS:
            values = take(m).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            self.levels[m] += values.reshape(len(index), -1).sum(0)
        column = lambda name: take(name).to_numpy(zero_copy_only=False)
        self.counts["images"] += len(index)
        self.counts["labelled"] += int(column("num_labelled").sum())
        self.counts["correct"] += int(column("num_correct").sum())
        self.counts["infeasible"] += int((~column("certifiable")).sum())
        self.counts["max_family_size"] = max(self.counts["max_family_size"], int(column("family_size").max()))
        self.sums["abstained"].add(column("num_abstained") / column("num_pixels"))
        self.sums["info_gain"].add(column("info_gain"))
        self.sums["seconds"].add(column("sample_seconds"))

    def row(self, pooling: str, images_left_out: int) -> dict[str, Any]:
        """The dataset row's metrics (after its GROUP_KEY columns)."""
        C, M = self.num_classes, self.counts["images"]
        cert = pooled_metrics(self.matrices["confusion"], self.sums["abstained"].value / M, M)
        clean = pooled_metrics(self.matrices["clean_confusion"], 0.0, M)
        vote = pooled_metrics(self.matrices["vote_confusion"], 0.0, M)
        labelled = self.counts["labelled"]
        level_pixels, level_cert, level_wrong = (self.levels[m] for m in LEVELS)
        denominator = np.maximum(1, level_pixels)
        return {
            "cig": self.sums["info_gain"].value / (labelled * math.log(C)) if labelled and C > 1 else 0.0,
            "level_accuracy": self.counts["correct"] / labelled if labelled else 0.0,
            "level_share_per_level": (level_pixels / max(1, labelled)).tolist(),
            "certified_rate_per_level": (level_cert / denominator).tolist(),
            "abstain_rate_per_level": ((level_pixels - level_cert) / denominator).tolist(),
            "wrong_rate_per_level": (level_wrong / denominator).tolist(),
            "radius": self.radius,
            "certified_accuracy": cert.accuracy,
            "certified_error": cert.error_rate,
            "miou": cert.miou,
            "miou_present": cert.miou_present,
            "classes_present": cert.num_present_classes,
            "abstain_rate": cert.abstain_rate,
            "abstain_rate_pooled": cert.abstain_rate_pooled,
            "clean_accuracy": clean.accuracy,
            "clean_miou": clean.miou,
            "vote_accuracy": vote.accuracy,
            "vote_miou": vote.miou,
            "images": M,
            "infeasible_images": self.counts["infeasible"],
            "max_family_size": self.counts["max_family_size"],
            "pixels": cert.num_pixels,
            "seconds_per_image": self.sums["seconds"].value / M,
            "certified_dice": cert.mdice,
            "dice_present": cert.mdice_present,
            "worst_accuracy": cert.worst_accuracy,
            "worst_miou": cert.worst_miou,
            "worst_dice": cert.worst_mdice,
            "pooling": pooling,
            "images_left_out": images_left_out,
            "iou_per_class": cert.iou.tolist(),
            "abstain_rate_per_class": np.nan_to_num(cert.abstain_rate_per_class, nan=-1.0).tolist(),
            "dice_per_class": cert.dice.tolist(),
            "worst_iou_per_class": cert.worst_iou.tolist(),
            "worst_dice_per_class": cert.worst_dice.tolist(),
        }


def _sort_key(key: tuple[Any, ...]) -> tuple[Any, ...]:
    """GROUP_KEY tuples in pandas' ``groupby(sort=True, dropna=False)`` order: ascending, missing values last."""
    return tuple((v is None, 0 if v is None else v) for v in key)


class Pool:
    """Dataset rows from per-image records fed in chunks (:meth:`add`), holding only per-group sums.

    ``left``: the images like-for-like pooling leaves out (:func:`left_out`, from every row's key); with
    ``pooling="common"`` their records are not pooled. ``"all"`` pools every record."""

    def __init__(self, pooling: str = "common", left: pd.DataFrame | None = None):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.left = (
            left if left is not None else pd.DataFrame(columns=LIKE_FOR_LIKE + ["image_id", "has", "lacks"])
        )
        self.drop = (
            set(zip(self.left["dataset"], self.left["sigma"].astype(float), self.left["image_id"]))
            if pooling == "common"
            else set()
        )
        self.groups: dict[tuple[Any, ...], _Group] = {}

    def add(self, chunk: pa.Table) -> None:
        """Fold a table of per-image records into the sums."""
        if not chunk.num_rows:
            return
        keys = list(zip(*(chunk.column(c).to_pylist() for c in GROUP_KEY)))
        if self.drop:
            ids = zip(
                chunk.column("dataset").to_pylist(),
                chunk.column("sigma").to_pylist(),
                chunk.column("image_id").to_pylist(),
            )
            pooled = [i for i, k in enumerate(ids) if k not in self.drop]
        else:
            pooled = range(len(keys))
        rows: dict[tuple[Any, ...], list[int]] = {}
        for i in pooled:
            rows.setdefault(keys[i], []).append(i)
        for key, index in rows.items():
            if key not in self.groups:
                self.groups[key] = _Group(chunk.slice(index[0], 1).to_pylist()[0])
            self.groups[key].add(chunk, np.asarray(index))

    @property
    def empty(self) -> bool:
        return not self.groups

    def metrics(self) -> pd.DataFrame:
        """One row per group, sorted by GROUP_KEY (as :func:`pool_records` of the same records)."""
        out = []
        for key in sorted(self.groups, key=_sort_key):
            row = dict(zip(GROUP_KEY, key))
            skipped = _left_out_of(self.left, row) if self.pooling == "common" else 0
            row.update(self.groups[key].row(self.pooling, skipped))
            out.append(row)
        frame = pd.DataFrame(out)
        for name in FLOAT_KEY:  # a parameter no point has is NaN, as a pandas group key is
            if name in frame:
                frame[name] = frame[name].astype("float64")
        return frame


def pool_records(per_image: pd.DataFrame, pooling: str = "common") -> pd.DataFrame:
    """Dataset rows of per-image records held in memory: :class:`Pool` over all of them, like for like by
    default (:func:`left_out` lists the images that leaves out; ``images_left_out`` counts them per row),
    every record with ``pooling="all"`` (methods may then cover different images)."""
    acc = Pool(pooling, left_out(per_image))
    table = pa.Table.from_pandas(
        per_image[PER_IMAGE_SCHEMA.names], schema=PER_IMAGE_SCHEMA, preserve_index=False
    )
    acc.add(table)
    return acc.metrics()


def canonical_order(per_image: pd.DataFrame) -> pd.DataFrame:
    """Per-image records sorted by RECORD_KEY (image, method, sigma, point): the order a reader gets them in."""
    return per_image.sort_values(RECORD_KEY, kind="stable").reset_index(drop=True)
