"""SegCertify's certification statistics (Fischer, Baader, Vechev, ICML 2021), vectorised.

Per pixel i of one image, with selection votes S0 and n independent estimation votes S:

    c_hat_i = mode of S0 at pixel i                        (``select``; ties -> lowest class index)
    k_i     = #{samples in S whose label at pixel i is c_hat_i}
    p_i     = P[Binom(n, tau) >= k_i]                      (``pvalues``; exact one-sided test of
                                                            H0: P[f_i(x + eps) = c_hat_i] <= tau)

The N = H*W null hypotheses are corrected together at family-wise level alpha (Holm or Bonferroni); every
pixel whose null is not rejected abstains. With probability >= 1 - alpha every certified pixel equals the
tau-thresholded smoothed classifier g^tau_i(x) and keeps its class under any ||delta||_2 < R, with
R = sigma * Phi^-1(tau) (``radius``) the same for every pixel, in [0, 1] pixel units at the image resolution.

:data:`SEGCERTIFY` is this test as a certification procedure (:mod:`ray_certseg.certify.procedure`), with
parameters (tau, alpha, correction). Pure numpy/scipy: no torch, no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from numbers import Integral, Real
from typing import Any, Literal

import numpy as np
from pydantic import Field
from scipy.stats import binom, norm

from ray_certseg.certify.procedure import Params, Procedure
from ray_certseg.dtypes import class_dtype

#: family-wise corrections of the per-pixel tests of one image (:func:`certify`)
CORRECTIONS = ("holm", "bonferroni")
_LABEL_DTYPE = np.int16
#: pixels per np.bincount call: np.bincount casts its input to int64, so feed it cache-sized slices
_CHUNK = 1 << 16


@dataclass(frozen=True, eq=False)
class Certificate:
    """Result of ``certify`` for one image.

    ``labels`` (int16, read-only, shape of c_hat): the certified class, or ``ABSTAIN`` where the null was not
    rejected. ``radius`` = sigma * Phi^-1(tau), the L2 radius in [0, 1] pixel units of every certified pixel.
    ``num_certified`` = #{labels != ABSTAIN}. ``tau, alpha, correction, sigma, n`` record the parameters used.
    """

    labels: np.ndarray
    radius: float
    num_certified: int
    tau: float
    alpha: float
    correction: str
    sigma: float
    n: int


def radius(sigma: float, tau: float) -> float:
    """Certified L2 radius R = sigma * Phi^-1(tau) of every certified pixel (0.5 < tau < 1 makes R > 0)."""
    return float(_check_sigma(sigma) * _ppf(_check_tau(tau)))


@lru_cache(maxsize=1024)
def _ppf(tau: float) -> float:
    return float(norm.ppf(tau))


@lru_cache(maxsize=256)
def _sf_table(n: int, tau: float) -> np.ndarray:
    """P[Binom(n, tau) >= k] for k = 0..n, read-only: one scipy call per (n, tau), not one per image."""
    table = binom.sf(np.arange(-1, n, dtype=np.int64), n, tau)
    table.setflags(write=False)
    return table


def select(counts0: np.ndarray) -> np.ndarray:
    """c_hat = argmax_c counts0[c] per pixel: the mode of the n0 selection votes, ties to the lowest class.

    ``counts0`` has shape (C, H, W) (any trailing shape works): counts0[c, i] = #{selection samples labelling
    pixel i as c}. Returns the class map with the trailing shape, as uint8 when C <= 256, int16 when
    C <= 2**15, else int32.
    """
    counts0 = np.asarray(counts0)
    _check_integer("counts0", counts0)
    if counts0.ndim < 2 or counts0.shape[0] == 0:
        raise ValueError(
            f"counts0 must have shape (C, H, W) with C >= 1 classes first, got shape {counts0.shape}"
        )
    if np.issubdtype(counts0.dtype, np.signedinteger) and counts0.size and counts0.min() < 0:
        raise ValueError(
            "counts0 holds negative vote counts; pass the number of selection votes per class and pixel"
        )
    if not counts0.any(axis=0).all():
        raise ValueError(
            "counts0 has pixels with no selection vote (n0 = 0 there); every pixel needs n0 >= 1 votes"
        )
    return counts0.argmax(axis=0).astype(class_dtype(counts0.shape[0]))


def pvalues(k: np.ndarray | int, n: int, tau: float) -> np.ndarray:
    """p = P[Binom(n, tau) >= k] = binom.sf(k - 1, n, tau), elementwise over an integer array 0 <= k <= n.

    The exact one-sided binomial test of H0: P[f_i(x + eps) = c_hat_i] <= tau, i.e. SegCertify's
    ``binom_test(k, n, tau, alternative='greater')`` (today ``scipy.stats.binomtest(...).pvalue``).
    Returns float64 with the shape of k.
    """
    k = np.asarray(k)
    _check_integer("k", k)
    n = _check_n(n)
    if not (isinstance(tau, Real) and 0.0 < tau < 1.0):
        raise ValueError(f"tau must be a probability in (0, 1), got {tau!r}")
    _check_counts(k, n)
    return _sf_table(n, float(tau))[k.astype(np.intp)]


def certify(
    c_hat: np.ndarray,
    k: np.ndarray,
    *,
    n: int,
    sigma: float,
    tau: float,
    alpha: float,
    correction: str = "holm",
    num_classes: int | None = None,
) -> Certificate:
    """SegCertify's CERTIFY after sampling: test every pixel of one image, correct over all, abstain the rest.

    ``c_hat``: selected class per pixel (``select``); ``k``: estimation votes for c_hat per pixel (0..n).
    Compact integer dtypes (uint8 c_hat, uint16 k) are used as they are, never converted to int64.
    The family is every pixel of ``c_hat`` (N = c_hat.size, ignore-label pixels included, as in SegCertify).

    Decisions equal ``statsmodels.stats.multitest.multipletests(p, alpha, method=correction)[0]``, pixel by
    pixel:

    * bonferroni: reject H0_i iff p_i <= alpha / N.
    * holm: sort p ascending, p_(0) <= ... <= p_(N-1); with i* the first i such that p_(i) > alpha / (N - i)
      (i* = N if none), reject exactly the pixels at sorted positions i < i*.

    Holm per distinct k, in O(N + n log n) instead of an O(N log N) sort: p_i depends on pixel i only through
    k_i in {0..n}, so the pixels sharing a value k form one block of equal p-values. Let h = bincount(k)
    and order the non-empty k by p(k) ascending; the block of k then starts at sorted position
    s_k = sum of h over the k' before it. Inside a block p is constant while the threshold alpha / (N - i)
    grows with i, so the whole block is rejected iff its first element is, p(k) <= alpha / (N - s_k);
    otherwise i* = s_k. (Equal p-values of different k form one run, decided the same way whatever their
    order, so statsmodels' unstable argsort changes nothing.) Holm therefore rejects the blocks before the
    first failing one, a decision per k: reject[k]. The thresholds are computed as statsmodels does, float64
    alpha divided by the integer N - i, so equality at the boundary (p == alpha / (N - i): rejected) agrees
    bit for bit.

    labels = (c_hat + 1) * reject[k] - 1, i.e. c_hat where H0 is rejected and ABSTAIN elsewhere.
    """
    c_hat = np.asarray(c_hat)
    k = np.asarray(k)
    _check_integer("c_hat", c_hat)
    _check_integer("k", k)
    if c_hat.shape != k.shape:
        raise ValueError(
            f"c_hat and k must have the same shape (one value per pixel), got {c_hat.shape} and {k.shape}"
        )
    if c_hat.size == 0:
        raise ValueError("c_hat is empty: certify needs at least one pixel")
    n = _check_n(n)
    sigma = _check_sigma(sigma)
    tau = _check_tau(tau)
    if not (isinstance(alpha, Real) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be a family-wise error level in (0, 1), got {alpha!r}")
    alpha = float(alpha)
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    check_votes(c_hat, k, n=n, num_classes=num_classes)

    histogram = _histogram(k, n)
    reject = reject_by_votes(histogram, n=n, tau=tau, alpha=alpha, correction=correction)

    labels = c_hat.astype(_LABEL_DTYPE)
    labels += 1
    # fancy indexing casts the uint16 k to intp in small buffers (np.take would copy it whole)
    labels *= reject[k]
    labels -= 1
    labels.flags.writeable = False
    return Certificate(
        labels=labels,
        radius=radius(sigma, tau),
        num_certified=int(histogram[reject].sum()),
        tau=tau,
        alpha=alpha,
        correction=correction,
        sigma=sigma,
        n=n,
    )


def check_votes(c_hat: np.ndarray, k: np.ndarray, *, n: int, num_classes: int | None = None) -> None:
    """Raise ValueError unless every c_hat lies in [0, num_classes) and every k in [0, n]."""
    _check_classes(c_hat, num_classes)
    _check_counts(k, n)


def vote_histogram(k: np.ndarray, n: int) -> np.ndarray:
    """h[j] = #{pixels with k = j}, j = 0..n (what :func:`reject_by_votes` decides from)."""
    return _histogram(np.asarray(k), n)


def reject_by_votes(
    histogram: np.ndarray, *, n: int, tau: float, alpha: float, correction: str
) -> np.ndarray:
    """reject[j] for j = 0..n: whether the pixels with k = j are certified, from the image's vote histogram
    h[j] = #{pixels with k = j} alone (the family is every pixel, N = h.sum()): Holm's blocks or Bonferroni's
    p(j) <= alpha / N (see :func:`certify`). Every pixel with the same k gets the same decision."""
    p = pvalues(np.arange(n + 1), n, tau)
    if correction == "holm":
        return _holm(p, histogram, alpha)
    return p <= alpha / float(histogram.sum())


def can_certify(n: int, tau: float, alpha: float, num_pixels: int) -> bool:
    """Whether any pixel of an image of ``num_pixels`` pixels can be certified at all.

    The smallest p-value n estimation samples can give is that of k = n, p = P[Binom(n, tau) >= n] = tau^n.
    Holm and Bonferroni both reject nothing unless the smallest p-value is <= alpha / N (Holm's first step is
    Bonferroni's threshold), so certification is possible iff tau^n <= alpha / N. Otherwise every pixel
    abstains whatever the model does: certified accuracy 0 and abstain rate 1 say nothing about the model.
    """
    return bool(pvalues(_check_n(n), n, _check_tau(tau))[()] <= float(alpha) / float(num_pixels))


def min_n(tau: float, alpha: float, num_pixels: int) -> int:
    """The smallest n with tau^n <= alpha / N (see ``can_certify``): ceil(log(alpha / N) / log(tau))."""
    n = max(1, math.ceil(math.log(float(alpha) / num_pixels) / math.log(_check_tau(tau))))
    while n > 1 and can_certify(n - 1, tau, alpha, num_pixels):  # float rounding at the boundary
        n -= 1
    while not can_certify(n, tau, alpha, num_pixels):
        n += 1
    return n


def max_tau(n: int, alpha: float, num_pixels: int) -> float:
    """The largest tau that n estimation samples can certify: (alpha / N)^(1 / n) (see ``can_certify``);
    certification needs tau <= this, and the radius sigma * Phi^-1(tau) needs tau > 0.5."""
    return float((float(alpha) / num_pixels) ** (1.0 / _check_n(n)))


def _holm(p: np.ndarray, histogram: np.ndarray, alpha: float) -> np.ndarray:
    """reject[k] of Holm's step-down procedure from p[k] and the pixel counts histogram[k] (see certify)."""
    order = np.argsort(p, kind="stable")
    present = order[histogram[order] > 0]  # distinct k in the map, by ascending p-value
    block = histogram[present]
    start = np.cumsum(block) - block  # s_k: sorted position of the first pixel with this k
    fails = p[present] > alpha / (histogram.sum() - start)
    first_fail = int(np.argmax(fails)) if fails.any() else present.size
    reject = np.zeros(p.size, dtype=bool)
    reject[present[:first_fail]] = True
    return reject


def _histogram(k: np.ndarray, n: int) -> np.ndarray:
    """h[j] = #{pixels with k = j}, j = 0..n, without an N-sized int64 copy of k."""
    flat = k.reshape(-1)
    histogram = np.zeros(n + 1, dtype=np.int64)
    for start in range(0, flat.size, _CHUNK):
        histogram += np.bincount(flat[start : start + _CHUNK], minlength=n + 1)
    return histogram


def _check_integer(name: str, array: np.ndarray) -> None:
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array (e.g. uint8/uint16), got dtype {array.dtype}")


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 1:
        raise ValueError(f"n (number of estimation samples) must be an integer >= 1, got {n!r}")
    return int(n)


def _check_sigma(sigma: float) -> float:
    if not (isinstance(sigma, Real) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(
            f"sigma (noise std in [0, 1] pixel units) must be a finite number > 0, got {sigma!r}"
        )
    return float(sigma)


def _check_tau(tau: float) -> float:
    if not (isinstance(tau, Real) and 0.5 < tau < 1.0):
        raise ValueError(
            f"tau must satisfy 0.5 < tau < 1 so that the radius sigma * Phi^-1(tau) is positive, got {tau!r}"
        )
    return float(tau)


def _check_counts(k: np.ndarray, n: int) -> None:
    if k.size == 0:
        return
    if np.issubdtype(k.dtype, np.signedinteger) and k.min() < 0:
        raise ValueError(f"k holds negative counts (min {k.min()}); k counts votes for c_hat, 0 <= k <= n")
    if k.max() > n:
        raise ValueError(
            f"k holds counts above n = {n} (max {k.max()}); k counts votes among the n estimation samples"
        )


def _check_classes(c_hat: np.ndarray, num_classes: int | None) -> None:
    if num_classes is not None and (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, Integral)
        or not 1 <= num_classes <= 2**15
    ):
        raise ValueError(
            f"num_classes must be an integer in [1, 32768] (labels are int16), got {num_classes!r}"
        )
    upper = 2**15 if num_classes is None else int(num_classes)
    lowest, highest = int(c_hat.min()), int(c_hat.max())
    if lowest < 0 or highest >= upper:
        raise ValueError(
            f"c_hat holds classes outside [0, {upper}) (min {lowest}, max {highest}); "
            + ("pass the selected class per pixel" if num_classes is None else "check num_classes or c_hat")
        )


class SegCertifyParams(Params):
    """One point of SegCertify's grid."""

    tau: float = Field(gt=0.5, lt=1.0)
    alpha: float = Field(gt=0.0, lt=1.0)
    correction: Literal["holm", "bonferroni"] = "holm"


def _certify_row(rec: Any, params: SegCertifyParams) -> Certificate:
    return certify(
        rec.c_hat,
        rec.k,
        n=rec.n,
        sigma=rec.sigma,
        tau=params.tau,
        alpha=params.alpha,
        correction=params.correction,
        num_classes=rec.num_classes,
    )


def _can_certify_row(rec: Any, params: SegCertifyParams) -> bool:
    return can_certify(rec.n, params.tau, params.alpha, rec.c_hat.size)


SEGCERTIFY = Procedure(
    name="segcertify",
    params=SegCertifyParams,
    certify=_certify_row,
    columns=("c_hat", "k"),
    certifiable=_can_certify_row,
)
"""SegCertify (Holm or Bonferroni) as a procedure: :func:`certify` of the row's stored c_hat and k."""
