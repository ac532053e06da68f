"""One-shot / multistep DDPM denoiser: timestep rule, scaling maths, resolution modes, loading from disk."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from ray_certseg.models.denoisers import DiffusionDenoiser, IdentityDenoiser
from ray_certseg.models.loading import load_diffusers
from ray_certseg.models.registry import load_denoiser

diffusers = pytest.importorskip("diffusers")


def linear_scheduler(prediction_type: str = "epsilon", **kwargs):
    return diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type=prediction_type,
        **kwargs,
    )


def tiny_unet(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
    ).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DDPMPipeline folder, and the same UNet and a v-prediction scheduler in two separate folders."""
    root = tmp_path_factory.mktemp("ddpm")
    unet = tiny_unet()
    diffusers.DDPMPipeline(unet=unet, scheduler=linear_scheduler()).save_pretrained(root / "pipe")
    unet.save_pretrained(root / "unet_only")
    linear_scheduler("v_prediction").save_pretrained(root / "sched_only")
    return root, unet


class Oracle(nn.Module):
    """Returns the exact network target for a known clean image x0 (in [-1,1]): eps, v or x0 itself.

    Records every (x_t, t) it is called with; ``extra`` appends that many junk channels (learned variance).
    """

    def __init__(self, x0_m11: torch.Tensor, abar: torch.Tensor, prediction_type: str, extra: int = 0):
        super().__init__()
        self.x0, self.abar, self.prediction_type, self.extra = x0_m11, abar.double(), prediction_type, extra
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x_t.clone(), t.clone()))
        a = self.abar[t].view(-1, 1, 1, 1)
        eps = (x_t.double() - a.sqrt() * self.x0) / (1 - a).sqrt()
        target = {
            "epsilon": eps,
            "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * self.x0,
            "sample": self.x0.double(),
        }[self.prediction_type].float()
        return (
            torch.cat([target, torch.randn(target.shape[0], self.extra, *target.shape[2:])], 1)
            if self.extra
            else target
        )


# ----------------------------------------------------------------------------------------------- timestep
def test_timestep_table_linear_schedule():
    """0-based index into diffusers' alphas_cumprod: t* = 145 / 259 / 396 at sigma 0.25 / 0.5 / 1."""
    sched = linear_scheduler()
    den = DiffusionDenoiser(lambda x, t: x, sched.alphas_cumprod)
    abar = sched.alphas_cumprod.double()
    r = ((1 - abar) / abar).sqrt()
    for sigma, expected in [(0.25, 145), (0.5, 259), (1.0, 396)]:
        t = den.timestep(sigma)
        assert t == expected
        assert r[t] >= 2 * sigma > r[t - 1]  # the smallest t whose noise level covers 2 sigma
    assert den.timestep(0.0) == 0
    with pytest.raises(ValueError, match="beyond the noise schedule"):
        den.timestep(100.0)
    with pytest.raises(ValueError, match="sigma"):
        den.timestep(-0.1)


# -------------------------------------------------------------------------------------------- scaling maths
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("extra", [0, 3])
def test_oracle_model_recovers_clean_image(prediction_type, extra):
    """x_t = sqrt(abar_t*) (2(x + delta) - 1) at t*; x0_hat of the exact target is the clean image."""
    torch.manual_seed(1)
    sigma = 0.25
    sched = linear_scheduler(prediction_type)
    clean = 0.1 + 0.8 * torch.rand(2, 3, 16, 24)
    delta = sigma * torch.randn_like(clean)
    oracle = Oracle(2 * clean - 1, sched.alphas_cumprod, prediction_type, extra)
    den = DiffusionDenoiser(oracle, sched.alphas_cumprod, prediction_type=prediction_type)
    out = den(clean + delta, sigma)
    torch.testing.assert_close(out, clean, atol=2e-5, rtol=0)
    ((x_t, t),) = oracle.calls
    assert t.dtype == torch.long and t.tolist() == [145, 145]
    a = sched.alphas_cumprod[145].item()
    torch.testing.assert_close(x_t, math.sqrt(a) * (2 * (clean + delta) - 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_hat_matches_diffusers_step(prediction_type):
    """Independent reference: DDPMScheduler.step(...).pred_original_sample (clipped to [-1, 1])."""
    torch.manual_seed(2)
    sched = linear_scheduler(prediction_type, clip_sample=True)
    out = torch.randn(2, 3, 8, 8)
    den = DiffusionDenoiser(lambda x, t: out, sched.alphas_cumprod, prediction_type=prediction_type)
    x_t = torch.randn(2, 3, 8, 8)
    for t in (10, 145, 700):
        ref = sched.step(out, t, x_t).pred_original_sample
        torch.testing.assert_close(den.x0_hat(x_t, t), ref, atol=1e-5, rtol=0)


def test_learned_variance_uses_first_half():
    torch.manual_seed(3)
    sched = linear_scheduler()
    eps = torch.randn(1, 3, 8, 8)
    six = DiffusionDenoiser(
        lambda x, t: torch.cat([eps, 100 * torch.randn_like(eps)], 1), sched.alphas_cumprod
    )
    three = DiffusionDenoiser(lambda x, t: eps, sched.alphas_cumprod)
    noisy = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(six(noisy, 0.5), three(noisy, 0.5))
    bad = DiffusionDenoiser(lambda x, t: eps[:, :2], sched.alphas_cumprod)
    with pytest.raises(ValueError, match="must return"):
        bad(noisy, 0.5)


def test_sigma_zero_returns_input_and_bad_input_raises():
    den = DiffusionDenoiser(lambda x, t: torch.full_like(x, 7.0), linear_scheduler().alphas_cumprod)
    noisy = torch.rand(2, 3, 8, 8) * 1.4 - 0.2
    assert torch.equal(den(noisy, 0.0), noisy)
    assert not torch.equal(den(noisy, 0.1), noisy)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        den(noisy[0], 0.1)
    with pytest.raises(ValueError, match="sigma"):
        den(noisy, -1.0)
    assert torch.equal(IdentityDenoiser()(noisy, 0.5), noisy) and IdentityDenoiser().name == "identity"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prediction_type": "x0"}, "prediction_type"),
        ({"resolution": "crop"}, "resolution"),
        ({"resolution": "tile"}, "sample_size"),
        ({"resolution": "tile", "sample_size": 16, "tile_overlap": 16}, "tile_overlap"),
        ({"multistep": -1}, "multistep"),
        ({"multiple_of": 0}, "multiple_of"),
    ],
)
def test_constructor_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionDenoiser(lambda x, t: x, linear_scheduler().alphas_cumprod, **kwargs)


def test_constructor_rejects_bad_schedule():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiffusionDenoiser(lambda x, t: x, torch.tensor([0.5, 0.9]))


# ---------------------------------------------------------------------------------------- resolution modes
def conv_model(layers: int, seed: int = 4) -> nn.Module:
    """A purely convolutional epsilon 'network' (3x3 convs, zero padding): receptive-field radius = layers."""
    torch.manual_seed(seed)
    net = nn.Sequential(*[nn.Conv2d(3, 3, 3, padding=1) for _ in range(layers)])

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x_t, t):
            return self.net(x_t)

    return Model()


@pytest.mark.parametrize("layers", [1, 2])
def test_tile_equals_native_for_local_model(layers):
    """Receptive-field radius <= tile_overlap // 4: tiled and native outputs agree exactly (no seams)."""
    torch.manual_seed(5)
    sched = linear_scheduler()
    model = conv_model(layers)
    noisy = torch.rand(2, 3, 40, 56) + 0.25 * torch.randn(2, 3, 40, 56)
    native = DiffusionDenoiser(model, sched.alphas_cumprod)(noisy, 0.25)
    tiled = DiffusionDenoiser(model, sched.alphas_cumprod, resolution="tile", sample_size=16, tile_overlap=8)(
        noisy, 0.25
    )
    torch.testing.assert_close(tiled, native, atol=1e-5, rtol=0)
    # Without overlap the tile borders see zero padding: seams, so the comparison above is not vacuous.
    seams = DiffusionDenoiser(model, sched.alphas_cumprod, resolution="tile", sample_size=16, tile_overlap=0)
    assert (seams(noisy, 0.25) - native).abs().max() > 1e-3


@pytest.mark.parametrize("tiles_per_call", [None, 1, 3, 5, 7, 100])
def test_tiles_of_every_image_batched_together_give_the_same_output(tiles_per_call):
    """tile_pixels packs (tile, image) rows t-major into network calls of K tiles (a call may span tile
    positions and split one position's images); each tile is denoised by the same function, so the blended
    output is the one of a call per tile position (K = B), and every call but the last holds exactly K tiles."""
    torch.manual_seed(8)
    sched = linear_scheduler()
    model = conv_model(2)
    shapes: list[int] = []

    def counted(x_t, t):
        shapes.append(x_t.shape[0])
        return model(x_t, t)

    noisy = torch.rand(3, 3, 40, 56) + 0.25 * torch.randn(3, 3, 40, 56)  # 4 x 6 = 24 tiles of 16, B = 3
    per_position = DiffusionDenoiser(
        model, sched.alphas_cumprod, resolution="tile", sample_size=16, tile_overlap=8
    )
    pixels = None if tiles_per_call is None else tiles_per_call * 16 * 16
    batched = DiffusionDenoiser(
        counted, sched.alphas_cumprod, resolution="tile", sample_size=16, tile_overlap=8, tile_pixels=pixels
    )
    torch.testing.assert_close(batched(noisy, 0.25), per_position(noisy, 0.25), atol=1e-6, rtol=0)
    rows, k = 24 * 3, batched.tiles_per_call(3)
    assert k == (3 if tiles_per_call is None else tiles_per_call)
    assert sum(shapes) == rows and shapes[:-1] == [k] * (len(shapes) - 1) and 0 < shapes[-1] <= k


def test_fit_tile_pixels_fills_the_free_memory_share_within_bounds():
    den = DiffusionDenoiser(
        lambda x, t: x, linear_scheduler().alphas_cumprod, resolution="tile", sample_size=16, tile_overlap=4
    )
    assert den.fit_tile_pixels(free_bytes=10_000, bytes_per_tile=1_000) == 5 * 256  # half of it: 5 tiles
    assert den.tiles_per_call(4) == 5
    assert den.fit_tile_pixels(free_bytes=100, bytes_per_tile=1_000) == 256  # at least one tile
    assert den.fit_tile_pixels(free_bytes=10**12, bytes_per_tile=1, max_tiles=32) == 32 * 256
    with pytest.raises(ValueError, match="tile_pixels"):
        DiffusionDenoiser(lambda x, t: x, linear_scheduler().alphas_cumprod, tile_pixels=0)


def test_tile_and_native_handle_sizes_off_the_grid():
    torch.manual_seed(6)
    sched = linear_scheduler()
    seen: list[tuple[int, int]] = []

    def model(x_t, t):
        seen.append(tuple(x_t.shape[-2:]))
        return torch.zeros_like(x_t)

    noisy = torch.rand(1, 3, 13, 21)
    native = DiffusionDenoiser(model, sched.alphas_cumprod, multiple_of=8)(noisy, 0.25)
    assert native.shape == noisy.shape and seen == [(16, 24)]
    seen.clear()
    tiled = DiffusionDenoiser(model, sched.alphas_cumprod, resolution="tile", sample_size=16, tile_overlap=4)(
        noisy, 0.25
    )
    assert tiled.shape == noisy.shape and set(seen) == {(16, 16)} and len(seen) == 2
    # zero epsilon: x0_hat = x_t / sqrt(abar) = 2 noisy - 1, so both modes return clip(noisy) exactly
    torch.testing.assert_close(native, noisy.clamp(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(tiled, noisy.clamp(0, 1), atol=1e-6, rtol=0)


def test_resize_uses_effective_sigma_of_area_downsampling():
    """Factors (2, 4): the model sees avg-pooled noise of std sigma / sqrt(8), and t* is chosen for that."""
    torch.manual_seed(7)
    sigma = 0.5
    sched = linear_scheduler()
    calls = []

    def model(x_t, t):
        calls.append((x_t, t))
        return torch.zeros_like(x_t)

    den = DiffusionDenoiser(model, sched.alphas_cumprod, resolution="resize", sample_size=32)
    clean = torch.full((1, 3, 64, 128), 0.5)
    out = den(clean + sigma * torch.randn_like(clean), sigma)
    assert out.shape == clean.shape
    ((x_t, t),) = calls
    assert x_t.shape[-2:] == (32, 32)
    assert den.effective_sigma(sigma, 64, 128) == pytest.approx(sigma / math.sqrt(8))
    assert int(t[0]) == den.timestep(sigma / math.sqrt(8)) < den.timestep(sigma)
    a = sched.alphas_cumprod[int(t[0])].item()
    measured = (x_t / math.sqrt(a) + 1).div(2).sub(0.5).std().item()  # the pooled noise, back in [0,1] units
    assert measured == pytest.approx(sigma / math.sqrt(8), rel=0.05)
    with pytest.raises(ValueError, match="integer multiples of sample_size"):
        den(torch.rand(1, 3, 48, 64), sigma)


# -------------------------------------------------------------------------------------------- multistep
def test_multistep_oracle_recovers_clean_image_on_evenly_spaced_steps():
    torch.manual_seed(8)
    sched = linear_scheduler()
    clean = 0.1 + 0.8 * torch.rand(1, 3, 8, 8)
    oracle = Oracle(2 * clean - 1, sched.alphas_cumprod, "epsilon")
    den = DiffusionDenoiser(oracle, sched.alphas_cumprod, multistep=3)
    torch.testing.assert_close(den(clean + 0.25 * torch.randn_like(clean), 0.25), clean, atol=2e-5, rtol=0)
    assert [int(t[0]) for _, t in oracle.calls] == [145, 97, 48]


def test_multistep_matches_ancestral_ddpm_steps():
    """K = t*: every step is a plain DDPM step; reference = DDPMScheduler.step with the same generator."""
    torch.manual_seed(9)
    sched = linear_scheduler(clip_sample=True)
    model = conv_model(1, seed=10)
    sigma = 0.03
    noisy = torch.rand(1, 3, 8, 8)
    den = DiffusionDenoiser(model, sched.alphas_cumprod, multistep=1)
    t_star = den.timestep(sigma)
    assert 3 < t_star < 40
    den = DiffusionDenoiser(model, sched.alphas_cumprod, multistep=t_star, multistep_seed=11)
    with torch.no_grad():
        out = den(noisy, sigma)
        generator = torch.Generator().manual_seed(11)
        x = math.sqrt(sched.alphas_cumprod[t_star].item()) * (2 * noisy - 1)
        for t in range(t_star, 1, -1):
            x = sched.step(model(x, torch.tensor([t])), t, x, generator=generator).prev_sample
        x0 = sched.step(model(x, torch.tensor([1])), 1, x).pred_original_sample
    torch.testing.assert_close(out, (x0 + 1) / 2, atol=1e-4, rtol=0)


class SixChannel(nn.Module):
    """epsilon from 3x3 convs, and variance channels v = tanh(conv(x_t)) in (-1, 1): a learned-variance net."""

    def __init__(self, seed: int = 13):
        super().__init__()
        torch.manual_seed(seed)
        self.eps, self.var = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x_t, t):
        return torch.cat([self.eps(x_t), torch.tanh(self.var(x_t))], 1)


def guided_diffusion_chain(model, abar: torch.Tensor, t_star: int, k: int, x_t, seed: int, learned: bool):
    """Reference: guided-diffusion's p_sample on the respaced timesteps (SpacedDiffusion), written from its
    formulas: betas_i = 1 - abar_i / abar_{i-1}; posterior_variance = betas (1 - abar_prev) / (1 - abar);
    posterior_log_variance_clipped = log(append(pv[1], pv[1:])); LEARNED_RANGE: min_log = that, max_log =
    log(betas), frac = (v + 1) / 2; sample = mean + exp(log_var / 2) z; the final index returns x0."""
    used = sorted({round(t_star * (k - j) / k) for j in range(k)})
    a = abar.double()[used]
    a_prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
    betas = 1 - a / a_prev
    pv = betas * (1 - a_prev) / (1 - a)
    log_pv = torch.log(torch.cat([pv[1:2], pv[1:]]))
    gen = torch.Generator().manual_seed(seed)
    x = x_t
    for i in range(len(used) - 1, 0, -1):
        out = model(x, torch.tensor([used[i]]))
        eps, v = out[:, :3], out[:, 3:]
        x0 = ((x - (1 - a[i]).sqrt() * eps) / a[i].sqrt()).clamp(-1, 1)
        mean = (a_prev[i].sqrt() * betas[i] / (1 - a[i])) * x0 + (
            (1 - a_prev[i]) * (1 - betas[i]).sqrt() / (1 - a[i])
        ) * x
        frac = (v + 1) / 2
        log_var = frac * torch.log(betas[i]) + (1 - frac) * log_pv[i] if learned else log_pv[i]
        x = (mean + torch.exp(0.5 * log_var) * torch.randn((1, *x.shape[1:]), generator=gen)).float()
    out = model(x, torch.tensor([used[0]]))
    return ((x - (1 - a[0]).sqrt() * out[:, :3]) / a[0].sqrt()).clamp(-1, 1)


@pytest.mark.parametrize("variance", ["auto", "learned", "fixed"])
def test_multistep_learned_variance_matches_guided_diffusion(variance):
    """A 6-channel model's variance channels set the step noise (auto = learned), as guided-diffusion does."""
    sched = linear_scheduler()
    model = SixChannel()
    noisy = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(14))
    den = DiffusionDenoiser(model, sched.alphas_cumprod, multistep=4, multistep_seed=5, variance=variance)
    t_star = den.timestep(0.25)
    with torch.no_grad():
        out = den(noisy, 0.25)
        x_t = math.sqrt(sched.alphas_cumprod[t_star].item()) * (2 * noisy - 1)
        learned = guided_diffusion_chain(model, sched.alphas_cumprod, t_star, 4, x_t, 5, learned=True)
        fixed = guided_diffusion_chain(model, sched.alphas_cumprod, t_star, 4, x_t, 5, learned=False)
    ref, other = (fixed, learned) if variance == "fixed" else (learned, fixed)
    torch.testing.assert_close(out, (ref + 1) / 2, atol=1e-5, rtol=0)
    assert (out - (other + 1) / 2).abs().max() > 1e-3  # the two variances differ: the test can tell


def test_multistep_learned_variance_matches_diffusers_learned_range():
    """Second reference, K = t*: DDPMScheduler(variance_type="learned_range").step with the same generator."""
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range", clip_sample=True
    )
    model = SixChannel(seed=15)
    sigma = 0.03
    noisy = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(16))
    t_star = DiffusionDenoiser(model, sched.alphas_cumprod).timestep(sigma)
    den = DiffusionDenoiser(model, sched.alphas_cumprod, multistep=t_star, multistep_seed=17)
    with torch.no_grad():
        out = den(noisy, sigma)
        generator = torch.Generator().manual_seed(17)
        x = math.sqrt(sched.alphas_cumprod[t_star].item()) * (2 * noisy - 1)
        for t in range(t_star, 1, -1):
            x = sched.step(model(x, torch.tensor([t])), t, x, generator=generator).prev_sample
        x0 = sched.step(model(x, torch.tensor([1])), 1, x).pred_original_sample
    torch.testing.assert_close(out, (x0 + 1) / 2, atol=1e-4, rtol=0)


def test_learned_variance_needs_six_channels_and_names_the_choice():
    sched = linear_scheduler()
    with pytest.raises(ValueError, match="variance must be one of"):
        DiffusionDenoiser(conv_model(1), sched.alphas_cumprod, variance="big")
    den = DiffusionDenoiser(conv_model(1), sched.alphas_cumprod, multistep=2, variance="learned")
    with pytest.raises(ValueError, match="6 output channels"):
        den(torch.rand(1, 3, 8, 8), 0.25)
    one_shot = [
        DiffusionDenoiser(conv_model(1), sched.alphas_cumprod, variance=v).name for v in ("auto", "fixed")
    ]
    chains = [
        DiffusionDenoiser(conv_model(1), sched.alphas_cumprod, multistep=2, variance=v).name
        for v in ("auto", "fixed")
    ]
    assert one_shot[0] == one_shot[1] and chains[0] != chains[1]


def test_multistep_is_deterministic_and_batch_independent():
    torch.manual_seed(12)
    sched = linear_scheduler()
    model = conv_model(1)
    den = DiffusionDenoiser(model, sched.alphas_cumprod, multistep=4, multistep_seed=3)
    noisy = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        batch = den(noisy, 0.25)
        torch.testing.assert_close(den(noisy, 0.25), batch, atol=0, rtol=0)
        for i in range(3):
            torch.testing.assert_close(den(noisy[i : i + 1], 0.25), batch[i : i + 1], atol=1e-6, rtol=0)
        one_shot = DiffusionDenoiser(model, sched.alphas_cumprod)(noisy, 0.25)
        other_seed = DiffusionDenoiser(model, sched.alphas_cumprod, multistep=4, multistep_seed=4)(
            noisy, 0.25
        )
    assert (batch - one_shot).abs().max() > 1e-3 and (batch - other_seed).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------ loading
def test_from_pretrained_pipeline_folder_and_separate_folders(saved):
    root, unet = saved
    noisy = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        x_t = math.sqrt(linear_scheduler().alphas_cumprod[145].item()) * (2 * noisy - 1)
        expected = (
            x_t
            - math.sqrt(1 - linear_scheduler().alphas_cumprod[145].item())
            * unet(x_t, torch.full((2,), 145)).sample
        ) / math.sqrt(linear_scheduler().alphas_cumprod[145].item())
        expected = (expected.clamp(-1, 1) + 1) / 2
        pipe = load_diffusers(root / "pipe")
        torch.testing.assert_close(pipe(noisy, 0.25), expected, atol=1e-5, rtol=0)
    assert pipe.prediction_type == "epsilon" and pipe.sample_size == 16 and pipe.name.startswith("pipe-")
    separate = load_diffusers(unet=root / "unet_only", scheduler=root / "sched_only")
    assert separate.prediction_type == "v_prediction" and separate.name.startswith("unet_only-")
    assert separate.name != load_diffusers(root / "pipe", multistep=2).name != pipe.name
    tiled = load_diffusers(root / "pipe", resolution="tile", tile_overlap=4)
    with torch.no_grad():
        assert tiled(torch.rand(1, 3, 20, 28), 0.5).shape == (1, 3, 20, 28)


def test_from_pretrained_bfloat16(saved):
    root, _ = saved
    den = load_diffusers(root / "pipe", dtype="bfloat16")
    assert den.model.unet.dtype == torch.bfloat16
    with torch.no_grad():
        out = den(torch.rand(1, 3, 16, 16), 0.25)
    assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1


def test_from_pretrained_errors(saved, tmp_path):
    root, _ = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_diffusers(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="unet/"):
        load_diffusers(tmp_path / "empty")
    (tmp_path / "cond").mkdir()
    (tmp_path / "cond" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        load_diffusers(tmp_path / "cond", scheduler=root / "sched_only")
    with pytest.raises(ValueError, match="path="):
        load_diffusers()


def test_load_denoiser_specs(saved):
    root, _ = saved
    assert load_denoiser(None, device="cpu", dtype=torch.float32) is None
    assert isinstance(
        load_denoiser({"kind": "identity"}, device="cpu", dtype=torch.float32), IdentityDenoiser
    )
    den = load_denoiser(
        {
            "kind": "diffusers",
            "path": str(root / "pipe"),
            "resolution": "tile",
            "tile_overlap": 4,
            "multistep": 2,
        },
        device="cpu",
        dtype=torch.float32,
    )
    assert (den.resolution, den.tile_overlap, den.multistep) == ("tile", 4, 2)
    den = load_denoiser(
        {"kind": "diffusers", "unet": str(root / "unet_only"), "scheduler": str(root / "sched_only")},
        device="cpu",
        dtype=torch.float32,
    )
    assert den.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="unknown keys"):
        load_denoiser(
            {"kind": "diffusers", "path": str(root / "pipe"), "overlap": 4}, device="cpu", dtype=torch.float32
        )
    with pytest.raises(ValueError, match="unknown denoiser kind"):
        load_denoiser({"kind": "dncnn"}, device="cpu", dtype=torch.float32)
    with pytest.raises(TypeError, match="dict"):
        load_denoiser("identity", device="cpu", dtype=torch.float32)


@pytest.mark.slow
def test_compiled_denoiser_builds_one_graph_for_every_sigma():
    """prepare_model(compile=True) compiles the network only: no graph break, and sigmas 0.25 / 0.5 / 1.0
    (t* = 145 / 259 / 396, passed as a tensor) share one graph for one batch shape; outputs as eager."""
    from torch._dynamo.utils import counters

    from ray_certseg.sampling import prepare_model

    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))

    class Timed(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x_t, t):
            return self.net(x_t) * (1 + 1e-3 * t.float())[:, None, None, None]

    den = DiffusionDenoiser(Timed(), linear_scheduler().alphas_cumprod)
    x = torch.rand(2, 3, 16, 16)
    sigmas = (0.25, 0.5, 1.0)
    with torch.inference_mode():
        eager = [den(x, s) for s in sigmas]
    torch._dynamo.reset()
    counters.clear()
    compiled = prepare_model(den, compile=True)
    assert compiled is den
    with torch.inference_mode():
        got = [compiled(x, s) for s in sigmas]
    for a, b in zip(eager, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


@pytest.mark.slow
@pytest.mark.parametrize("resolution", ["native", "tile"])
def test_compiled_base_classifier_builds_one_graph_per_shape_for_every_sigma(resolution):
    """The whole base classifier compiled as the job does (prepare_model on the segmenter and on the
    denoiser): count_votes at sigmas 0.25 and 0.5 builds one graph per module and batch shape (the denoiser
    sees the noisy batches, or in tile mode its calls of tile_pixels tiles and the remainder; the segmenter
    also the clean image alone), no graph break, votes as eager."""
    from torch._dynamo.utils import counters

    from ray_certseg.sampling import count_votes, prepare_model

    torch.manual_seed(3)
    layers = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1)).eval()

    class Seg(nn.Module):  # a model class of its own, as every loaded segmenter is (dynamo skips torch.nn's)
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            return self.layers(x)

    seg = Seg().eval()

    class Eps(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x_t, t):
            return self.net(x_t)

    # tile mode: 24 x 24 in 4 tiles of 16, so a batch of 4 samples is 16 tiles: calls of 6, 6 and 4
    tiles = {"resolution": "tile", "sample_size": 16, "tile_overlap": 4, "tile_pixels": 6 * 16 * 16}
    den = DiffusionDenoiser(
        Eps(), linear_scheduler().alphas_cumprod, **(tiles if resolution == "tile" else {})
    )
    image = torch.rand(3, 16, 16) if resolution == "native" else torch.rand(3, 24, 24)
    args = {"n0": 2, "n": 6, "num_classes": 4, "batch_size": 4, "seed": 0, "image_id": "g"}  # 2 full batches
    with torch.inference_mode():
        eager = [count_votes(image, seg, denoiser=den, sigma=s, **args) for s in (0.25, 0.5)]
    torch._dynamo.reset()
    counters.clear()
    seg_c, den_c = prepare_model(seg, compile=True), prepare_model(den, compile=True)
    with torch.inference_mode():
        got = [count_votes(image, seg_c, denoiser=den_c, sigma=s, **args) for s in (0.25, 0.5)]
    for a, b in zip(eager, got):
        assert (a.c_hat == b.c_hat).all() and (a.clean_pred == b.clean_pred).all() and (a.k == b.k).all()
    # segmenter: batch 1 (clean) and 4; denoiser: batch 4 (tile mode: 6 and 4); the same graphs for both sigmas
    assert counters["stats"]["unique_graphs"] == (3 if resolution == "native" else 4)
    assert not counters["graph_break"]


def test_probe_tile_bytes_is_the_peak_growth_of_one_more_tile(monkeypatch):
    """No GPU here: the CUDA allocator's counters are stood in for by a model whose peak is 1000 + 300 k bytes
    for k tiles (weights and workspace fixed, activations per tile); the probe reports the 300 of one tile."""
    peak = {"bytes": 0}

    def model(x_t, t):
        peak["bytes"] = 1000 + 300 * x_t.shape[0]
        return torch.zeros_like(x_t)

    for name, fn in {
        "synchronize": lambda device=None: None,
        "reset_peak_memory_stats": lambda device=None: peak.update(bytes=0),
        "memory_allocated": lambda device=None: 0,
        "max_memory_allocated": lambda device=None: peak["bytes"],
    }.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    den = DiffusionDenoiser(
        model, linear_scheduler().alphas_cumprod, resolution="tile", sample_size=16, tile_overlap=4
    )
    assert den.probe_tile_bytes(torch.device("cpu")) == 300
