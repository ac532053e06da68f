"""Statistical self-test of the certificates: the analytic segmenter's closed form, the shared-noise
replay, the exact Bonferroni rate, and the false-certificate rate of the real sampling + certification."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binom

from ray_certseg import cli
from ray_certseg.sampling import count_votes
from ray_certseg.selftest import (
    LinearThresholdSegmenter,
    SharedNoise,
    boundary_probabilities,
    critical_count,
    poisson_binomial_pvalue,
    run_selftest,
    selection_probabilities,
)

ALPHA = 0.2


def random_segmenter(
    seed: int, num_classes: int = 3, size: int = 4
) -> tuple[torch.Tensor, np.ndarray, LinearThresholdSegmenter]:
    """(image, target class probabilities, segmenter built from them) with random weights."""
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.random((3, size, size), dtype=np.float32))
    weight = torch.from_numpy(rng.normal(size=(3, size, size)).astype(np.float32))
    target = rng.dirichlet(np.ones(num_classes), size * size).T.reshape(num_classes, size, size)
    return image, target, LinearThresholdSegmenter.from_probabilities(image, target, 0.3, weight)


@pytest.fixture(scope="module")
def report():
    """The self-test with independent noise, both corrections (about 5 s)."""
    return run_selftest(images=500, alpha=ALPHA, seed=0)


def test_closed_form_matches_monte_carlo_of_the_segmenter():
    """P[f_i(x + delta) = c] from the closed form equals the frequency over 20000 fresh noise draws."""
    image, target, segmenter = random_segmenter(1)
    exact = segmenter.class_probabilities(image, 0.3)
    np.testing.assert_allclose(exact, target, atol=1e-5)  # float32 thresholds reproduce the target
    generator = torch.Generator().manual_seed(2)
    draws = 20_000
    noisy = image + 0.3 * torch.randn(draws, *image.shape, generator=generator)
    logits = segmenter(noisy)
    assert logits.shape == (draws, 3, 4, 4) and bool(((logits == 0) | (logits == 1)).all())
    frequency = torch.nn.functional.one_hot(logits.argmax(1), 3).float().mean(0).permute(2, 0, 1).numpy()
    sd = np.sqrt(exact * (1 - exact) / draws)
    assert np.abs(frequency - exact).max() < 5 * sd.max()
    # the closed form uses sigma ||w_i||: at another sigma the same frequencies are far off
    assert np.abs(frequency - segmenter.class_probabilities(image, 0.6)).max() > 20 * sd.max()


def test_labels_count_the_thresholds_below_the_score():
    weight = torch.ones(3, 1, 2)
    thresholds = torch.tensor([[[0.5, 1.0]], [[1.5, 2.0]]])  # (C - 1 = 2, 1, 2)
    segmenter = LinearThresholdSegmenter(weight, thresholds)
    images = torch.tensor([0.1, 0.4, 0.6])[:, None, None, None].expand(3, 3, 1, 2)  # scores 0.3, 1.2, 1.8
    np.testing.assert_array_equal(segmenter(images).argmax(1)[:, 0].numpy(), [[0, 0], [1, 1], [2, 1]])


def test_shared_noise_counts_each_draw_batch_size_times():
    """Under SharedNoise every vote count is a multiple of the batch size (10 draws counted 10 times); the
    plain segmenter's counts are not."""
    image, _, segmenter = random_segmenter(3, size=8)
    kwargs = {
        "sigma": 0.3,
        "n0": 10,
        "n": 100,
        "num_classes": 3,
        "batch_size": 10,
        "seed": 0,
        "return_counts": True,
    }
    shared = count_votes(image, SharedNoise(segmenter), **kwargs)
    plain = count_votes(image, segmenter, **kwargs)
    assert (shared.counts % 10 == 0).all() and (shared.counts0 % 10 == 0).all()
    assert (plain.counts % 10 != 0).mean() > 0.3
    np.testing.assert_array_equal(shared.clean_pred, plain.clean_pred)


def test_selection_probabilities_exact():
    """Two classes: P[c_hat = 1] = P[Binom(n0, p_1) > n0 / 2] (ties go to class 0); three classes sum to 1."""
    p1 = np.linspace(0.05, 0.95, 12).reshape(3, 4)
    selected = selection_probabilities(np.stack([1 - p1, p1]), 10)
    np.testing.assert_allclose(selected[1], binom.sf(5, 10, p1), rtol=1e-12)
    np.testing.assert_allclose(selected[0], binom.cdf(5, 10, p1), rtol=1e-12)
    _, target, _ = random_segmenter(4)
    three = selection_probabilities(target, 7)
    np.testing.assert_allclose(three.sum(0), 1.0, rtol=1e-12)
    rng = np.random.default_rng(5)
    votes = rng.multinomial(7, target[:, 0, 0], size=50_000)
    frequency = np.bincount(votes.argmax(1), minlength=3) / 50_000
    assert np.abs(frequency - three[:, 0, 0]).max() < 0.01


def test_critical_count_and_boundary_design():
    k = critical_count(100, 0.75, ALPHA / 256)
    assert binom.sf(k - 1, 100, 0.75) <= ALPHA / 256 < binom.sf(k - 2, 100, 0.75)
    p = boundary_probabilities(np.random.default_rng(0), 3, 16, 16, tau=0.75, n=100, alpha=ALPHA)
    np.testing.assert_allclose(p.sum(0), 1.0)
    top = p.max(0)
    near = np.abs(top - 0.75) <= 0.02
    assert near.mean() > 0.5 and (top[~near] >= 0.98).all() and (top[near] <= 0.75).mean() > 0.75


def test_poisson_binomial_pvalue_equals_binomial_for_equal_rates():
    for failures in (0, 7, 20, 40):
        expected = min(1.0, 2 * min(binom.cdf(failures, 100, 0.2), binom.sf(failures - 1, 100, 0.2)))
        assert poisson_binomial_pvalue(failures, [0.2] * 100) == pytest.approx(expected, rel=1e-9)


def test_false_certificate_rate_within_alpha(report):
    """The guarantee: for Holm and Bonferroni the images with a false certificate are not significantly more
    than alpha M, Bonferroni's count matches its exact rate, and the design has power (rates near alpha)."""
    print("\n" + report.to_markdown())
    holm, bonferroni = report.results
    assert report.passed and (holm.correction, bonferroni.correction) == ("holm", "bonferroni")
    for r in report.results:
        assert r.pvalue >= 1e-3 and r.images == 500
        assert r.ci[0] <= r.rate <= r.ci[1] and r.false_pixels >= r.failures
    assert bonferroni.exact_pvalue >= 1e-3 and holm.exact_pvalue is None
    assert ALPHA / 5 < bonferroni.expected_rate < ALPHA
    # Holm rejects a superset of Bonferroni's pixels on the same votes; its rate is a sizeable part of alpha
    assert holm.failures >= bonferroni.failures and holm.certified_pixels >= bonferroni.certified_pixels
    assert holm.rate > ALPHA / 3
    assert 0.1 < bonferroni.certified_pixels / bonferroni.pixels < 0.5


def test_shared_noise_fails_the_selftest():
    """The released SegCertify bug (one noise draw per batch of 10, n = 100) is caught by both corrections."""
    shared = run_selftest(images=100, alpha=ALPHA, seed=0, shared_noise=True)
    print("\n" + shared.to_markdown())
    assert not shared.passed
    for r in shared.results:
        assert not r.passed and r.pvalue < 1e-3 and r.ci[0] > ALPHA


def test_same_seed_same_report():
    first, second = (run_selftest(images=20, alpha=ALPHA, seed=7) for _ in range(2))
    assert first.results == second.results


def test_cli_selftest_exit_codes(capsys):
    assert cli.main(["selftest", "--images", "60", "--correction", "holm"]) == 0
    out = capsys.readouterr().out
    assert "| holm | " in out and "pass" in out and "bonferroni" not in out
    assert cli.main(["selftest", "--images", "30", "--shared-noise"]) == 1
    out = capsys.readouterr().out
    assert "SHARED" in out and out.count("FAIL") == 2
    assert cli.main(["selftest", "--images", "0"]) == 2
    assert "images must be an integer >= 1" in capsys.readouterr().err
    wrong = ["selftest", "--procedure", "hierarchical", "--level-from-s", "--images", "40", "--seed", "3"]
    assert cli.main([*wrong, "--correction", "holm"]) == 1  # the wrong variant fails on coarse-sure
    out = capsys.readouterr().out
    assert "coarse-sure" in out and "level from S (the wrong variant)" in out and "FAIL" in out
    assert cli.main(["selftest", "--model", "boundary"]) == 2  # a hierarchical option without the procedure
    assert "need --procedure hierarchical" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 1.5}, "alpha must be in"),
        ({"corrections": ("bh",)}, "corrections must be"),
        ({"tau": 0.99}, "tau must lie in"),
        ({"n": 0}, "n must be an integer"),
        ({"num_classes": 1}, "num_classes must be"),
        ({"sigma": -1.0}, "sigma must be"),
    ],
)
def test_bad_selftest_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_selftest(images=1, **kwargs)


def test_bad_segmenter_arguments_raise():
    with pytest.raises(TypeError, match="torch tensors"):
        LinearThresholdSegmenter(np.ones((3, 2, 2)), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"weight must be a tensor \(3, H, W\)"):
        LinearThresholdSegmenter(torch.ones(2, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="thresholds must be a tensor"):
        LinearThresholdSegmenter(torch.ones(3, 2, 2), torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="non-decreasing"):
        LinearThresholdSegmenter(torch.ones(3, 2, 2), torch.tensor([1.0, 0.0])[:, None, None].expand(2, 2, 2))
    with pytest.raises(ValueError, match="non-zero functional"):
        LinearThresholdSegmenter(torch.zeros(3, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="sum to 1"):
        LinearThresholdSegmenter.from_probabilities(
            torch.rand(3, 2, 2), np.full((2, 2, 2), 0.7), 0.25, torch.ones(3, 2, 2)
        )
