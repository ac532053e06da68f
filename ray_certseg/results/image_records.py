"""Per-image records: a vote row certified at every point of a grid -> one small record per point (the
(C+1) x (C+1) confusion matrix with abstain, pixel and level counts), the map of the one chunked path."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from ray_certseg import certify, votes
from ray_certseg.certify import ABSTAIN
from ray_certseg.certify.hierarchical import HIERARCHICAL
from ray_certseg.results.aggregate import PER_IMAGE_SCHEMA
from ray_certseg.results.counts import RowCounts
from ray_certseg.results.metrics import flat_level_stats, image_stats, level_stats

POINT_COLUMNS = ("tau", "alpha", "correction")
"""Parameters copied from a point into their own columns (null where the procedure has no such parameter), so
SegCertify rows read as they always did."""


@dataclass(frozen=True)
class Grid:
    """What the reducer certifies each vote row at: the shared (tau, alpha, correction) grid and the
    certification procedures (entries of ``certify.procedures``; SegCertify alone by default), each expanded
    to its points by :func:`ray_certseg.certify.points`."""

    taus: tuple[float, ...]
    alphas: tuple[float, ...]
    corrections: tuple[str, ...]
    procedures: tuple[Any, ...] = ("segcertify",)

    def points(self) -> tuple[certify.Point, ...]:
        shared = {"taus": self.taus, "alphas": self.alphas, "corrections": self.corrections}
        return certify.points(self.procedures, shared)

    def __iter__(self):
        return iter(self.points())


def image_rows(rec: votes.VoteRecord, grid: Grid | Sequence[certify.Point]) -> list[dict[str, Any]]:
    """One record per point for one vote row: the point's certified map and the confusion matrices of the
    certified map, of the clean prediction and of the majority vote c_hat. SegCertify's and hierarchical
    certification's points are counted from the row's vote histograms (:mod:`ray_certseg.results.counts`: one
    pass over the row for all of them), the others from their map."""
    C, ignore = rec.num_classes, rec.ignore_index
    points = tuple(grid)
    clean = image_stats(rec.label, rec.clean_pred, C, ignore)  # checks the labels first
    counted = RowCounts(rec, points)
    with_segcertify = any(p.procedure is certify.SEGCERTIFY for p in points)
    vote = (
        counted.segcertify().vote_stats() if with_segcertify else image_stats(rec.label, rec.c_hat, C, ignore)
    )
    rows = []
    flat = (np.arange(C)[None], np.ones((1, C), dtype=np.int64))
    for point in points:
        by_level = counted.hierarchical(point.params) if point.procedure is HIERARCHICAL else None
        if point.procedure is certify.SEGCERTIFY:
            st, num_certified = counted.segcertify().stats(point.params)
            radius = certify.radius(rec.sigma, point.params.tau)
            lv, num_abstained = flat_level_stats(st.confusion), st.num_abstained
        elif by_level is not None:
            counts = by_level.stats(point.params)
            st, lv, num_certified = counts.image, counts.levels, counts.num_certified
            radius = certify.radius(rec.sigma, point.params.tau)
            num_abstained = st.num_pixels - num_certified
        else:
            cert = point.run(rec)
            radius, num_certified = cert.radius, cert.num_certified
            level = getattr(cert, "level", None)
            tree = getattr(cert, "hierarchy", None)
            fine = cert.labels if level is None else np.where(level == 0, cert.labels, ABSTAIN)
            st = image_stats(rec.label, fine, C, ignore)  # a coarse certificate is no fine one: abstain here
            if level is None and tree is None:  # flat: every level figure follows from the confusion matrix
                lv = flat_level_stats(st.confusion)
            else:
                lv = level_stats(
                    rec.label, cert.labels, level, *(flat if tree is None else tree.tables), ignore
                )
            num_abstained = int(np.count_nonzero(cert.labels == ABSTAIN))
        params = point.params.model_dump()
        rows.append(
            {
                "image_id": rec.image_id,
                "dataset": rec.dataset,
                "method": rec.method,
                "denoiser": rec.denoiser,
                "segmenter": rec.segmenter,
                "sigma": rec.sigma,
                "procedure": point.procedure.name,
                "params": point.key,
                **{name: params.get(name) for name in POINT_COLUMNS},
                "n0": rec.n0,
                "n": rec.n,
                "num_classes": C,
                "radius": float(radius),
                "num_certified": int(num_certified),
                "family_size": rec.c_hat.size,
                "certifiable": point.can_certify(rec),
                "num_pixels": st.num_pixels,
                "num_abstained": num_abstained,
                "num_labelled": lv.num_labelled,
                "num_correct": lv.num_correct,
                "info_gain": lv.info_gain,
                "level_pixels": lv.pixels,
                "level_certified": lv.certified,
                "level_wrong": lv.wrong,
                "confusion": st.confusion.reshape(-1),
                "clean_confusion": clean.confusion.reshape(-1),
                "vote_confusion": vote.confusion.reshape(-1),
                "sample_seconds": rec.sample_seconds,
            }
        )
    return rows


def record_columns(points: Sequence[certify.Point]) -> list[str]:
    """The vote array columns :func:`image_rows` reads for ``points``: the label, c_hat, the clean
    prediction, and whatever the points' procedures read."""
    return list(dict.fromkeys(["label", "c_hat", "clean_pred", *certify.columns(points)]))


def certify_table(table: pa.Table, grid: Grid | Sequence[certify.Point]) -> pa.Table:
    """Vote rows (Arrow) -> per-image records (Arrow): :class:`GridRecords` of the grid on one table."""
    return GridRecords(grid)(table)


class Records(Protocol):
    """A map from vote rows to per-image records (:class:`GridRecords`, ``curves.CurveRecords``): the map of
    the one chunked path (:func:`fold`)."""

    columns: list[str]  # the vote array columns it reads
    per_row: int  # records per vote row, for the chunk size

    def from_records(self, recs: Iterable[votes.VoteRecord]) -> pa.Table: ...

    def __call__(self, table: pa.Table) -> pa.Table: ...


class GridRecords:
    """Vote rows -> their per-image records at every point of a grid (:func:`image_rows`); the vote columns
    it reads in ``columns``. The map of the reducer, of ``recertify`` and of the threshold sweep."""

    def __init__(self, grid: Grid | Sequence[certify.Point]):
        self.points = tuple(grid)
        self.columns = record_columns(self.points)
        self.per_row = len(self.points)

    def from_records(self, recs: Iterable[votes.VoteRecord]) -> pa.Table:
        rows = [r for rec in recs for r in image_rows(_require_maps(rec, self.columns), self.points)]
        return pa.Table.from_pylist(rows, schema=PER_IMAGE_SCHEMA)

    def __call__(self, table: pa.Table) -> pa.Table:
        return self.from_records(votes.read_votes(table, columns=self.columns))


def _require_maps(rec: votes.VoteRecord, columns: Sequence[str]) -> votes.VoteRecord:
    absent = [c for c in columns if c in ("label", "c_hat", "k", "clean_pred") and getattr(rec, c) is None]
    if absent:
        raise ValueError(
            f"vote row {rec.image_id}/{rec.method}/sigma={rec.sigma} has no {absent}: load the votes with "
            f"columns including {[c for c in columns if c in votes.ARRAY_COLUMNS]}"
        )
    return rec
