"""Statistical self-test of the certificates: sampling + certification against a segmenter with known p.

SegCertify's guarantee (Fischer et al. 2021): with probability >= 1 - alpha over the sampling, every certified
pixel i of an image has P[f_i(x + delta) = c_hat_i] > tau. A certified pixel whose true probability
p_{i, c_hat_i} <= tau is a *false certificate*; the probability that an image holds at least one is the
family-wise error rate (FWER), which Holm and Bonferroni keep <= alpha.

The test runs the real code, ``sampling.count_votes`` then ``certify.certify``, on M seeded images, each with
an analytic base segmenter (``LinearThresholdSegmenter``) whose per-pixel class probabilities under
delta ~ N(0, sigma^2 I) are known in closed form, and counts X = #{images with a false certificate}. If the
guarantee holds, X is stochastically smaller than Binom(M, alpha), so the test fails when the one-sided
binomial p-value

    P[Binom(M, alpha) >= X] < significance        (default 0.001)

Most pixels get a true top-class probability just below or just above tau, where false certificates happen;
the others are certified surely, which lowers Holm's thresholds for the rest: the observed rates come close to
alpha and the test has power. Pixels are independent, so Bonferroni's per-image rate is also known exactly,
and its failure count must match that too (two-sided): a check of the sampling in both directions.
``SharedNoise`` replays the released SegCertify bug (one noise draw per batch): with batch 10 and n = 100 the
votes are 10 draws counted 10 times each, and the test fails.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from scipy.special import gammaln
from scipy.stats import binom, binomtest, norm
from torch import Tensor, nn

from ray_certseg.certify import ABSTAIN, CORRECTIONS, certify
from ray_certseg.sampling import count_votes, level_index

SIGNIFICANCE = 1e-3
"""Level of the tests of the false-certificate count: against alpha, and against Bonferroni's exact rate."""

MAX_OUTCOMES = 10**7
"""Largest (selection-vote outcomes C(n0 + C - 1, C - 1)) x (pixels) enumerated for the exact rate."""


class LinearThresholdSegmenter(nn.Module):
    """Analytic base segmenter: f_i(x) = #{j : s_i(x) > t_{j,i}}, s_i(x) = sum_ch w_{ch,i} x_{ch,i}.

    Each pixel's score is a linear functional of its own three channels, and the C - 1 non-decreasing
    thresholds t_{1,i} <= ... <= t_{C-1,i} cut the score line into C intervals, one per class. Under
    x + delta, delta ~ N(0, sigma^2 I), s_i ~ N(mu_i, (sigma ||w_i||)^2) with mu_i = s_i(x), so

        P[f_i(x + delta) = c] = Phi((t_{c+1,i} - mu_i) / s_i) - Phi((t_{c,i} - mu_i) / s_i),
        s_i = sigma ||w_i||

    with t_0 = -inf, t_C = +inf. Pixels use disjoint coordinates of delta, so they are independent.
    ``forward`` maps (B, 3, H, W) images to one-hot logits (B, C, H, W).
    """

    def __init__(self, weight: Tensor, thresholds: Tensor):
        super().__init__()
        if not (isinstance(weight, Tensor) and isinstance(thresholds, Tensor)):
            raise TypeError(
                f"weight and thresholds must be torch tensors, got {type(weight).__name__} and "
                f"{type(thresholds).__name__}"
            )
        if not (weight.ndim == 3 and weight.shape[0] == 3):
            raise ValueError(f"weight must be a tensor (3, H, W), got {_describe(weight)}")
        if not (thresholds.ndim == 3 and thresholds.shape[1:] == weight.shape[1:]):
            raise ValueError(
                f"thresholds must be a tensor (C - 1, H, W) with H, W of weight {tuple(weight.shape[1:])}, "
                f"got {_describe(thresholds)}"
            )
        if not bool((weight.double().norm(dim=0) > 0).all()):
            raise ValueError("weight has a pixel with w_i = 0; every pixel needs a non-zero functional")
        if thresholds.shape[0] > 1 and not bool((thresholds.diff(dim=0) >= 0).all()):
            raise ValueError("thresholds must be non-decreasing along the class axis (t_1 <= ... <= t_{C-1})")
        self.register_buffer("weight", weight.float())
        self.register_buffer("thresholds", thresholds.float())

    @property
    def num_classes(self) -> int:
        """C = number of thresholds + 1."""
        return self.thresholds.shape[0] + 1

    @classmethod
    def from_probabilities(
        cls, image: Tensor, probabilities: np.ndarray, sigma: float, weight: Tensor
    ) -> LinearThresholdSegmenter:
        """The segmenter whose class probabilities at ``image`` under N(0, sigma^2 I) are ``probabilities``.

        probabilities: (C, H, W), summing to 1 over classes.
        t_{j,i} = mu_i + sigma ||w_i|| Phi^-1(sum_{c<j} P_{c,i}), rounded to float32 (``class_probabilities``
        gives the exact values of the result).
        """
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.ndim != 3 or probabilities.shape[1:] != tuple(image.shape[1:]):
            raise ValueError(
                f"probabilities must have shape (C, H, W) = (C, {image.shape[1]}, {image.shape[2]}), "
                f"got {probabilities.shape}"
            )
        if (probabilities < 0).any() or not np.allclose(probabilities.sum(0), 1.0):
            raise ValueError("probabilities must be >= 0 and sum to 1 over the class axis at every pixel")
        mu, scale = _score_moments(image, weight, sigma)
        cumulative = np.cumsum(probabilities, axis=0)[:-1]
        thresholds = mu + scale * norm.ppf(np.clip(cumulative, 0.0, 1.0))
        return cls(weight, torch.from_numpy(thresholds))

    def forward(self, images: Tensor) -> Tensor:
        """One-hot logits (B, C, H, W) of the labels f_i(x) = #{j : s_i(x) > t_{j,i}}."""
        scores = (images * self.weight).sum(dim=1)
        labels = (scores[:, None] > self.thresholds).sum(dim=1)
        return nn.functional.one_hot(labels, self.num_classes).permute(0, 3, 1, 2).float()

    def class_probabilities(self, image: Tensor, sigma: float) -> np.ndarray:
        """P[f_i(image + delta) = c], delta ~ N(0, sigma^2 I), in closed form: float64 (C, H, W)."""
        mu, scale = _score_moments(image, self.weight, sigma)
        cdf = norm.cdf((self.thresholds.double().cpu().numpy() - mu) / scale)
        edges = np.concatenate([np.zeros_like(mu)[None], cdf, np.ones_like(mu)[None]])
        return np.diff(edges, axis=0)


class SharedNoise(nn.Module):
    """The released SegCertify bug as a segmenter wrapper: every sample of a batch is classified from one
    noisy image (the batch's last, as its list comprehension resizes the last ``img`` for every ``im``).

    With batch size b the n votes are n / b independent draws, each counted b times.
    """

    def __init__(self, segmenter: nn.Module):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, images: Tensor) -> Tensor:
        return self.segmenter(images[-1:].expand_as(images))


def boundary_probabilities(
    rng: np.random.Generator,
    num_classes: int,
    height: int,
    width: int,
    *,
    tau: float,
    n: int,
    alpha: float,
) -> np.ndarray:
    """Class probabilities (C, H, W) of one self-test image, built so that false certificates are likely.

    S pixels are *sure*: top probability U(0.98, 0.999), certified almost always, so that Holm tests the other
    N - S at alpha / (N - S) first. The binomial test is discrete: a null pixel at p = tau is certified with
    probability e(N - S) = P[Binom(n, tau) >= k*] <= alpha / (N - S), k* the smallest k passing that
    threshold. S is drawn uniformly among the S <= N / 2 with e(N - S) (N - S) / alpha >= 0.9 of its maximum,
    where Holm is closest to its level. The other pixels sit at the boundary: 7/8 of them just below,
    tau - U(0, 0.002) (nulls: a certificate is false), 1/8 just above, tau + U(0, 0.02). The top class is
    uniform over the C classes; the rest of the mass is split over the other classes by a flat Dirichlet draw.
    """
    size = height * width
    rest = size - np.arange(size // 2 + 1)  # N - S for S = 0 .. N/2
    exactness = _tail(n, tau)[critical_count(n, tau, alpha / rest)] * rest / alpha
    num_sure = int(rng.choice(np.flatnonzero(exactness >= 0.9 * exactness.max())))
    sure = np.zeros(size, dtype=bool)
    sure[rng.choice(size, num_sure, replace=False)] = True
    below = rng.random(size) < 0.875
    top = np.where(
        sure,
        rng.uniform(0.98, 0.999, size),
        np.where(below, tau - rng.uniform(0.0, 0.002, size), tau + rng.uniform(0.0, 0.02, size)),
    )
    dominant = rng.integers(num_classes, size=size)
    others = (dominant[:, None] + np.arange(1, num_classes)) % num_classes
    pixels = np.arange(size)[:, None]
    probabilities = np.empty((size, num_classes))
    probabilities[pixels[:, 0], dominant] = top
    probabilities[pixels, others] = rng.dirichlet(np.ones(num_classes - 1), size) * (1.0 - top)[:, None]
    return probabilities.T.reshape(num_classes, height, width)


def critical_count(n: int, tau: float, level: float | np.ndarray) -> np.ndarray:
    """k* = the smallest k with P[Binom(n, tau) >= k] <= level (n + 1 if none): a pixel with k_i >= k* passes
    the per-pixel threshold ``level`` (alpha / N for Bonferroni). Elementwise over ``level``."""
    return np.argmax(_tail(n, tau) <= np.asarray(level, dtype=np.float64)[..., None], axis=-1)


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


@dataclass(frozen=True)
class CorrectionResult:
    """Outcome of the self-test for one correction.

    ``failures`` X of ``images`` M held >= 1 false certificate; ``rate`` = X / M with its 95% Clopper-Pearson
    interval ``ci``; ``pvalue`` = P[Binom(M, alpha) >= X], the test of the guarantee.
    Bonferroni only (else None): ``expected_rate``, the mean of the exact per-image rates r_m
    (``bonferroni_error_rate``), and ``exact_pvalue``, the two-sided Poisson-binomial p-value of X given the
    r_m (``poisson_binomial_pvalue``): a check of the sampling's independence in both directions.
    ``passed`` iff pvalue >= significance and (if computed) exact_pvalue >= significance.
    ``false_pixels`` and ``certified_pixels`` are totals over all images, of ``pixels``.
    """

    correction: str
    images: int
    failures: int
    rate: float
    ci: tuple[float, float]
    pvalue: float
    passed: bool
    expected_rate: float | None
    exact_pvalue: float | None
    false_pixels: int
    certified_pixels: int
    pixels: int


@dataclass(frozen=True)
class SelfTestReport:
    """Per-correction results and the parameters of one self-test run."""

    results: tuple[CorrectionResult, ...]
    alpha: float
    significance: float
    shared_noise: bool
    parameters: dict[str, Any]

    @property
    def passed(self) -> bool:
        """True iff every correction passed."""
        return all(r.passed for r in self.results)

    def to_markdown(self) -> str:
        """A table of the observed false-certificate rates, their 95% intervals and the verdicts."""
        p = self.parameters
        lines = [
            f"Self-test of the certificates: {p['images']} images of {p['height']}x{p['width']} pixels, "
            f"C={p['num_classes']}, sigma={p['sigma']}, tau={p['tau']}, n0={p['n0']}, n={p['n']}, "
            f"batch={p['batch_size']}, seed={p['seed']}, noise "
            + ("SHARED per batch (released SegCertify bug)" if self.shared_noise else "independent per draw")
            + (
                f"; hierarchical, model {p['model']}, thresholds {p['thresholds']}, level from {p['level_from']}"
                + (" (the wrong variant)" if p["level_from"] == "S" else "")
                if "model" in p
                else ""
            ),
            (
                f"Fails if P[Binom(images, alpha={self.alpha:g}) >= failures] < {self.significance:g} "
                "(p vs alpha), or, for Bonferroni, if the failures deviate from its exact rate with "
                f"two-sided p < {self.significance:g} (p vs exact)."
            ),
            "",
            (
                "| correction | images with a false certificate | rate | 95% CI | p vs alpha | exact rate | "
                "p vs exact | certified pixels | false pixels | verdict |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.results:
            expected = "-" if r.expected_rate is None else f"{r.expected_rate:.4f}"
            exact_p = "-" if r.exact_pvalue is None else f"{r.exact_pvalue:.3g}"
            lines.append(
                f"| {r.correction} | {r.failures}/{r.images} | {r.rate:.4f} | "
                f"[{r.ci[0]:.4f}, {r.ci[1]:.4f}] | {r.pvalue:.3g} | {expected} | {exact_p} | "
                f"{r.certified_pixels / r.pixels:.3f} | {r.false_pixels} | {'pass' if r.passed else 'FAIL'} |"
            )
        return "\n".join(lines)


def run_selftest(
    *,
    images: int = 1000,
    alpha: float = 0.2,
    corrections: Sequence[str] = CORRECTIONS,
    seed: int = 0,
    shared_noise: bool = False,
    sigma: float = 0.25,
    tau: float = 0.75,
    n0: int = 10,
    n: int = 100,
    batch_size: int = 10,
    num_classes: int = 3,
    height: int = 16,
    width: int = 16,
    significance: float = SIGNIFICANCE,
) -> SelfTestReport:
    """Certify ``images`` seeded images of analytic segmenters; test the false-certificate rate against alpha.

    Image m: rng = default_rng([seed, m]); x ~ U[0, 1]^(3, H, W); w ~ N(0, I); class probabilities from
    ``boundary_probabilities``; votes = ``count_votes`` (seed, image id ``selftest-m``); then ``certify`` with
    every correction on the same votes. A certified pixel is false iff P[f_i(x + delta) = c_hat_i] <= tau.
    ``shared_noise`` wraps the segmenter in ``SharedNoise`` (the released SegCertify bug).
    """
    images, n0, n = _integer("images", images, 1), _integer("n0", n0, 1), _integer("n", n, 1)
    num_classes, height, width = (
        _integer("num_classes", num_classes, 2),
        _integer("height", height, 1),
        _integer("width", width, 1),
    )
    if not (isinstance(alpha, Real) and 0.0 < alpha < 1.0):
        raise ValueError(
            f"alpha must be in (0, 1), got {alpha!r}; the self-test needs a large one such as 0.2"
        )
    if not (isinstance(significance, Real) and 0.0 < significance < 1.0):
        raise ValueError(f"significance must be in (0, 1), got {significance!r}")
    corrections = tuple(corrections)
    if not corrections or any(c not in CORRECTIONS for c in corrections):
        raise ValueError(f"corrections must be a non-empty subset of {CORRECTIONS}, got {corrections!r}")
    if not (isinstance(tau, Real) and 0.5 < tau < 0.98):
        raise ValueError(f"tau must lie in (0.5, 0.98) (sure pixels have p >= 0.98), got {tau!r}")

    failures = dict.fromkeys(corrections, 0)
    false_pixels = dict.fromkeys(corrections, 0)
    certified_pixels = dict.fromkeys(corrections, 0)
    expected: list[float | None] = []
    for m in range(images):
        rng = np.random.default_rng([seed, m])
        x = torch.from_numpy(rng.random((3, height, width), dtype=np.float32))
        weight = torch.from_numpy(rng.normal(size=(3, height, width)).astype(np.float32))
        target = boundary_probabilities(rng, num_classes, height, width, tau=tau, n=n, alpha=alpha)
        segmenter = LinearThresholdSegmenter.from_probabilities(x, target, sigma, weight)
        truth = segmenter.class_probabilities(x, sigma)
        votes = count_votes(
            x,
            SharedNoise(segmenter) if shared_noise else segmenter,
            sigma=sigma,
            n0=n0,
            n=n,
            num_classes=num_classes,
            batch_size=batch_size,
            seed=seed,
            image_id=f"selftest-{m}",
        )
        p_certified = np.take_along_axis(truth, votes.c_hat[None].astype(np.intp), axis=0)[0]
        for correction in corrections:
            cert = certify(
                votes.c_hat, votes.k, n=n, sigma=sigma, tau=tau, alpha=alpha, correction=correction
            )
            false = (cert.labels != ABSTAIN) & (p_certified <= tau)
            failures[correction] += bool(false.any())
            false_pixels[correction] += int(false.sum())
            certified_pixels[correction] += cert.num_certified
        if "bonferroni" in corrections:
            expected.append(bonferroni_error_rate(truth, n0=n0, n=n, tau=tau, alpha=alpha))

    rates = expected if "bonferroni" in corrections and all(e is not None for e in expected) else None
    results = _results(corrections, images, alpha, significance, height * width, failures, false_pixels,
                       certified_pixels, rates)  # fmt: skip
    parameters = {
        "images": images,
        "seed": seed,
        "sigma": sigma,
        "tau": tau,
        "n0": n0,
        "n": n,
        "batch_size": batch_size,
        "num_classes": num_classes,
        "height": height,
        "width": width,
    }
    return SelfTestReport(tuple(results), float(alpha), float(significance), bool(shared_noise), parameters)


def _results(
    corrections: Sequence[str],
    images: int,
    alpha: float,
    significance: float,
    pixels_per_image: int,
    failures: dict[str, int],
    false_pixels: dict[str, int],
    certified_pixels: dict[str, int],
    bonferroni_rates: list[float] | None,
) -> list[CorrectionResult]:
    """One :class:`CorrectionResult` per correction from the counts; ``bonferroni_rates``: the exact
    per-image rates r_m when known (SegCertify's test), else None."""
    results = []
    for correction in corrections:
        x_fail = failures[correction]
        ci = binomtest(x_fail, images).proportion_ci(0.95, method="exact")
        pvalue = float(binom.sf(x_fail - 1, images, alpha))
        exact = correction == "bonferroni" and bonferroni_rates is not None
        exact_pvalue = poisson_binomial_pvalue(x_fail, bonferroni_rates) if exact else None
        results.append(
            CorrectionResult(
                correction=correction,
                images=images,
                failures=x_fail,
                rate=x_fail / images,
                ci=(float(ci.low), float(ci.high)),
                pvalue=pvalue,
                passed=pvalue >= significance and (exact_pvalue is None or exact_pvalue >= significance),
                expected_rate=float(np.mean(bonferroni_rates)) if exact else None,
                exact_pvalue=exact_pvalue,
                false_pixels=false_pixels[correction],
                certified_pixels=certified_pixels[correction],
                pixels=images * pixels_per_image,
            )
        )
    return results


def _tail(n: int, tau: float) -> np.ndarray:
    """P[Binom(n, tau) >= k] for k = 0 .. n + 1."""
    return binom.sf(np.arange(n + 2) - 1, n, tau)


def _score_moments(image: Tensor, weight: Tensor, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """mu_i = sum_ch w_{ch,i} x_{ch,i} and sigma ||w_i|| in float64, (H, W) each."""
    if not (isinstance(sigma, Real) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if not (isinstance(image, Tensor) and image.shape == weight.shape):
        raise ValueError(
            f"image must be a tensor of the weight's shape {tuple(weight.shape)}, got {_describe(image)}"
        )
    w = weight.double().cpu().numpy()
    x = image.double().cpu().numpy()
    return (w * x).sum(0), float(sigma) * np.sqrt((w * w).sum(0))


def _integer(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _describe(value: object) -> str:
    return f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


# --- hierarchical certification ---------------------------------------------------------------------------

TOY_HIERARCHY = {
    "name": "selftest",
    "classes": ["a", "b", "c", "d"],
    "levels": [{"ab": ["a", "b"], "cd": ["c", "d"]}],
}
"""4 classes, two nodes: the self-test's hierarchy (levels 0 and 1)."""


def hierarchy_probabilities(
    rng: np.random.Generator, height: int, width: int, *, tau: float, n: int, alpha: float
) -> np.ndarray:
    """Class probabilities (4, H, W) of one hierarchical self-test image: ``boundary_probabilities``' sure and
    boundary pixels, with the boundary at either level. Half the boundary pixels put the top *node* at the
    boundary (its mass ``top``, split about evenly between its two classes: a small fine margin, so the
    coarse level is chosen, where the null is node probability <= tau); the others keep the top *class* at
    the boundary and give its sibling 90% of the rest (a margin near 0.5: either level is chosen; at the
    coarse level that node is surely above tau, at the fine one the class is a null)."""
    base = boundary_probabilities(rng, 4, height, width, tau=tau, n=n, alpha=alpha).reshape(4, -1)
    top, dominant = base.max(0), base.argmax(0)
    sibling = dominant ^ 1  # a <-> b, c <-> d
    others = np.stack([(dominant & 2) ^ 2, ((dominant & 2) ^ 2) + 1])  # the two classes of the other node
    boundary = top < 0.98
    coarse = boundary & (rng.random(top.shape) < 0.5)
    share = np.where(coarse, rng.uniform(0.45, 0.55, top.shape), 1.0)
    p = np.zeros_like(base)
    cols = np.arange(top.size)
    node_mass = np.where(coarse, top, np.where(boundary, top + 0.9 * (1 - top), top))
    p[dominant, cols] = np.where(coarse, top * share, top)
    p[sibling, cols] = node_mass - p[dominant, cols]
    split = rng.uniform(0.0, 1.0, top.shape)
    p[others[0], cols] = (1 - node_mass) * split
    p[others[1], cols] = (1 - node_mass) * (1 - split)
    return p.reshape(4, height, width)


def coarse_sure_probabilities(rng: np.random.Generator, height: int, width: int, *, tau: float) -> np.ndarray:
    """Class probabilities (4, H, W) where every pixel's top node is sure (0.99) and its top class (drawn per
    pixel) sits just below tau (tau - 0.01, its sibling the rest of the node): the coarse level certifies
    everywhere, the fine level is a null everywhere. The model on which choosing the level from S fails."""
    dominant = rng.integers(0, 4, height * width)
    cols = np.arange(height * width)
    p = np.zeros((4, height * width))
    p[dominant, cols] = tau - 0.01
    p[dominant ^ 1, cols] = 0.99 - (tau - 0.01)
    p[(dominant & 2) ^ 2, cols] = 0.005
    p[((dominant & 2) ^ 2) + 1, cols] = 0.005
    return p.reshape(4, height, width)


HIERARCHICAL_MODELS = {"boundary": (0.5, 0.0), "coarse-sure": (0.65, 0.0)}
"""The hierarchical self-test's image models and their default thresholds (t_0, t_1)."""


def run_hierarchical_selftest(
    *,
    images: int = 300,
    alpha: float = 0.2,
    corrections: Sequence[str] = CORRECTIONS,
    seed: int = 0,
    level_from_s: bool = False,
    model: str = "boundary",
    thresholds: tuple[float, ...] | None = None,
    sigma: float = 0.25,
    tau: float = 0.75,
    n0: int = 10,
    n: int = 100,
    batch_size: int = 10,
    height: int = 16,
    width: int = 16,
    significance: float = SIGNIFICANCE,
) -> SelfTestReport:
    """The false-certificate test of hierarchical certification (``ray_certseg.certify.hierarchical``).

    As :func:`run_selftest`, with the 4-class :data:`TOY_HIERARCHY`, class probabilities from
    :func:`hierarchy_probabilities`, votes counted per level by ``count_votes`` and certificates from
    ``certify_levels``. A certified pixel is false iff the true probability of its node (the sum of its
    classes' probabilities) is <= tau. ``level_from_s`` chooses each pixel's level from the estimation votes
    S (their fine margin) instead of S0: the deliberately wrong variant. ``model``: ``"boundary"``
    (:func:`hierarchy_probabilities`) or ``"coarse-sure"`` (:func:`coarse_sure_probabilities`, where the
    wrong variant fails under Holm); ``thresholds`` default to the model's in :data:`HIERARCHICAL_MODELS`."""
    from types import SimpleNamespace

    from ray_certseg.certify import class_tree as hierarchy
    from ray_certseg.certify.hierarchical import certify_levels

    if model not in HIERARCHICAL_MODELS:
        raise ValueError(f"model must be one of {sorted(HIERARCHICAL_MODELS)}, got {model!r}")
    thresholds = HIERARCHICAL_MODELS[model] if thresholds is None else tuple(thresholds)
    h = hierarchy.from_dict(TOY_HIERARCHY)
    node_of = np.stack(h.node)  # (2, 4)
    level_maps = level_index(h.node[1:])
    corrections = tuple(corrections)
    failures = dict.fromkeys(corrections, 0)
    false_pixels = dict.fromkeys(corrections, 0)
    certified_pixels = dict.fromkeys(corrections, 0)
    for m in range(_integer("images", images, 1)):
        rng = np.random.default_rng([seed, m])
        x = torch.from_numpy(rng.random((3, height, width), dtype=np.float32))
        weight = torch.from_numpy(rng.normal(size=(3, height, width)).astype(np.float32))
        if model == "boundary":
            target = hierarchy_probabilities(rng, height, width, tau=tau, n=n, alpha=alpha)
        else:
            target = coarse_sure_probabilities(rng, height, width, tau=tau)
        segmenter = LinearThresholdSegmenter.from_probabilities(x, target, sigma, weight)
        truth = segmenter.class_probabilities(x, sigma)
        v = count_votes(
            x,
            segmenter,
            sigma=sigma,
            n0=n0,
            n=n,
            num_classes=4,
            batch_size=batch_size,
            seed=seed,
            image_id=f"selftest-h-{m}",
            hierarchy_index=level_maps,
            return_counts=level_from_s,
        )
        margin = v.margin
        if level_from_s:  # the wrong variant: S's fine margin, on S0's scale
            top2 = np.sort(v.counts, axis=0)[-2:]
            margin = (top2[1] - top2[0]) * (n0 / n)
        rec = SimpleNamespace(
            c_hat=v.c_hat, k=v.k, margin=margin, c_hat_levels=v.c_hat_levels, k_levels=v.k_levels, n0=n0, n=n,
            sigma=sigma,
        )  # fmt: skip
        node_probability = np.stack([truth[node_of[lv] == u].sum(0) for lv in range(2) for u in range(4)])
        for correction in corrections:
            cert = certify_levels(rec, h, thresholds, tau=tau, alpha=alpha, correction=correction)
            certified = cert.labels != ABSTAIN
            node = np.where(certified, cert.labels, 0).astype(np.intp)
            index = (cert.level.astype(np.intp) * 4 + node)[None]  # (level, node) -> row of node_probability
            q = np.take_along_axis(node_probability, index, axis=0)[0]
            false = certified & (q <= tau)
            failures[correction] += bool(false.any())
            false_pixels[correction] += int(false.sum())
            certified_pixels[correction] += int(certified.sum())
    results = _results(corrections, images, alpha, significance, height * width, failures, false_pixels,
                       certified_pixels, None)  # fmt: skip
    parameters = {
        "images": images, "seed": seed, "sigma": sigma, "tau": tau, "n0": n0, "n": n, "batch_size": batch_size,
        "num_classes": 4, "height": height, "width": width, "model": model, "thresholds": list(thresholds),
        "level_from": "S" if level_from_s else "S0",
    }  # fmt: skip
    return SelfTestReport(tuple(results), float(alpha), float(significance), False, parameters)
