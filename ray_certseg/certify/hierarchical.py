"""Hierarchical certification (after Anani, Lorenz, Schiele, Fritz, "Adaptive Hierarchical Certification for
Segmentation using Randomized Smoothing", ICML 2024), from stored votes, with any denoiser.

A hierarchy (:mod:`ray_certseg.certify.class_tree`) partitions the C fine classes into nodes at levels 0 (the classes)
to L, coarser as l grows. Per pixel i, from the selection set S0 only (never S, never the labels):

    m_i   = (first - second largest fine-class vote count in S0) / n0        (the S0 margin, in [0, 1])
    l_i   = min{ l : m_i >= t_l }, or L if there is none                      (thresholds t_0 >= ... >= t_L)
    c_i   = mode of S0 at level l_i: fine votes summed per node, ties to the lowest node id
    k_i   = #{samples in S whose class lies under node c_i}
    p_i   = P[Binom(n, tau) >= k_i]

then Holm or Bonferroni over all pixels of the image at level alpha, as SegCertify; a pixel whose null is not
rejected abstains. The sampler counts c_i and k_i for every level on the device (vote schema 2: ``margin``,
``c_hat_levels``, ``k_levels``), so any thresholds, tau, alpha and correction are certified later from the
same votes.

**Guarantee.** S0 and S are independent, and (l_i, c_i) are functions of S0 alone; given S0, k_i is
Binomial(n, q_i) with q_i = P[f_i(x + eps) under node c_i], so p_i is a valid p-value for
H0_i: q_i <= tau, and Holm / Bonferroni keep the family-wise error <= alpha. Hence with probability at least
1 - alpha every certified pixel's node is the tau-smoothed classifier's node at its chosen level
(q_i > tau > 1/2, so that node is unique), and it keeps that node under any ||delta||_2 < R = sigma * Phi^-1(tau).
Choosing l_i from S instead makes the family of hypotheses data-dependent and voids this under Holm:
``ray-certseg selftest --procedure hierarchical --level-from-s`` fails (docs/hierarchical.md).

Certified information gain per pixel: log C - log |classes under c_i| if the pixel is certified and c_i holds
its true class, else 0 (the reducer sums it for every procedure; SegCertify's certified pixels gain log C).
"""

from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from ray_certseg.certify import class_tree
from ray_certseg.certify.procedure import CertifiedMap, Params, Procedure
from ray_certseg.certify.segcertify import can_certify, certify


class HierarchicalParams(Params):
    """One point: the hierarchy (a shipped name or a file), thresholds t_0 >= ... >= t_L, tau, alpha, correction."""

    hierarchy: str
    thresholds: tuple[float, ...] = Field(min_length=2)
    tau: float = Field(gt=0.5, lt=1.0)
    alpha: float = Field(gt=0.0, lt=1.0)
    correction: Literal["holm", "bonferroni"] = "holm"

    @field_validator("thresholds", mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        """``"0.25,0.1,0"`` (the CLI's form) or a list."""
        if isinstance(value, str):
            return tuple(float(v) for v in value.split(","))
        return tuple(value) if isinstance(value, list) else value

    @field_validator("thresholds")
    @classmethod
    def _check(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.0 <= t <= 1.0 for t in value) or any(a < b for a, b in itertools.pairwise(value)):
            raise ValueError(
                f"thresholds must be margins in [0, 1], non-increasing from level 0, got {value}"
            )
        return value


@lru_cache(maxsize=16)
def _hierarchy(source: str) -> class_tree.Hierarchy:
    return class_tree.load(source)


def choose_level(margin: np.ndarray, n0: int, thresholds: tuple[float, ...]) -> np.ndarray:
    """l_i = min{l : margin_i / n0 >= t_l}, else the coarsest level L = len(thresholds) - 1 (int8)."""
    m = np.asarray(margin, dtype=np.float64) / float(n0)
    level = np.full(m.shape, len(thresholds) - 1, dtype=np.int8)
    for lvl in range(len(thresholds) - 1, -1, -1):  # finest last, so it wins
        level[m >= thresholds[lvl]] = lvl
    return level


def certify_hierarchical(rec: Any, p: HierarchicalParams) -> CertifiedMap:
    """CERTIFY of one vote row at the levels :func:`choose_level` picks from S0 (see the module docstring)."""
    h = row_hierarchy(rec, p)
    return certify_levels(rec, h, p.thresholds, tau=p.tau, alpha=p.alpha, correction=p.correction)


def row_hierarchy(rec: Any, p: HierarchicalParams) -> class_tree.Hierarchy:
    """The hierarchy of ``p``, checked against the one the row's votes were counted for."""
    h = _hierarchy(p.hierarchy)
    if rec.hierarchy != h.digest or rec.c_hat_levels is None:
        raise ValueError(
            f"vote row {rec.image_id} ({rec.method}, sigma {rec.sigma:g}) was counted for hierarchy "
            f"{rec.hierarchy!r}, not {h.digest!r}: sample with dataset.hierarchy: {p.hierarchy} to certify it"
        )
    check_thresholds(h, p.thresholds)
    return h


def check_thresholds(h: class_tree.Hierarchy, thresholds: tuple[float, ...]) -> None:
    """One threshold per level of ``h``."""
    if len(thresholds) != h.num_levels:
        raise ValueError(
            f"hierarchy {h.name!r} has {h.num_levels} levels (0..{h.num_levels - 1}): give one threshold per "
            f"level, got {len(thresholds)}"
        )


def certify_levels(
    rec: Any,
    h: class_tree.Hierarchy,
    thresholds: tuple[float, ...],
    *,
    tau: float,
    alpha: float,
    correction: str,
) -> CertifiedMap:
    """The procedure's arithmetic on a row's stored votes: level from the margin, then c, k at that level,
    then SegCertify's test and correction over all pixels."""
    check_thresholds(h, thresholds)
    level = choose_level(rec.margin, rec.n0, thresholds)
    c_all = np.concatenate([np.asarray(rec.c_hat)[None].astype(np.int32), rec.c_hat_levels.astype(np.int32)])
    k_all = np.concatenate([np.asarray(rec.k)[None], rec.k_levels])
    index = level[None].astype(np.intp)
    c_sel = np.take_along_axis(c_all, index, axis=0)[0]
    k_sel = np.take_along_axis(k_all, index, axis=0)[0]
    cert = certify(c_sel, k_sel, n=rec.n, sigma=rec.sigma, tau=tau, alpha=alpha, correction=correction)
    return CertifiedMap(cert.labels, cert.radius, level=level, hierarchy=h)


def _can_certify_row(rec: Any, p: HierarchicalParams) -> bool:
    return can_certify(rec.n, p.tau, p.alpha, rec.c_hat.size)


HIERARCHICAL = Procedure(
    name="hierarchical",
    params=HierarchicalParams,
    certify=certify_hierarchical,
    columns=("c_hat", "k", "margin", "c_hat_levels", "k_levels"),
    certifiable=_can_certify_row,
)
"""Hierarchical certification as a procedure (needs votes sampled with ``dataset.hierarchy``)."""
