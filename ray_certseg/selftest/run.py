"""The self-test's loop: seeded images of an analytic segmenter through the real ``count_votes`` and a
certification procedure, false certificates counted per correction, then tested against alpha
(:mod:`ray_certseg.selftest` states the test). One loop serves both procedures; a :class:`Model` hook says how
an image's class probabilities are drawn, how its votes are counted and what a certified pixel claims."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from types import SimpleNamespace
from typing import Any, Protocol

import numpy as np
import torch
from scipy.stats import binom, binomtest
from torch import nn

from ray_certseg.certify import ABSTAIN, CORRECTIONS, certify
from ray_certseg.sampling import SamplingSpec, Votes, count_votes, level_index
from ray_certseg.selftest.rates import bonferroni_error_rate, poisson_binomial_pvalue
from ray_certseg.selftest.segmenters import (
    HIERARCHICAL_MODELS,
    TOY_HIERARCHY,
    LinearThresholdSegmenter,
    SharedNoise,
    boundary_probabilities,
    coarse_sure_probabilities,
    hierarchy_probabilities,
)

SIGNIFICANCE = 1e-3
"""Level of the tests of the false-certificate count: against alpha, and against Bonferroni's exact rate."""


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


@dataclass(frozen=True)
class Setting:
    """The shared parameters of one self-test run, checked once for every procedure."""

    images: int
    alpha: float
    corrections: tuple[str, ...]
    seed: int
    sigma: float
    tau: float
    n0: int
    n: int
    batch_size: int
    num_classes: int
    height: int
    width: int
    significance: float

    def __post_init__(self) -> None:
        for name, minimum in (
            ("images", 1),
            ("n0", 1),
            ("n", 1),
            ("batch_size", 1),
            ("num_classes", 2),
            ("height", 1),
            ("width", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if not (isinstance(self.alpha, Real) and 0.0 < self.alpha < 1.0):
            raise ValueError(
                f"alpha must be in (0, 1), got {self.alpha!r}; the self-test needs a large one such as 0.2"
            )
        if not (isinstance(self.significance, Real) and 0.0 < self.significance < 1.0):
            raise ValueError(f"significance must be in (0, 1), got {self.significance!r}")
        if not self.corrections or any(c not in CORRECTIONS for c in self.corrections):
            raise ValueError(
                f"corrections must be a non-empty subset of {CORRECTIONS}, got {self.corrections!r}"
            )
        if not (isinstance(self.tau, Real) and 0.5 < self.tau < 0.98):
            raise ValueError(f"tau must lie in (0.5, 0.98) (sure pixels have p >= 0.98), got {self.tau!r}")

    @property
    def spec(self) -> SamplingSpec:
        """How every image of the run is sampled."""
        return SamplingSpec(self.sigma, self.n0, self.n, self.num_classes, self.batch_size, self.seed)

    def parameters(self) -> dict[str, Any]:
        keys = ("images", "seed", "sigma", "tau", "n0", "n", "batch_size", "num_classes", "height", "width")
        return {k: getattr(self, k) for k in keys}


class Model(Protocol):
    """What a procedure's self-test says about one image: its class probabilities, its votes, and for each
    certified pixel the true probability of what was certified (false iff <= tau)."""

    prefix: str  # image ids are f"{prefix}{m}"

    def probabilities(self, rng: np.random.Generator, s: Setting) -> np.ndarray: ...

    def votes(self, x: torch.Tensor, segmenter: nn.Module, image_id: str, s: Setting) -> Votes: ...

    def certified(
        self, votes: Votes, truth: np.ndarray, correction: str, s: Setting
    ) -> tuple[np.ndarray, np.ndarray]:
        """(certified mask, true probability of the certified class or node), both (H, W)."""
        ...

    def exact_rate(self, truth: np.ndarray, s: Setting) -> float | None:
        """Bonferroni's exact per-image rate of a false certificate, when known."""
        ...


def run(model: Model, s: Setting) -> tuple[CorrectionResult, ...]:
    """Image m: rng = default_rng([seed, m]); x ~ U[0, 1]^(3, H, W); w ~ N(0, I); the model's class
    probabilities; a :class:`LinearThresholdSegmenter` with exactly those; its votes; each correction's
    certificates on the same votes, a certified pixel being false iff its true probability is <= tau."""
    failures = dict.fromkeys(s.corrections, 0)
    false_pixels = dict.fromkeys(s.corrections, 0)
    certified_pixels = dict.fromkeys(s.corrections, 0)
    rates: list[float | None] = []
    for m in range(s.images):
        rng = np.random.default_rng([s.seed, m])
        x = torch.from_numpy(rng.random((3, s.height, s.width), dtype=np.float32))
        weight = torch.from_numpy(rng.normal(size=(3, s.height, s.width)).astype(np.float32))
        segmenter = LinearThresholdSegmenter.from_probabilities(
            x, model.probabilities(rng, s), s.sigma, weight
        )
        truth = segmenter.class_probabilities(x, s.sigma)
        votes = model.votes(x, segmenter, f"{model.prefix}{m}", s)
        for correction in s.corrections:
            certified, p_true = model.certified(votes, truth, correction, s)
            false = certified & (p_true <= s.tau)
            failures[correction] += bool(false.any())
            false_pixels[correction] += int(false.sum())
            certified_pixels[correction] += int(certified.sum())
        if "bonferroni" in s.corrections:
            rates.append(model.exact_rate(truth, s))
    known = rates if rates and all(r is not None for r in rates) else None
    return tuple(
        _result(c, s, failures[c], false_pixels[c], certified_pixels[c], known) for c in s.corrections
    )


def _result(
    correction: str,
    s: Setting,
    failures: int,
    false_pixels: int,
    certified_pixels: int,
    bonferroni_rates: list[float] | None,
) -> CorrectionResult:
    """The verdict for one correction from its counts; ``bonferroni_rates``: the exact per-image rates r_m
    when known (SegCertify's test), else None."""
    ci = binomtest(failures, s.images).proportion_ci(0.95, method="exact")
    pvalue = float(binom.sf(failures - 1, s.images, s.alpha))
    exact = correction == "bonferroni" and bonferroni_rates is not None
    exact_pvalue = poisson_binomial_pvalue(failures, bonferroni_rates) if exact else None
    return CorrectionResult(
        correction=correction,
        images=s.images,
        failures=failures,
        rate=failures / s.images,
        ci=(float(ci.low), float(ci.high)),
        pvalue=pvalue,
        passed=pvalue >= s.significance and (exact_pvalue is None or exact_pvalue >= s.significance),
        expected_rate=float(np.mean(bonferroni_rates)) if exact else None,
        exact_pvalue=exact_pvalue,
        false_pixels=false_pixels,
        certified_pixels=certified_pixels,
        pixels=s.images * s.height * s.width,
    )


@dataclass
class SegCertifyModel:
    """SegCertify: ``boundary_probabilities`` images, plain votes (or ``SharedNoise``'s), ``certify``; a
    certified pixel claims P[f_i(x + delta) = c_hat_i] > tau."""

    shared_noise: bool = False
    prefix: str = "selftest-"

    def probabilities(self, rng: np.random.Generator, s: Setting) -> np.ndarray:
        return boundary_probabilities(rng, s.num_classes, s.height, s.width, tau=s.tau, n=s.n, alpha=s.alpha)

    def votes(self, x: torch.Tensor, segmenter: nn.Module, image_id: str, s: Setting) -> Votes:
        model = SharedNoise(segmenter) if self.shared_noise else segmenter
        return count_votes(x, model, s.spec, image_id=image_id)

    def certified(
        self, votes: Votes, truth: np.ndarray, correction: str, s: Setting
    ) -> tuple[np.ndarray, np.ndarray]:
        cert = certify(
            votes.c_hat, votes.k, n=s.n, sigma=s.sigma, tau=s.tau, alpha=s.alpha, correction=correction
        )
        p_certified = np.take_along_axis(truth, votes.c_hat[None].astype(np.intp), axis=0)[0]
        return cert.labels != ABSTAIN, p_certified

    def exact_rate(self, truth: np.ndarray, s: Setting) -> float | None:
        return bonferroni_error_rate(truth, n0=s.n0, n=s.n, tau=s.tau, alpha=s.alpha)


class HierarchicalModel:
    """Hierarchical certification on :data:`TOY_HIERARCHY`: votes counted per level, ``certify_levels``; a
    certified pixel claims that the true probability of its node (the sum of its classes') is > tau.
    ``level_from_s`` chooses each pixel's level from the estimation votes S (their fine margin) instead of
    S0: the deliberately wrong variant."""

    prefix = "selftest-h-"

    def __init__(self, model: str, thresholds: tuple[float, ...] | None, level_from_s: bool):
        from ray_certseg.certify import class_tree

        if model not in HIERARCHICAL_MODELS:
            raise ValueError(f"model must be one of {sorted(HIERARCHICAL_MODELS)}, got {model!r}")
        self.model, self.level_from_s = model, level_from_s
        self.thresholds = HIERARCHICAL_MODELS[model] if thresholds is None else tuple(thresholds)
        self.hierarchy = class_tree.from_dict(TOY_HIERARCHY)
        self.node_of = np.stack(self.hierarchy.node)  # (levels, classes)
        self.level_maps = level_index(self.hierarchy.node[1:])

    def probabilities(self, rng: np.random.Generator, s: Setting) -> np.ndarray:
        if self.model == "boundary":
            return hierarchy_probabilities(rng, s.height, s.width, tau=s.tau, n=s.n, alpha=s.alpha)
        return coarse_sure_probabilities(rng, s.height, s.width, tau=s.tau)

    def votes(self, x: torch.Tensor, segmenter: nn.Module, image_id: str, s: Setting) -> Votes:
        spec = dataclasses.replace(s.spec, hierarchy_index=self.level_maps, return_counts=self.level_from_s)
        return count_votes(x, segmenter, spec, image_id=image_id)

    def certified(
        self, votes: Votes, truth: np.ndarray, correction: str, s: Setting
    ) -> tuple[np.ndarray, np.ndarray]:
        from ray_certseg.certify.hierarchical import certify_levels

        margin = votes.margin
        if self.level_from_s:  # the wrong variant: S's fine margin, on S0's scale
            top2 = np.sort(votes.counts, axis=0)[-2:]
            margin = (top2[1] - top2[0]) * (s.n0 / s.n)
        rec = SimpleNamespace(
            c_hat=votes.c_hat,
            k=votes.k,
            margin=margin,
            c_hat_levels=votes.c_hat_levels,
            k_levels=votes.k_levels,
            n0=s.n0,
            n=s.n,
            sigma=s.sigma,
        )
        cert = certify_levels(
            rec, self.hierarchy, self.thresholds, tau=s.tau, alpha=s.alpha, correction=correction
        )
        certified = cert.labels != ABSTAIN
        C = s.num_classes
        levels = self.node_of.shape[0]
        node_probability = np.stack(
            [truth[self.node_of[lv] == u].sum(0) for lv in range(levels) for u in range(C)]
        )
        node = np.where(certified, cert.labels, 0).astype(np.intp)
        index = (cert.level.astype(np.intp) * C + node)[None]  # (level, node) -> row of node_probability
        return certified, np.take_along_axis(node_probability, index, axis=0)[0]

    def exact_rate(self, truth: np.ndarray, s: Setting) -> float | None:
        return None


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
    """SegCertify's self-test on ``images`` seeded images of ``boundary_probabilities`` (image id
    ``selftest-m``), every correction on the same votes. ``shared_noise`` wraps the segmenter in
    ``SharedNoise`` (the released SegCertify bug), and the test must fail."""
    s = Setting(
        images,
        alpha,
        tuple(corrections),
        seed,
        sigma,
        tau,
        n0,
        n,
        batch_size,
        num_classes,
        height,
        width,
        significance,
    )
    results = run(SegCertifyModel(shared_noise=bool(shared_noise)), s)
    return SelfTestReport(results, float(alpha), float(significance), bool(shared_noise), s.parameters())


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
    """The false-certificate test of hierarchical certification (``ray_certseg.certify.hierarchical``) on the
    4-class :data:`TOY_HIERARCHY` (image id ``selftest-h-m``). ``model``: ``"boundary"``
    (:func:`hierarchy_probabilities`) or ``"coarse-sure"`` (:func:`coarse_sure_probabilities`, where the wrong
    variant ``level_from_s`` fails under Holm);; ``thresholds`` default to the model's in
    :data:`HIERARCHICAL_MODELS`."""
    hook = HierarchicalModel(model, thresholds, bool(level_from_s))
    s = Setting(
        images, alpha, tuple(corrections), seed, sigma, tau, n0, n, batch_size, 4, height, width, significance
    )
    parameters = {
        **s.parameters(),
        "model": model,
        "thresholds": list(hook.thresholds),
        "level_from": "S" if level_from_s else "S0",
    }
    return SelfTestReport(run(hook, s), float(alpha), float(significance), False, parameters)
