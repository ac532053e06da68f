"""Benchmark: ray_certseg.certify.certify vs SegCertify's per-pixel loop and a sort-based vectorised version.

For one H x W map (default 1024 x 2048, Cityscapes full resolution) with n estimation samples and C classes,
times side by side, in one run:

* ``certify``: this project (histogram of k, Holm/Bonferroni per distinct k, one lookup pass).
* loop: SegCertify's procedure restated: one ``scipy.stats.binomtest(k_i, n, tau, alternative="greater")``
  per pixel in a Python loop, then ``multipletests`` over all p-values, then abstain where not rejected. The
  per-pixel loop is timed (best of 3) on a random subset of pixels and scaled linearly to H * W;
  ``multipletests`` and the abstain step are timed on the full map (their inputs are the sort-based
  p-values, asserted bit-identical to binomtest's on the subset).
* sort-based: ``binom.sf(k - 1, n, tau)`` on the whole map, then ``multipletests`` (argsort of N p-values).
* floor: one elementwise pass over the same uint8/uint16 maps, ``np.where(k >= k_min, c_hat, ABSTAIN)``
  (int16): the memory-bound lower bound for producing the certified map.

Asserts that certify and sort-based produce identical certified maps. Run: ``python bench/certify.py``.
Requires statsmodels (a test dependency).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import benchlib  # bench/ is on sys.path when run as `python bench/certify.py`
import numpy as np
from scipy.stats import binom, binomtest
from statsmodels.stats.multitest import multipletests

from ray_certseg.certify import ABSTAIN, Certificate, certify


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time of ``repeats`` calls, in seconds (the least disturbed run on a shared machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def vote_map(height: int, width: int, n: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """c_hat (uint8) and k (uint16): most pixels confident, some near class boundaries, some noisy."""
    rng = np.random.default_rng(seed)
    c_hat = rng.integers(0, num_classes, size=(height, width), dtype=np.uint8)
    rate = rng.choice(np.array([0.995, 0.95, 0.85, 0.6]), p=[0.6, 0.2, 0.1, 0.1], size=(height, width))
    return c_hat, rng.binomial(n, rate).astype(np.uint16)


def abstain_where_not_rejected(c_hat: np.ndarray, reject: np.ndarray) -> np.ndarray:
    labels = c_hat.astype(np.int16).reshape(-1)
    labels[~reject] = ABSTAIN
    return labels.reshape(c_hat.shape)


def loop_pvalues(k_flat: np.ndarray, n: int, tau: float) -> np.ndarray:
    """SegCertify's per-pixel test, one Python call per pixel."""
    return np.array([binomtest(int(k_i), n, tau, alternative="greater").pvalue for k_i in k_flat])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("-n", type=int, default=100)
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--tau", type=float, default=0.75)
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--alpha", type=float, default=1e-3)
    parser.add_argument(
        "--subset", type=int, default=2000, help="pixels on which the per-pixel loop is timed"
    )
    parser.add_argument("--repeats", type=int, default=20, help="repeats for the fast methods (best-of)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    n, tau, alpha = args.n, args.tau, args.alpha
    c_hat, k = vote_map(args.height, args.width, n, args.num_classes, args.seed)
    N = k.size
    subset = np.random.default_rng(args.seed + 1).choice(N, size=min(args.subset, N), replace=False)

    print(f"map {args.height}x{args.width} (N={N}), n={n}, C={args.num_classes}, tau={tau}, alpha={alpha}")
    print(
        f"machine: {benchlib.cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"numpy {np.__version__}, load average {benchlib.load_average()} (shared machine: figures measured under load)"
    )

    p_sorted = binom.sf(k.reshape(-1).astype(np.int64) - 1, n, tau)
    p_loop = loop_pvalues(k.reshape(-1)[subset], n, tau)
    assert np.array_equal(p_loop, p_sorted[subset]), "binomtest and binom.sf p-values differ"
    loop_pvalue_s = best_of(lambda: loop_pvalues(k.reshape(-1)[subset], n, tau), 3) * N / subset.size

    header = f"{'correction':<11}{'method':<44}{'time':>12}{'vs certify':>12}"
    print(header + "\n" + "-" * len(header))
    for correction in ("holm", "bonferroni"):
        ours = certify(c_hat, k, n=n, sigma=args.sigma, tau=tau, alpha=alpha, correction=correction)

        def sort_based(correction: str = correction) -> np.ndarray:
            p = binom.sf(k.reshape(-1).astype(np.int64) - 1, n, tau)
            return abstain_where_not_rejected(c_hat, multipletests(p, alpha=alpha, method=correction)[0])

        sorted_labels = sort_based()
        assert np.array_equal(ours.labels, sorted_labels), f"{correction}: certified maps differ"
        certified_k = k[ours.labels != ABSTAIN]
        k_min = int(certified_k.min()) if certified_k.size else n + 1
        assert np.array_equal(np.where(k >= k_min, c_hat, np.int16(ABSTAIN)), ours.labels)

        def loop_tail(correction: str = correction) -> np.ndarray:
            return abstain_where_not_rejected(
                c_hat, multipletests(p_sorted, alpha=alpha, method=correction)[0]
            )

        def ours_again(correction: str = correction) -> Certificate:
            return certify(c_hat, k, n=n, sigma=args.sigma, tau=tau, alpha=alpha, correction=correction)

        def floor(k_min: int = k_min) -> np.ndarray:
            return np.where(k >= k_min, c_hat, np.int16(ABSTAIN))

        t_ours = best_of(ours_again, args.repeats)
        t_floor = best_of(floor, args.repeats)
        t_sorted = best_of(sort_based, 3)
        t_loop = loop_pvalue_s + best_of(loop_tail, 3)
        rows = [
            ("certify (this project)", t_ours),
            ("elementwise floor: np.where(k >= k_min, ...)", t_floor),
            ("sort-based: binom.sf + multipletests", t_sorted),
            (f"per-pixel loop (binomtest on {subset.size} px, scaled)", t_loop),
        ]
        for name, seconds in rows:
            print(f"{correction:<11}{name:<44}{seconds * 1e3:>10.1f}ms{seconds / t_ours:>11.2f}x")
        print(
            f"{correction:<11}certified {ours.num_certified}/{N} pixels; maps identical (asserted); "
            f"loop/certify = {t_loop / t_ours:.0f}x (target >= 3000x), "
            f"certify/floor = {t_ours / t_floor:.2f}x (target <= 3x)"
        )


if __name__ == "__main__":
    main()
