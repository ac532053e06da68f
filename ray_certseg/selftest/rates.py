"""Exact rates for the self-test: the binomial test's critical count, the selection probabilities of c_hat, Bonferroni's
exact per-image false-certificate rate for independent pixels, and the Poisson-binomial test of a failure count."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from scipy.special import gammaln
from scipy.stats import binom

MAX_OUTCOMES = 10**7
"""Largest (selection-vote outcomes C(n0 + C - 1, C - 1)) x (pixels) enumerated for the exact rate."""


def critical_count(n: int, tau: float, level: float | np.ndarray) -> np.ndarray:
    """k* = the smallest k with P[Binom(n, tau) >= k] <= level (n + 1 if none): a pixel with k_i >= k* passes
    the per-pixel threshold ``level`` (alpha / N for Bonferroni). Elementwise over ``level``."""
    return np.argmax(tail_probabilities(n, tau) <= np.asarray(level, dtype=np.float64)[..., None], axis=-1)


def selection_probabilities(probabilities: np.ndarray, n0: int) -> np.ndarray | None:
    """P[c_hat_i = c] for n0 selection votes ~ Multinomial(n0, P_i) and ties to the lowest class, exactly.

    Sums the multinomial pmf over every vote vector v (n0 split over C classes) whose first argmax is c:
    log pmf = log n0! - sum_c log v_c! + sum_c v_c log P_c. Returns (C, ...) float64, or None when
    (number of vote vectors) x (pixels) exceeds ``MAX_OUTCOMES``.
    """
    num_classes = probabilities.shape[0]
    flat = probabilities.reshape(num_classes, -1)
    if math.comb(n0 + num_classes - 1, num_classes - 1) * flat.shape[1] > MAX_OUTCOMES:
        return None
    votes = np.array(
        [
            np.diff((-1, *bars, n0 + num_classes - 1)) - 1
            for bars in itertools.combinations(range(n0 + num_classes - 1), num_classes - 1)
        ]
    )  # (V, C): stars and bars
    log_p = np.log(np.maximum(flat, np.finfo(np.float64).tiny))  # P_c = 0 only meets v_c = 0 with nonzero pmf
    log_pmf = gammaln(n0 + 1) - gammaln(votes + 1).sum(1)[:, None] + votes @ log_p
    pmf = np.exp(log_pmf)  # (V, N)
    winner = votes.argmax(axis=1)
    selected = np.stack([pmf[winner == c].sum(0) for c in range(num_classes)])
    return selected.reshape(probabilities.shape)


def bonferroni_error_rate(
    probabilities: np.ndarray, *, n0: int, n: int, tau: float, alpha: float
) -> float | None:
    """Exact probability of >= 1 false certificate in one image under Bonferroni, for independent pixels.

    Pixel i is certified iff P[Binom(n, tau) >= k_i] <= alpha / N, i.e. k_i >= k*; with c_hat_i from the
    selection votes (independent of the estimation votes),

        q_i = sum_{c : P_{c,i} <= tau} P[c_hat_i = c] P[Binom(n, P_{c,i}) >= k*]
        rate = 1 - prod_i (1 - q_i).

    None when ``selection_probabilities`` is too costly.
    """
    selected = selection_probabilities(probabilities, n0)
    if selected is None:
        return None
    k_star = int(critical_count(n, tau, alpha / probabilities[0].size))
    certified = binom.sf(k_star - 1, n, probabilities)
    q = (selected * certified * (probabilities <= tau)).sum(axis=0)
    return float(-np.expm1(np.log1p(-q).sum()))


def poisson_binomial_pvalue(failures: int, rates: Sequence[float]) -> float:
    """Two-sided p-value of ``failures`` successes for independent Bernoulli(r_m) trials (Poisson binomial).

    The exact pmf by convolution over the trials; p = min(1, 2 min(P[X <= failures], P[X >= failures])).
    """
    pmf = np.ones(1)
    for r in rates:
        pmf = np.convolve(pmf, (1.0 - r, r))
    return float(min(1.0, 2.0 * min(pmf[: failures + 1].sum(), pmf[failures:].sum())))


def tail_probabilities(n: int, tau: float) -> np.ndarray:
    """P[Binom(n, tau) >= k] for k = 0 .. n + 1."""
    return binom.sf(np.arange(n + 2) - 1, n, tau)
