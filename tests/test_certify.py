"""ray_certseg.certify against SegCertify's reference: per-pixel scipy.stats.binomtest + statsmodels."""

from __future__ import annotations

import gc
import math
import tracemalloc
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest
from statsmodels.stats.multitest import multipletests

from ray_certseg.certify import ABSTAIN, Certificate, certify, pvalues, radius, select

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
CORRECTIONS = ["holm", "bonferroni"]


@pytest.fixture(autouse=True, scope="module")
def _fast_gc_collect():
    """statsmodels' Holm branch calls gc.collect() on every call; freezing the objects already alive (scipy,
    hypothesis, ...) keeps each collection short. Unfrozen again after this module."""
    gc.freeze()
    yield
    gc.unfreeze()


@cache
def binomtest_pvalue(k: int, n: int, tau: float) -> float:
    """SegCertify's per-pixel test: exact one-sided binomial test of H0: p <= tau."""
    return binomtest(k, n, tau, alternative="greater").pvalue


def reference_pvalues(k: np.ndarray, n: int, tau: float) -> np.ndarray:
    return np.array([binomtest_pvalue(int(v), n, tau) for v in k.reshape(-1)]).reshape(k.shape)


def reference_labels(c_hat, k, n, tau, alpha, correction) -> np.ndarray:
    """SegCertify's certify: per-pixel p-values, multipletests over the map, abstain where not rejected."""
    reject = multipletests(reference_pvalues(k, n, tau).reshape(-1), alpha=alpha, method=correction)[0]
    return np.where(reject.reshape(k.shape), c_hat.astype(np.int16), np.int16(ABSTAIN))


def boundary_alphas(p: float, m: int) -> tuple[float, float] | None:
    """(at, below): the smallest float64 alpha with alpha / m == p exactly (statsmodels' threshold at sorted
    position N - m equals p: rejected) and the largest alpha with alpha / m < p (not rejected); None when no
    float64 alpha divides to exactly p."""
    at = p * m
    while at / m < p:
        at = float(np.nextafter(at, math.inf))
    while (lower := float(np.nextafter(at, 0.0))) / m >= p:
        at = lower
    return (at, float(np.nextafter(at, 0.0))) if at / m == p else None


REGIMES = ("binomial", "mixture", "few_values", "all_equal", "all_zero", "all_n")


@st.composite
def vote_maps(draw, max_pixels: int = 3000, regimes: tuple[str, ...] = REGIMES):
    """(c_hat, k, n): uint8 classes and uint16 counts from a seeded generator, in tie-heavy regimes."""
    n = draw(st.integers(1, 120))
    h = draw(st.integers(1, 60))
    w = draw(st.integers(1, max(1, max_pixels // h)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    regime = draw(st.sampled_from(regimes))
    if regime == "binomial":
        k = rng.binomial(n, rng.uniform(0.5, 1.0), size=(h, w))
    elif regime == "mixture":
        k = rng.binomial(n, rng.choice([0.3, 0.8, 0.95, 1.0], size=(h, w)))
    elif regime == "few_values":
        k = rng.choice(rng.integers(0, n + 1, size=draw(st.integers(1, 4))), size=(h, w))
    elif regime == "all_equal":
        k = np.full((h, w), draw(st.integers(0, n)))
    elif regime == "all_zero":
        k = np.zeros((h, w))
    else:
        k = np.full((h, w), n)
    c_hat = rng.integers(0, 19, size=(h, w)).astype(np.uint8)
    return c_hat, k.astype(np.uint16), n


taus = st.one_of(st.sampled_from([0.55, 0.75, 0.9, 0.95, 0.99]), st.floats(0.501, 0.999))
alphas = st.one_of(st.sampled_from([1e-4, 1e-3, 0.01, 0.05, 0.5]), st.floats(1e-6, 0.99))


# --- p-values -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, tau", [(1, 0.75), (10, 0.51), (100, 0.75), (500, 0.95), (1000, 0.999)])
def test_pvalues_equal_binomtest_for_every_k(n, tau):
    k = np.arange(n + 1)
    assert np.array_equal(pvalues(k, n, tau), reference_pvalues(k, n, tau))


def test_pvalues_keep_shape_of_compact_counts():
    k = np.array([[0, 3], [7, 10]], dtype=np.uint16)
    p = pvalues(k, 10, 0.75)
    assert p.shape == (2, 2) and p.dtype == np.float64
    assert p[0, 0] == 1.0  # P[Binom >= 0]
    assert p[1, 1] == pytest.approx(0.75**10, rel=1e-12)
    assert np.all(np.diff(p.reshape(-1)) < 0)


# --- certify against the reference --------------------------------------------------------------------------


@SETTINGS
@given(vote_maps(), taus, alphas, st.sampled_from(CORRECTIONS))
def test_certify_matches_statsmodels(vote_map, tau, alpha, correction):
    c_hat, k, n = vote_map
    cert = certify(c_hat, k, n=n, sigma=0.25, tau=tau, alpha=alpha, correction=correction)
    expected = reference_labels(c_hat, k, n, tau, alpha, correction)
    assert np.array_equal(cert.labels, expected)
    assert cert.num_certified == np.count_nonzero(expected != ABSTAIN)


@SETTINGS
@given(vote_maps(), taus, alphas)
def test_holm_certifies_a_superset_of_bonferroni(vote_map, tau, alpha):
    c_hat, k, n = vote_map
    holm = certify(c_hat, k, n=n, sigma=0.25, tau=tau, alpha=alpha, correction="holm").labels
    bonferroni = certify(c_hat, k, n=n, sigma=0.25, tau=tau, alpha=alpha, correction="bonferroni").labels
    certified_by_bonferroni = bonferroni != ABSTAIN
    assert np.array_equal(holm[certified_by_bonferroni], bonferroni[certified_by_bonferroni])
    assert np.count_nonzero(holm != ABSTAIN) >= np.count_nonzero(certified_by_bonferroni)


@SETTINGS
@given(vote_maps(max_pixels=800, regimes=("binomial", "mixture", "few_values", "all_n")), taus, st.data())
def test_holm_boundary_is_hit_exactly(vote_map, tau, data):
    """Choose alpha so that a block's p-value equals its Holm threshold alpha / (N - s) bit for bit
    (rejected), then the next float below (not rejected); both must agree with statsmodels."""
    c_hat, k, n = vote_map
    p = pvalues(np.arange(n + 1), n, tau)
    start = {int(v): int(np.count_nonzero(p[k] < p[v])) for v in np.unique(k)}  # sorted position of v's block
    candidates = [v for v, s in start.items() if p[v] * (k.size - s) < 0.99]
    assume(candidates)
    k0 = data.draw(st.sampled_from(candidates))
    m = k.size - start[k0]
    alphas = boundary_alphas(float(p[k0]), m)
    assume(alphas is not None)
    at, below = alphas
    assert at / m == p[k0] and below / m < p[k0]
    certified = []
    for level in (at, below):
        cert = certify(c_hat, k, n=n, sigma=0.5, tau=tau, alpha=level, correction="holm")
        assert np.array_equal(cert.labels, reference_labels(c_hat, k, n, tau, level, "holm"))
        certified.append(cert.num_certified)
    event(f"boundary decisive: {certified[0] != certified[1]}")


def test_holm_boundary_decides_the_first_block():
    """Smallest p-value block (k = n) sits at position 0 with threshold alpha / N: equality certifies it,
    the next float below certifies nothing, as in statsmodels."""
    n, tau = 20, 0.75
    k = np.array([[20, 20, 19], [18, 20, 3]], dtype=np.uint16)
    c_hat = np.arange(6, dtype=np.uint8).reshape(2, 3)
    alpha_at, alpha_below = boundary_alphas(float(pvalues(n, n, tau)), k.size)  # type: ignore[misc]
    at = certify(c_hat, k, n=n, sigma=0.25, tau=tau, alpha=alpha_at)
    below = certify(c_hat, k, n=n, sigma=0.25, tau=tau, alpha=alpha_below)
    assert at.num_certified >= 3 and below.num_certified == 0
    for cert, level in ((at, alpha_at), (below, alpha_below)):
        assert np.array_equal(cert.labels, reference_labels(c_hat, k, n, tau, level, "holm"))


def test_bonferroni_boundary_is_inclusive():
    n, tau = 30, 0.75
    k = np.array([30, 29, 29, 10], dtype=np.uint16)
    c_hat = np.array([1, 2, 3, 4], dtype=np.uint8)
    p = float(pvalues(29, n, tau))
    # Bonferroni's threshold alpha / N at exactly p(29), then just below it
    alpha_at, alpha_below = boundary_alphas(p, k.size)  # type: ignore[misc]
    for level, certified in ((alpha_at, 3), (alpha_below, 1)):
        cert = certify(c_hat, k, n=n, sigma=0.25, tau=tau, alpha=level, correction="bonferroni")
        assert cert.num_certified == certified
        assert np.array_equal(cert.labels, reference_labels(c_hat, k, n, tau, level, "bonferroni"))


@pytest.mark.parametrize("correction", CORRECTIONS)
@pytest.mark.parametrize("k_value, certified", [(100, True), (0, False), (80, False)])
def test_single_pixel(correction, k_value, certified):
    cert = certify(
        np.array([[7]], np.uint8),
        np.array([[k_value]], np.uint16),
        n=100,
        sigma=0.25,
        tau=0.75,
        alpha=1e-3,
        correction=correction,
    )
    assert cert.labels.tolist() == [[7 if certified else ABSTAIN]]
    assert cert.num_certified == int(certified)


@pytest.mark.parametrize("correction", CORRECTIONS)
def test_large_map_matches_statsmodels(correction):
    rng = np.random.default_rng(7)
    n, tau, alpha = 100, 0.75, 1e-3
    k = rng.binomial(n, rng.choice([0.6, 0.85, 0.97], size=(256, 512))).astype(np.uint16)
    c_hat = rng.integers(0, 19, size=k.shape).astype(np.uint8)
    cert = certify(c_hat, k, n=n, sigma=0.25, tau=tau, alpha=alpha, correction=correction)
    expected = reference_labels(c_hat, k, n, tau, alpha, correction)
    assert np.array_equal(cert.labels, expected)
    assert 0 < cert.num_certified < k.size


def test_holm_beats_bonferroni_somewhere():
    """Step-down gain. n = 100, tau = 0.75: p(100) = 3.2e-13, p(94) = 6.4e-7, p(60) ~ 1. With N = 4096 and
    alpha = 1e-3, Bonferroni's threshold alpha / N = 2.4e-7 rejects only k = 100; Holm, after the ~80% of
    pixels with k = 100, compares p(94) with alpha / (~0.2 N) ~ 1.2e-6 and rejects k = 94 too."""
    rng = np.random.default_rng(3)
    k = rng.choice(np.array([100, 94, 60]), p=[0.8, 0.15, 0.05], size=(64, 64)).astype(np.uint16)
    c_hat = np.zeros_like(k, dtype=np.uint8)
    args = {"n": 100, "sigma": 0.25, "tau": 0.75, "alpha": 1e-3}
    holm, bonf = certify(c_hat, k, **args), certify(c_hat, k, **args, correction="bonferroni")
    assert holm.num_certified == np.count_nonzero(k >= 94)
    assert bonf.num_certified == np.count_nonzero(k == 100)


# --- certificate record, dtypes, memory ---------------------------------------------------------------------


def test_certificate_fields_and_dtypes():
    c_hat = np.array([[3, 4], [5, 6]], dtype=np.uint8)
    k = np.array([[100, 100], [10, 100]], dtype=np.uint16)
    c_hat.flags.writeable = False  # Ray Data hands out read-only arrays
    k.flags.writeable = False
    cert = certify(c_hat, k, n=100, sigma=0.33, tau=0.75, alpha=0.01, correction="bonferroni", num_classes=19)
    assert isinstance(cert, Certificate)
    assert cert.labels.dtype == np.int16 and cert.labels.shape == (2, 2)
    assert cert.labels.tolist() == [[3, 4], [ABSTAIN, 6]]
    assert cert.num_certified == 3
    assert cert.radius == radius(0.33, 0.75)
    assert (cert.tau, cert.alpha, cert.correction, cert.sigma, cert.n) == (
        0.75,
        0.01,
        "bonferroni",
        0.33,
        100,
    )
    assert c_hat.dtype == np.uint8 and k.dtype == np.uint16
    with pytest.raises(ValueError):
        cert.labels[0, 0] = 1  # read-only, like the frozen dataclass around it
    with pytest.raises(AttributeError):
        cert.radius = 1.0  # type: ignore[misc]


def test_wide_class_ids_fit_int16():
    c_hat = np.array([0, 300, 32767], dtype=np.int32)
    k = np.array([50, 50, 50], dtype=np.int64)
    cert = certify(c_hat, k, n=50, sigma=0.25, tau=0.75, alpha=0.01)
    assert cert.labels.tolist() == [0, 300, 32767]


def test_certify_does_not_copy_counts_to_int64():
    """Peak extra memory stays below one int64 copy of k (8 bytes/pixel): int16 output, bool mask, buffers."""
    rng = np.random.default_rng(0)
    k = rng.integers(60, 101, size=(512, 2048)).astype(np.uint16)
    c_hat = rng.integers(0, 19, size=k.shape).astype(np.uint8)
    tracemalloc.start()
    certify(c_hat, k, n=100, sigma=0.25, tau=0.75, alpha=1e-3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 6 * k.size


# --- radius -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sigma, tau, expected",
    [
        (0.25, 0.75, 0.169),
        (0.33, 0.75, 0.223),
        (0.5, 0.75, 0.337),
        (0.25, 0.95, 0.411),
        (0.33, 0.95, 0.543),
        (0.5, 0.95, 0.822),
    ],
)
def test_radius_values(sigma, tau, expected):
    assert round(radius(sigma, tau), 3) == expected


# --- select -------------------------------------------------------------------------------------------------


def loop_mode(counts0: np.ndarray) -> np.ndarray:
    """SegCertify's mode(): scan classes in order, keep the first strict maximum."""
    flat = counts0.reshape(counts0.shape[0], -1)
    out = np.empty(flat.shape[1], dtype=np.int64)
    for i in range(flat.shape[1]):
        best = 0
        for c in range(1, flat.shape[0]):
            if flat[c, i] > flat[best, i]:
                best = c
        out[i] = best
    return out.reshape(counts0.shape[1:])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 10), st.integers(0, 2**32 - 1))
def test_select_is_the_mode_with_ties_to_lowest_class(num_classes, n0, seed):
    rng = np.random.default_rng(seed)
    votes = rng.integers(0, num_classes, size=(n0, 6, 7))
    counts0 = np.stack([(votes == c).sum(axis=0) for c in range(num_classes)]).astype(np.uint16)
    assert np.array_equal(select(counts0), loop_mode(counts0))


@pytest.mark.parametrize(
    "num_classes, dtype", [(19, np.uint8), (256, np.uint8), (257, np.int16), (40000, np.int32)]
)
def test_select_dtype(num_classes, dtype):
    counts0 = np.zeros((num_classes, 2, 2), dtype=np.uint8)
    counts0[num_classes - 1] = 3
    c_hat = select(counts0)
    assert c_hat.dtype == dtype and c_hat.tolist() == [[num_classes - 1] * 2] * 2


@pytest.mark.parametrize(
    "counts0, error, match",
    [
        (np.ones((3, 2, 2), dtype=np.float32), TypeError, "integer"),
        (np.ones(3, dtype=np.int32), ValueError, r"\(C, H, W\)"),
        (np.full((2, 2, 2), -1, dtype=np.int32), ValueError, "negative"),
        (np.zeros((2, 2, 2), dtype=np.int32), ValueError, "no selection vote"),
    ],
)
def test_select_rejects_bad_counts(counts0, error, match):
    with pytest.raises(error, match=match):
        select(counts0)


# --- validation ---------------------------------------------------------------------------------------------

GOOD = {"n": 10, "sigma": 0.25, "tau": 0.75, "alpha": 0.01}
C_HAT = np.zeros((2, 2), dtype=np.uint8)
K = np.full((2, 2), 10, dtype=np.uint16)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"tau": 0.5}, ValueError, "tau"),
        ({"tau": 1.0}, ValueError, "tau"),
        ({"tau": 0.3}, ValueError, "tau"),
        ({"alpha": 0.0}, ValueError, "alpha"),
        ({"alpha": 1.0}, ValueError, "alpha"),
        ({"sigma": 0.0}, ValueError, "sigma"),
        ({"sigma": float("nan")}, ValueError, "sigma"),
        ({"n": 0}, ValueError, r"^n \("),
        ({"n": 10.0}, ValueError, r"^n \("),
        ({"n": True}, ValueError, r"^n \("),
        ({"correction": "hommel"}, ValueError, "correction"),
        ({"num_classes": 0}, ValueError, "num_classes"),
        ({"num_classes": 40000}, ValueError, "num_classes"),
    ],
)
def test_certify_rejects_bad_parameters(change, error, match):
    with pytest.raises(error, match=match):
        certify(C_HAT, K, **{**GOOD, **change})


@pytest.mark.parametrize(
    "c_hat, k, kwargs, error, match",
    [
        (C_HAT, K.astype(np.float32), {}, TypeError, "k must be an integer"),
        (C_HAT.astype(float), K, {}, TypeError, "c_hat must be an integer"),
        (C_HAT, K.astype(bool), {}, TypeError, "k must be an integer"),
        (C_HAT, K[:1], {}, ValueError, "same shape"),
        (C_HAT[:0], K[:0], {}, ValueError, "empty"),
        (C_HAT, np.full((2, 2), 11, np.uint16), {}, ValueError, "above n"),
        (C_HAT, np.full((2, 2), -1, np.int8), {}, ValueError, "negative"),
        (np.full((2, 2), 19, np.uint8), K, {"num_classes": 19}, ValueError, r"outside \[0, 19\)"),
        (np.full((2, 2), -2, np.int16), K, {}, ValueError, "outside"),
        (np.full((2, 2), 40000, np.int32), K, {}, ValueError, "outside"),
    ],
)
def test_certify_rejects_bad_maps(c_hat, k, kwargs, error, match):
    with pytest.raises(error, match=match):
        certify(c_hat, k, **GOOD, **kwargs)


@pytest.mark.parametrize(
    "k, n, tau, error, match",
    [
        (np.array([1.0]), 10, 0.75, TypeError, "integer"),
        (np.array([11]), 10, 0.75, ValueError, "above n"),
        (np.array([-1]), 10, 0.75, ValueError, "negative"),
        (np.array([1]), 0, 0.75, ValueError, r"^n \("),
        (np.array([1]), 10, 1.0, ValueError, "tau"),
        (np.array([1]), 10, 0.0, ValueError, "tau"),
    ],
)
def test_pvalues_reject_bad_input(k, n, tau, error, match):
    with pytest.raises(error, match=match):
        pvalues(k, n, tau)


@pytest.mark.parametrize("sigma, tau", [(0.25, 0.5), (0.25, 1.0), (-0.1, 0.75), (float("inf"), 0.75)])
def test_radius_rejects_bad_input(sigma, tau):
    with pytest.raises(ValueError):
        radius(sigma, tau)
