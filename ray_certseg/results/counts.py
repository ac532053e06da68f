"""Vote histograms of one vote row, from which a procedure's per-image record at any point follows in O(bins)
instead of a pass over the pixels: SegCertify's (label, c_hat, k) and hierarchical certification's
(S0 margin, label, node, k) per level. Both decide a pixel from its k alone once the rest is fixed (Holm and
Bonferroni give every pixel with the same k the same decision, ``certify.reject_by_votes``), so a curve of many
taus or a sweep of many thresholds costs one pass over each row. Each equals, integer for integer and float
for float, the record of the procedure's certified map (tested)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ray_certseg import certify, votes
from ray_certseg.certify import class_tree
from ray_certseg.certify.hierarchical import HIERARCHICAL, HierarchicalParams, choose_level, row_hierarchy
from ray_certseg.results.metrics import ImageStats, LevelStats, info_gain

MAX_BINS = 1 << 22
"""The most histogram bins (int64) :class:`HierarchicalCounts` keeps for one row (32 MiB); a row that needs
more (many classes, n0 and n together) is certified from its map instead."""


class SegCertifyCounts:
    """One vote row's labelled pixels counted by (true class g, c_hat, k), H[g, c, j], and every pixel by k,
    h[j]. SegCertify certifies a pixel by its k alone (``certify.reject_by_votes``: reject[j] from h), so at
    any (tau, alpha, correction) the confusion matrix of its certified map is

        M[g, c] = sum_j H[g, c, j] reject[j]   (c < C),      M[g, C] = sum_{c, j} H[g, c, j] (1 - reject[j]),

    with (C+1) x (C+1) sums and no pass over the pixels per point."""

    def __init__(self, counts: np.ndarray, histogram: np.ndarray, n: int):
        self.counts, self.histogram, self.n = counts, histogram, n
        self.num_classes, self.num_pixels = counts.shape[0], int(histogram.sum())

    @classmethod
    def of(cls, rec: votes.VoteRecord) -> SegCertifyCounts:
        """Count the row's pixels (one pass)."""
        C, n = rec.num_classes, rec.n
        label, c_hat, k = (np.asarray(a).reshape(-1) for a in (rec.label, rec.c_hat, rec.k))
        certify.check_votes(c_hat, k, n=n, num_classes=C)
        keep = label != rec.ignore_index
        index = (label[keep].astype(np.int64) * C + c_hat[keep]) * (n + 1) + k[keep]
        counts = np.bincount(index, minlength=C * C * (n + 1)).reshape(C, C, n + 1)
        return cls(counts, certify.vote_histogram(k, n), n)

    @classmethod
    def of_levels(cls, tree: HierarchicalCounts) -> SegCertifyCounts:
        """The same counts summed from a row's level-0 histogram H_0[m, g, c, j] over m (no pass over pixels)."""
        h0 = tree.counts[0]
        return cls(h0[:, : tree.num_classes].sum(axis=0), h0.sum(axis=(0, 1, 2)), tree.n)

    def vote_stats(self) -> ImageStats:
        """:func:`image_stats` of c_hat itself (the majority vote)."""
        return self._stats(self.counts.sum(axis=2), np.zeros(self.num_classes, dtype=np.int64), 0)

    def stats(self, params: certify.SegCertifyParams) -> tuple[ImageStats, int]:
        """(:func:`image_stats` of the certified map, its certified pixel count) at ``params``."""
        p = params
        reject = certify.reject_by_votes(
            self.histogram, n=self.n, tau=p.tau, alpha=p.alpha, correction=p.correction
        )
        certified = self.counts @ reject.astype(np.int64)
        abstained = (self.counts @ (~reject).astype(np.int64)).sum(axis=1)
        num_certified = int(self.histogram[reject].sum())
        return self._stats(certified, abstained, self.num_pixels - num_certified), num_certified

    def _stats(self, certified: np.ndarray, abstained: np.ndarray, num_abstained: int) -> ImageStats:
        C = self.num_classes
        confusion = np.zeros((C + 1, C + 1), dtype=np.int64)
        confusion[:C, :C], confusion[:C, C] = certified, abstained
        return ImageStats(confusion=confusion, num_pixels=self.num_pixels, num_abstained=num_abstained)


@dataclass(frozen=True, eq=False)
class HierarchicalStats:
    """A hierarchical point's record of one row: the confusion of its fine (level-0) certificates, its level
    figures and how many pixels it certified (at any level)."""

    image: ImageStats
    levels: LevelStats
    num_certified: int


class HierarchicalCounts:
    """One vote row counted for hierarchical certification (:mod:`ray_certseg.certify.hierarchical`): per level
    l, with m_i the S0 margin (0..n0), g_i the label (C for an ignore label) and c_l,i, k_l,i the level-l node
    and its votes in S,

        H_l[m, g, v, j] = #{pixels i : m_i = m, g_i = g, c_l,i = v, k_l,i = j}.

    Thresholds t give pixel i the level lambda(m_i) (:func:`choose_level` of the n0 + 1 margins), so the
    pixels of level l are counted by A_l[g, v, j] = sum_{m : lambda(m) = l} H_l[m, g, v, j]; the family's
    vote histogram is h[j] = sum_{l, g, v} A_l[g, v, j], reject[j] follows from h as in SegCertify, and the
    pixels certified at level l with node v from true class g number cert_l[g, v] = sum_j A_l[g, v, j] reject[j].
    The fine confusion, the level figures and the CIG are sums of cert_l: O(bins) per point, none over pixels."""

    def __init__(self, rec: votes.VoteRecord, tree: class_tree.Hierarchy):
        C, n, n0 = rec.num_classes, rec.n, rec.n0
        if tree.num_classes != C:
            raise ValueError(
                f"vote row {rec.image_id} has {C} classes, hierarchy {tree.name!r} {tree.num_classes}"
            )
        self.tree, self.n, self.n0, self.num_classes = tree, n, n0, C
        label = np.asarray(rec.label).reshape(-1)
        margin = np.asarray(rec.margin).reshape(-1)
        if margin.size and (int(margin.min()) < 0 or int(margin.max()) > n0):
            raise ValueError(
                f"vote row {rec.image_id} ({rec.method}, sigma {rec.sigma:g}): margin holds values outside "
                f"[0, n0 = {n0}] (min {margin.min()}, max {margin.max()}); the vote file is damaged: sample again"
            )
        g = label.astype(np.int32)  # labels are checked before (the clean record)
        g[label == rec.ignore_index] = C
        base = margin.astype(np.int32) * (C + 1) + g
        nodes = [np.asarray(rec.c_hat), *np.asarray(rec.c_hat_levels)]
        ks = [np.asarray(rec.k), *np.asarray(rec.k_levels)]
        self.counts = []
        for width, c_l, k_l in zip((len(names) for names in tree.names), nodes, ks):
            c_l, k_l = c_l.reshape(-1), k_l.reshape(-1)
            certify.check_votes(c_l, k_l, n=n, num_classes=width)
            key = base * width
            key += c_l
            key *= n + 1
            key += k_l
            shape = (n0 + 1, C + 1, width, n + 1)
            self.counts.append(np.bincount(key, minlength=int(np.prod(shape))).reshape(shape))
        self.num_pixels = int(label.size)
        self.labelled = self.counts[0][:, :C].sum(axis=(0, 2, 3))  # per true class
        self._by_level: dict[bytes, _Levels] = {}

    @staticmethod
    def fits(rec: votes.VoteRecord, tree: class_tree.Hierarchy) -> bool:
        """Whether the row's histograms hold at most :data:`MAX_BINS` bins."""
        nodes = sum(len(names) for names in tree.names)
        return (rec.n0 + 1) * (rec.num_classes + 1) * nodes * (rec.n + 1) <= MAX_BINS

    def stats(self, p: HierarchicalParams) -> HierarchicalStats:
        """The record of ``certify_hierarchical(rec, p)``'s map, from the histograms."""
        C, (node, sizes) = self.num_classes, self.tree.tables
        levels_of = self._levels(choose_level(np.arange(self.n0 + 1), self.n0, p.thresholds))
        by_level, histogram = levels_of.counts, levels_of.histogram
        reject = certify.reject_by_votes(
            histogram, n=self.n, tau=p.tau, alpha=p.alpha, correction=p.correction
        ).astype(np.int64)
        certified = [a[:C] @ reject for a in by_level]  # cert_l[g, v], labelled pixels
        correct = [cert[np.arange(C), node[lv]] for lv, cert in enumerate(certified)]  # per true class
        gained = np.zeros(sizes.shape, dtype=np.int64)
        for lv, per_class in enumerate(correct):
            np.add.at(gained[lv], node[lv], per_class)
        confusion = np.zeros((C + 1, C + 1), dtype=np.int64)
        confusion[:C, :C] = certified[0]
        confusion[:C, C] = self.labelled - certified[0].sum(axis=1)  # coarser nodes are no fine certificate
        num_certified = int(histogram @ reject)
        level_certified = np.array([cert.sum() for cert in certified], dtype=np.int64)
        level_correct = np.array([c.sum() for c in correct], dtype=np.int64)
        levels = LevelStats(
            num_labelled=int(self.labelled.sum()),
            num_correct=int(level_correct.sum()),
            info_gain=info_gain(gained, sizes, C),
            pixels=levels_of.pixels,
            certified=level_certified,
            wrong=level_certified - level_correct,
        )
        fine_certified = int((by_level[0] @ reject).sum())  # ignore-label pixels included
        fine = ImageStats(confusion, self.num_pixels, self.num_pixels - fine_certified)
        return HierarchicalStats(fine, levels, num_certified)

    def _levels(self, level_of: np.ndarray) -> _Levels:
        """A_l, h and the labelled pixels per level, given lambda(m) for m = 0..n0; kept, as a curve's taus
        share the thresholds."""
        key = level_of.tobytes()
        if key not in self._by_level:
            counts = [h[level_of == lv].sum(axis=0) for lv, h in enumerate(self.counts)]
            histogram = sum(a.sum(axis=(0, 1)) for a in counts)
            pixels = np.array([a[: self.num_classes].sum() for a in counts], dtype=np.int64)
            self._by_level[key] = _Levels(counts, histogram, pixels)
        return self._by_level[key]


@dataclass(frozen=True, eq=False)
class _Levels:
    """What a level assignment lambda fixes, whatever tau, alpha and correction: A_l per level, the family's
    vote histogram h and the labelled pixels per level."""

    counts: list[np.ndarray]
    histogram: np.ndarray
    pixels: np.ndarray


class RowCounts:
    """The histograms of one vote row that a grid's points read, each made once: SegCertify's and one per
    hierarchy (when it :meth:`HierarchicalCounts.fits`; SegCertify's are then summed from its level 0)."""

    def __init__(self, rec: votes.VoteRecord, points: tuple[certify.Point, ...]):
        self.rec = rec
        self._trees: dict[str, HierarchicalCounts | None] = {}
        self._segcertify: SegCertifyCounts | None = None
        for point in points:  # the trees first, so that SegCertify's counts come from one of them
            if point.procedure is HIERARCHICAL:
                self.hierarchical(point.params)

    def segcertify(self) -> SegCertifyCounts:
        if self._segcertify is None:
            tree = next((t for t in self._trees.values() if t is not None), None)
            self._segcertify = (
                SegCertifyCounts.of(self.rec) if tree is None else SegCertifyCounts.of_levels(tree)
            )
        return self._segcertify

    def hierarchical(self, p: HierarchicalParams) -> HierarchicalCounts | None:
        """The row's counts for ``p``'s hierarchy, None when they would not fit :data:`MAX_BINS`."""
        tree = row_hierarchy(self.rec, p)
        if tree.digest not in self._trees:
            fits = HierarchicalCounts.fits(self.rec, tree)
            self._trees[tree.digest] = HierarchicalCounts(self.rec, tree) if fits else None
        return self._trees[tree.digest]
