"""Vote counting: exact sample counts, batch-size-independent seeding, independent noise per draw, checks."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from ray_certseg.certify import select
from ray_certseg.models.util import resolve_dtype
from ray_certseg.sampling import (
    ESTIMATION,
    SELECTION,
    count_votes,
    noise_seed,
    prepare_model,
    sample_seed,
    select_on_device,
    to_tensor_image,
)


class SignOfNoise:
    """2 classes: label 1 where the noisy channel 0 exceeds the clean one, i.e. probability 1/2 per pixel.

    Counts of label 1 are i.i.d. Binomial(n, 1/2) over pixels iff every draw has its own noise.
    Records the batch sizes it sees.
    """

    def __init__(self, clean: torch.Tensor):
        self.clean, self.batches = clean, []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.batches.append(images.shape[0])
        d = images[:, 0] - self.clean[0]
        return torch.stack([-d, d], 1)


def channel_argmax(images: torch.Tensor) -> torch.Tensor:
    """Elementwise 3-class segmenter: the brightest noisy channel wins (noise-dependent, bit-exact)."""
    return images * 10.0


@pytest.fixture
def image():
    torch.manual_seed(0)
    return torch.rand(3, 12, 10)


def test_counts_sum_to_n0_and_n_and_k_is_the_selected_count(image):
    v = count_votes(
        image,
        channel_argmax,
        sigma=0.3,
        n0=13,
        n=101,
        num_classes=3,
        batch_size=8,
        seed=1,
        image_id="a",
        return_counts=True,
    )
    assert v.counts0.shape == v.counts.shape == (3, 12, 10) and v.counts0.dtype == v.counts.dtype == np.int32
    assert (v.counts0.sum(0) == 13).all() and (v.counts.sum(0) == 101).all()
    np.testing.assert_array_equal(v.c_hat, select(v.counts0))
    np.testing.assert_array_equal(v.k, np.take_along_axis(v.counts, v.c_hat[None].astype(np.intp), 0)[0])
    assert v.c_hat.dtype == v.clean_pred.dtype == np.uint8 and v.k.dtype == np.uint16 and v.seconds > 0
    np.testing.assert_array_equal(v.clean_pred, image.argmax(0).numpy())
    assert (
        count_votes(image, channel_argmax, sigma=0.3, n0=2, n=3, num_classes=3, batch_size=8, seed=1).counts
        is None
    )


def test_exact_number_of_draws_in_bounded_batches(image):
    seg = SignOfNoise(image)
    count_votes(image, seg, sigma=0.5, n0=10, n=23, num_classes=2, batch_size=7, seed=0)
    # the clean prediction, then the n0 = 10 and n = 23 draws in one stream of batches of <= 7
    assert seg.batches == [1, 7, 7, 7, 7, 5]


def test_same_seed_same_votes_at_batch_sizes_1_7_64(image):
    runs = [
        count_votes(
            image,
            channel_argmax,
            sigma=0.4,
            n0=10,
            n=70,
            num_classes=3,
            batch_size=b,
            seed=5,
            image_id="img-3",
            return_counts=True,
        )
        for b in (1, 7, 64)
    ]
    for other in runs[1:]:
        for field in ("counts0", "counts", "c_hat", "k", "clean_pred"):
            np.testing.assert_array_equal(getattr(other, field), getattr(runs[0], field))
    changed = [
        count_votes(
            image,
            channel_argmax,
            sigma=0.4,
            n0=10,
            n=70,
            num_classes=3,
            batch_size=7,
            return_counts=True,
            **kw,
        ).counts
        for kw in ({"seed": 6, "image_id": "img-3"}, {"seed": 5, "image_id": "img-4"})
    ]
    assert all(not np.array_equal(c, runs[0].counts) for c in changed)


def test_every_draw_has_independent_noise():
    """Catches the released SegCertify bug (one noise draw shared per batch) and any S0/S reuse.

    Label 1 has probability 1/2 at every pixel; with independent draws the per-pixel counts over n = 100 are
    i.i.d. Binomial(100, 1/2): variance 25 over the 1024 pixels (shared draws in batches of 10 give 250, and
    multiples of 10 only); selection and estimation counts are uncorrelated (reuse would give correlation 1).
    """
    torch.manual_seed(1)
    clean = torch.rand(3, 32, 32)
    v = count_votes(
        clean,
        SignOfNoise(clean),
        sigma=0.25,
        n0=100,
        n=100,
        num_classes=2,
        batch_size=10,
        seed=3,
        image_id="x",
        return_counts=True,
    )
    k1, s1 = v.counts[1].ravel().astype(float), v.counts0[1].ravel().astype(float)
    assert np.mean(k1 % 10 == 0) < 0.5
    assert 0.6 * 25 < k1.var() < 1.5 * 25 and 0.6 * 25 < s1.var() < 1.5 * 25
    assert abs(k1.mean() - 50) < 1.0
    assert abs(np.corrcoef(k1, s1)[0, 1]) < 0.2


def test_noise_seed_is_stable_across_processes():
    code = (
        "from ray_certseg.sampling import noise_seed; print(noise_seed(7, 'frankfurt_000000_000294', 0.25))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert int(out) == noise_seed(7, "frankfurt_000000_000294", 0.25)
    assert (
        len(
            {
                noise_seed(7, "a", 0.25),
                noise_seed(8, "a", 0.25),
                noise_seed(7, "b", 0.25),
                noise_seed(7, "a", 0.5),
            }
        )
        == 4
    )
    assert noise_seed(7, "a", 0.25) == noise_seed(7, "a", np.float32(0.25))


def test_sample_seeds_distinct_within_an_image():
    base = 2**32 - 5  # wraps around
    seeds = [sample_seed(base, stage, i) for stage in (SELECTION, ESTIMATION) for i in range(1000)]
    assert len(set(seeds)) == 2000 and all(0 <= s < 2**32 for s in seeds)
    with pytest.raises(ValueError, match="stage"):
        sample_seed(base, 2, 0)


def test_only_c_hat_k_and_the_clean_prediction_reach_the_host_by_default(image):
    """c_hat and k are computed on the device (issue 15): without return_counts no (C, H, W) count tensor
    is copied to the host, and the maps equal certify.select and take_along_axis of the full counts."""
    torch.manual_seed(3)
    net = nn.Conv2d(3, 5, 3, padding=1).eval()
    kwargs = {"sigma": 0.5, "n0": 7, "n": 30, "num_classes": 5, "batch_size": 8, "seed": 4, "image_id": "d"}
    lean, full = count_votes(image, net, **kwargs), count_votes(image, net, return_counts=True, **kwargs)
    assert lean.counts0 is None and lean.counts is None
    np.testing.assert_array_equal(full.c_hat, select(full.counts0))
    np.testing.assert_array_equal(
        full.k, np.take_along_axis(full.counts, full.c_hat[None].astype(np.intp), 0)[0]
    )
    for name in ("c_hat", "k", "clean_pred"):
        np.testing.assert_array_equal(getattr(lean, name), getattr(full, name))
        assert getattr(lean, name).dtype == getattr(full, name).dtype
    # ties go to the lowest class on the device as in certify.select: counts with many ties
    counts0 = np.random.default_rng(0).integers(0, 3, (4, 50, 7)).astype(np.int32)
    counts0[0] += counts0.sum(0) == 0  # every pixel has a selection vote
    counts0 = torch.from_numpy(counts0)
    counts = torch.from_numpy(np.random.default_rng(1).integers(0, 9, (4, 50, 7)).astype(np.int32))
    c_hat, k = select_on_device(counts0, counts)
    np.testing.assert_array_equal(c_hat.numpy(), select(counts0.numpy()))
    np.testing.assert_array_equal(k.numpy(), np.take_along_axis(counts.numpy(), c_hat.numpy()[None], 0)[0])


def test_uint8_array_input_matches_tensor_input(image):
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    tensor = to_tensor_image(array)
    assert tensor.shape == (3, 12, 10) and tensor.dtype == torch.float32
    np.testing.assert_array_equal((tensor * 255).round().numpy().astype(np.uint8), array.transpose(2, 0, 1))
    kwargs = {
        "sigma": 0.2,
        "n0": 4,
        "n": 9,
        "num_classes": 3,
        "batch_size": 4,
        "seed": 0,
        "return_counts": True,
    }
    a, b = count_votes(array, channel_argmax, **kwargs), count_votes(tensor, channel_argmax, **kwargs)
    np.testing.assert_array_equal(a.counts0, b.counts0)
    np.testing.assert_array_equal(a.k, b.k)


def test_with_diffusion_denoiser_votes_and_clean_prediction(image):
    """Denoiser in front: the clean prediction bypasses it (sigma = 0); noisy draws go through it."""
    from ray_certseg.models.denoisers import DiffusionDenoiser

    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02
    )
    seen = []

    def zero_eps(x_t, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x_t)

    den = DiffusionDenoiser(zero_eps, sched.alphas_cumprod)
    v = count_votes(
        image,
        channel_argmax,
        denoiser=den,
        sigma=0.25,
        n0=5,
        n=20,
        num_classes=3,
        batch_size=8,
        seed=2,
        return_counts=True,
    )
    assert (v.counts0.sum(0) == 5).all() and (v.k <= 20).all()
    assert seen == [145] * 4  # ceil(5/8) + ceil(20/8) batches, all at t*(0.25); none for the clean prediction
    np.testing.assert_array_equal(v.clean_pred, image.argmax(0).numpy())


def test_clean_prediction_never_calls_the_denoiser(image):
    """clean_pred is the segmenter on the clean image for any denoiser, even one that is not the identity at
    sigma = 0 (docs/schema.md): the denoiser sees only the noisy draws."""
    sigmas = []

    def darken(noisy, sigma):
        sigmas.append(sigma)
        return noisy * 0.0

    v = count_votes(
        image, channel_argmax, denoiser=darken, sigma=0.25, n0=2, n=3, num_classes=3, batch_size=8, seed=0
    )
    assert sigmas == [0.25]  # one batch of n0 + n draws; nothing at sigma = 0
    np.testing.assert_array_equal(v.clean_pred, image.argmax(0).numpy())


def test_non_finite_logits_raise(image):
    def nan_segmenter(images):
        out = images.clone()
        out[:, 0, 0, 0] = float("nan")
        return out

    with pytest.raises(ValueError, match="non-finite logits"):
        count_votes(image, nan_segmenter, sigma=0.2, n0=2, n=2, num_classes=3, batch_size=2, seed=0)


@pytest.mark.parametrize(
    "where, value",
    [
        ((0, 0, 0), float("nan")),  # a NaN in the losing class 0 of pixel (0, 0)
        ((2, 5, 3), float("nan")),  # in the last class
        ((1, 3, 4), float("inf")),
        (((0, 1, 2), 7, 2), float("-inf")),  # every class of a pixel -Inf: no label
    ],
)
def test_every_non_finite_top_logit_raises(image, where, value):
    """The check reads only the per-pixel maxima of the class reduction: NaN in any class, +Inf in any class
    and a pixel with no finite class must each still raise, in the selection and in the estimation draws."""
    for after in (0, 1, 4):  # the clean forward, the first noisy batch, a later batch holding S draws
        calls = []

        def broken(images, after=after, calls=calls):
            out = images * 10.0
            if len(calls) == after:
                out[(slice(None), *where)] = value
            calls.append(1)
            return out

        with pytest.raises(ValueError, match=r"non-finite logits \(NaN/Inf\)"):
            count_votes(image, broken, sigma=0.2, n0=2, n=6, num_classes=3, batch_size=2, seed=0)


def test_minus_inf_in_a_losing_class_keeps_the_votes(image):
    """-Inf beside a finite top logit changes no label (the class loses whatever its value): votes as without it."""

    def minus_inf(images):
        out = channel_argmax(images)
        out[:, 2] = torch.where(out[:, 2] < out[:, :2].amax(1), float("-inf"), out[:, 2])
        return out

    args = {"sigma": 0.2, "n0": 3, "n": 9, "num_classes": 3, "batch_size": 4, "seed": 5}
    a, b = count_votes(image, channel_argmax, **args), count_votes(image, minus_inf, **args)
    for name in ("c_hat", "k", "clean_pred"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_tied_logits_vote_for_the_lowest_class():
    """Ties in the logits (here: all equal, or the two top classes equal) go to the lowest class, as argmax."""
    x = torch.rand(3, 6, 5)

    def tied(images):
        out = torch.zeros(images.shape[0], 4, *images.shape[2:])
        out[:, 1:3] = (images[:, :1] > 0.5).float()  # classes 1 and 2 tie where channel 0 is bright
        return out

    v = count_votes(x, tied, sigma=0.0, n0=2, n=3, num_classes=4, batch_size=5, seed=0)
    expect = np.where(x[0].numpy() > 0.5, 1, 0)
    np.testing.assert_array_equal(v.clean_pred, expect)
    np.testing.assert_array_equal(v.c_hat, expect)
    np.testing.assert_array_equal(v.k, np.full(expect.shape, 3))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_labels_are_the_first_argmax_of_the_logits(layout):
    """The base classifier's labels equal ``argmax(dim=1)`` (first maximum) on logits with many ties, in both
    memory layouts of the logits."""
    from ray_certseg.sampling import _BaseClassifier

    logits = torch.randint(0, 3, (5, 19, 16, 12)).float()
    if layout == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last)
    classify = _BaseClassifier(lambda _: logits, None, 19, torch.device("cpu"), None, False)
    labels, ok = classify(torch.zeros(5, 3, 16, 12), 0.25)
    assert torch.equal(labels, logits.argmax(dim=1)) and bool(ok)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sigma": -0.1}, ValueError, "sigma"),
        ({"n": 0}, ValueError, "n must be"),
        ({"n0": 1.5}, ValueError, "n0 must be"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"num_classes": 4}, ValueError, "num_classes"),
        ({"autocast_dtype": "int8"}, ValueError, "floating"),
    ],
)
def test_bad_arguments_raise(image, kwargs, error, match):
    args = {"sigma": 0.2, "n0": 2, "n": 2, "num_classes": 3, "batch_size": 2, "seed": 0} | kwargs
    with pytest.raises(error, match=match):
        count_votes(image, channel_argmax, **args)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(12, 10, 3), r"\(3, H, W\)"),
        (torch.rand(3, 4, 4) * 255, r"\[0, 1\]"),
        (np.zeros((4, 4, 3), np.float32), "uint8"),
        ([[0.5]], "float tensor"),
    ],
)
def test_bad_images_raise(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        count_votes(bad, channel_argmax, sigma=0.2, n0=2, n=2, num_classes=3, batch_size=2, seed=0)


def test_autocast_bfloat16_and_channels_last(image):
    torch.manual_seed(4)
    net = prepare_model(nn.Conv2d(3, 3, 3, padding=1), device="cpu", channels_last=True)
    assert not net.training and not net.weight.requires_grad
    assert net.weight.is_contiguous(memory_format=torch.channels_last)
    kwargs = {"sigma": 0.25, "n0": 4, "n": 16, "num_classes": 3, "batch_size": 8, "seed": 0, "image_id": "q"}
    ref = count_votes(image, net, **kwargs)
    bf16 = count_votes(image, net, autocast_dtype="bf16", channels_last=True, return_counts=True, **kwargs)
    assert (bf16.counts0.sum(0) == 4).all() and bf16.k.max() <= 16
    assert np.mean(bf16.c_hat == ref.c_hat) > 0.8  # low precision may flip near-ties only
    a = count_votes(image, channel_argmax, channels_last=True, return_counts=True, **kwargs)
    b = count_votes(image, channel_argmax, return_counts=True, **kwargs)
    np.testing.assert_array_equal(a.counts0, b.counts0)


def test_resolve_dtype():
    assert resolve_dtype(None) is None and resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16 and resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="floating"):
        resolve_dtype(torch.int64)
    with pytest.raises(TypeError):
        resolve_dtype(16)


KEEP_MEMORY_SCRIPT = """
import resource
import numpy as np, torch
from torch import nn
from ray_certseg.sampling import count_votes, keep_freed_host_memory
torch.manual_seed(0); torch.set_num_threads(1)
net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                    nn.Conv2d(32, 3, 1)).eval()
image = torch.rand(3, 64, 64)
def run():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    v = count_votes(image, net, sigma=0.25, n0=8, n=32, num_classes=3, batch_size=16, seed=0, return_counts=True)
    return v, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
run()
a, faults_default = min((run() for _ in range(3)), key=lambda r: r[1])
ok = keep_freed_host_memory()
run()
b, faults_kept = min((run() for _ in range(3)), key=lambda r: r[1])
for name in ("counts0", "c_hat", "k", "clean_pred"):
    assert np.array_equal(getattr(a, name), getattr(b, name)), name
print(ok, faults_default, faults_kept)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_host_memory_reuses_memory_and_leaves_votes_unchanged():
    """Process-wide, so in a fresh interpreter: after the call a count_votes pass page-faults (almost) none of
    its activations in again (4 MiB per batch here: about 1,000 pages each time with glibc's defaults), and
    the votes are the same. Fewest faults of 3 passes each: the kernel may reclaim idle heap pages between
    passes under memory pressure (a loaded CI machine), which faults some back in."""
    out = subprocess.run(
        [sys.executable, "-c", KEEP_MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    ).stdout.split()
    ok, faults_default, faults_kept = out[0] == "True", int(out[1]), int(out[2])
    assert ok
    assert faults_default > 4000 and faults_kept < faults_default / 10, (faults_default, faults_kept)
