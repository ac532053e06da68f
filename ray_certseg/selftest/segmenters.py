"""The self-test's analytic segmenters: per-pixel class probabilities under Gaussian noise known in closed form,
the released SegCertify bug as a wrapper, and the image models whose pixels sit where false certificates happen."""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
import torch
from scipy.stats import norm
from torch import Tensor, nn

from ray_certseg.selftest.rates import critical_count, tail_probabilities


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
    exactness = tail_probabilities(n, tau)[critical_count(n, tau, alpha / rest)] * rest / alpha
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


def _describe(value: object) -> str:
    return f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


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
