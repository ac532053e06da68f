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

Modules: :mod:`~ray_certseg.selftest.segmenters` (the analytic segmenters and image models),
:mod:`~ray_certseg.selftest.rates` (exact rates), :mod:`~ray_certseg.selftest.run` (the loop and the report).
"""

from ray_certseg.selftest.rates import (
    bonferroni_error_rate,
    critical_count,
    poisson_binomial_pvalue,
    selection_probabilities,
)
from ray_certseg.selftest.run import (
    SIGNIFICANCE,
    CorrectionResult,
    SelfTestReport,
    run_hierarchical_selftest,
    run_selftest,
)
from ray_certseg.selftest.segmenters import (
    TOY_HIERARCHY,
    LinearThresholdSegmenter,
    SharedNoise,
    boundary_probabilities,
    coarse_sure_probabilities,
    hierarchy_probabilities,
)

__all__ = [
    "SIGNIFICANCE",
    "TOY_HIERARCHY",
    "CorrectionResult",
    "LinearThresholdSegmenter",
    "SelfTestReport",
    "SharedNoise",
    "bonferroni_error_rate",
    "boundary_probabilities",
    "coarse_sure_probabilities",
    "critical_count",
    "hierarchy_probabilities",
    "poisson_binomial_pvalue",
    "run_hierarchical_selftest",
    "run_selftest",
    "selection_probabilities",
]
