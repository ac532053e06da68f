"""ADMUNet against outputs of OpenAI's guided-diffusion code; checkpoint errors; schedules; ADM denoiser.

tests/data/adm/ holds data produced by running the public guided-diffusion code (see its README in
/work/shared/reference/guided_diffusion): a small model's state_dict, its flags, inputs and the original
outputs, and the key/shape list of the 256x256 unconditional checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ray_certseg.models.adm import (
    ADM_PRESETS,
    ADMUNet,
    AttentionBlock,
    GroupNorm32,
    ResBlock,
    load_adm_checkpoint,
    load_adm_unet,
)
from ray_certseg.models.schedule import adm_alphas_cumprod

DATA = Path(__file__).parent / "data" / "adm"
SMALL_PT = DATA / "adm_small.pt"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: one intra-op thread avoids oversubscription on shared CI cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small_flags() -> dict:
    return json.loads((DATA / "adm_small_flags.json").read_text())


@pytest.fixture(scope="module")
def vectors() -> dict[str, torch.Tensor]:
    with np.load(DATA / "adm_small_vectors.npz") as npz:
        return {k: torch.from_numpy(npz[k]) for k in npz.files}


@pytest.fixture(scope="module")
def small_model(small_flags) -> ADMUNet:
    return load_adm_unet(SMALL_PT, small_flags)


# --- the UNet against the original code -----------------------------------------------------------


def test_small_checkpoint_loads_strictly_with_plain_torch_load(small_flags):
    model = ADMUNet(**small_flags)
    result = model.load_state_dict(torch.load(SMALL_PT, map_location="cpu", weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_small_model_reproduces_original_outputs(small_model, vectors):
    with torch.no_grad():
        y = small_model(vectors["x0"], vectors["t0"])
    assert y.shape == vectors["y0"].shape == (2, 6, 32, 32)
    assert y.dtype == torch.float32
    assert (y - vectors["y0"]).abs().max().item() < 1e-4


def test_scalar_timestep_is_broadcast(small_model, vectors):
    x = vectors["x0"]
    t = int(vectors["t0"][0])
    with torch.no_grad():
        y_scalar = small_model(x, torch.tensor(t))
        y_vector = small_model(x, torch.full((x.shape[0],), t))
    torch.testing.assert_close(y_scalar, y_vector)


def test_new_attention_order_is_not_the_legacy_one(small_flags, vectors):
    model = ADMUNet(**{**small_flags, "use_new_attention_order": True})
    model.load_state_dict(torch.load(SMALL_PT, weights_only=True))
    with torch.no_grad():
        y = model.eval()(vectors["x0"], vectors["t0"])
    assert (y - vectors["y0"]).abs().max().item() > 1e-2


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_matches_per_head_softmax(new_order):
    """softmax(q^T k / sqrt(d)) v per head, with qkv channels laid out per head (legacy) or q|k|v (new)."""
    heads, d, length, b = 2, 32, 10, 3
    block = AttentionBlock(heads * d, heads, -1, new_order)
    qkv = torch.randn(b, 3 * heads * d, length, generator=torch.Generator().manual_seed(0))
    if new_order:
        q, k, v = qkv.reshape(b, 3, heads, d, length).unbind(1)
    else:
        q, k, v = qkv.reshape(b, heads, 3, d, length).unbind(2)
    w = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / math.sqrt(d), dim=-1)
    expected = torch.einsum("bhts,bhcs->bhct", w, v).reshape(b, heads * d, length)
    torch.testing.assert_close(block.attention(qkv), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_hands_sdpa_heads_with_unit_stride(new_order, monkeypatch):
    """The fused SDPA kernels (flash, memory-efficient) need q, k, v of shape (B, H, L, d) with stride 1 in d;
    a d-stride of L (the conv's channels-major output transposed) sends attention to the math path."""
    from torch.nn import functional as F

    seen, real = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: seen.append(a) or real(*a, **kw))
    heads, d, length, b = 2, 32, 10, 3
    AttentionBlock(heads * d, heads, -1, new_order).attention(torch.randn(b, 3 * heads * d, length))
    ((q, k, v),) = seen
    for t in (q, k, v):
        assert t.shape == (b, heads, length, d) and t.stride(-1) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_native_half_group_norm_is_within_one_rounding_of_the_float32_round_trip(dtype, monkeypatch):
    """The CUDA fast path (a half input straight to group_norm, which accumulates in float32) against
    guided-diffusion's float32 round trip, checked on the CPU by letting the CPU take that path: the outputs
    differ by at most 2 units in the last place of half precision (the affine parameters are rounded too)."""
    torch.manual_seed(0)
    gn = GroupNorm32(64)
    gn.weight.data.uniform_(0.5, 1.5)
    gn.bias.data.uniform_(-0.5, 0.5)
    x = (torch.randn(4, 64, 16, 16) * 3 + 1).to(dtype)
    round_trip, full = gn(x), gn(x.float())
    monkeypatch.setattr(GroupNorm32, "NATIVE_HALF_DEVICES", frozenset({"cpu"}))
    native = gn(x)
    assert native.dtype == round_trip.dtype == dtype
    mantissa = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    ulp = 2.0 ** (math.floor(math.log2(round_trip.float().abs().max().item())) - mantissa)
    assert 0 < (native.float() - round_trip.float()).abs().max().item() <= 2 * ulp
    assert torch.equal(gn(x.float()), full)  # a float32 input never takes the half path


class RecordOps(TorchDispatchMode):
    """The aten ops run under it, with the element counts of their outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list[int]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, tuple) else (out,)
        self.ops.append(
            (func.overloadpacket.__name__, [o.numel() for o in outs if isinstance(o, torch.Tensor)])
        )
        return out

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.ops]


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_modulated_group_norm_is_the_scale_shift_in_one_kernel(dtype, monkeypatch):
    """GN(x) (1 + s) + t with per-sample (s, t) as one group_norm over the (1, B C) view with per-(sample,
    channel) affine: the same values as guided-diffusion's GN then scale-shift (float32: to float32 rounding;
    half on the native path: within 2 units in the last place, one rounding instead of two) and one kernel."""
    torch.manual_seed(1)
    gn = GroupNorm32(64)
    gn.weight.data.uniform_(0.5, 1.5)
    gn.bias.data.uniform_(-0.5, 0.5)
    x = (torch.randn(3, 64, 8, 8) * 3 + 1).to(dtype)
    scale, shift = torch.randn(3, 64, 1, 1) * 0.3, torch.randn(3, 64, 1, 1)
    expected = gn(x.double()).double() * (1 + scale.double()) + shift.double()  # the float32 round trip

    monkeypatch.setattr(GroupNorm32, "NATIVE_HALF_DEVICES", frozenset({"cpu"}))
    with torch.no_grad(), RecordOps() as kernels:
        y = gn.modulated(x, scale[:, :, 0, 0], shift[:, :, 0, 0])
    whole = [  # the kernels writing a whole activation
        name for name, sizes in kernels.ops if name not in ("view", "_unsafe_view") and x.numel() in sizes
    ]
    assert y.dtype == dtype and y.shape == x.shape
    mantissa = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[dtype]
    ulp = 2.0 ** (math.floor(math.log2(expected.abs().max().item())) - mantissa)
    assert (y.double() - expected).abs().max().item() <= (8 if dtype == torch.float32 else 2) * ulp
    if dtype != torch.float32:  # the native half path: the normalisation with its affine and nothing else
        assert whole == ["native_group_norm"]


def _plain_resblock(block: ResBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """guided-diffusion's ResBlock.forward, op by op: h = conv(SiLU(GN(h)) (1 + s) + t) ..., skip(x) + h."""
    if block.resample is None:
        h = block.in_layers(x)
    else:
        h = block.in_layers[-1](block.resample(block.in_layers[:-1](x)))
        x = block.resample(x)
    scale, shift = block.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
    h = block.out_layers[1:](block.out_layers[0](h) * (1 + scale) + shift)
    return block.skip_connection(x) + h


@pytest.mark.parametrize(
    ("channels", "out_channels", "resample", "fused"),
    [
        (64, 32, {}, "baddbmm"),  # 1x1 skip convolution: the add is the matrix product's input
        (32, 32, {"up": True}, "broadcast"),  # up-sampled identity skip: no up(x)
        (32, 32, {"down": True}, None),
        (32, 32, {}, None),
    ],
)
def test_resblock_fast_residuals_equal_guided_diffusions_formula(channels, out_channels, resample, fused):
    block = _randomised(ResBlock(channels, 16, 0.0, out_channels, use_scale_shift_norm=True, **resample), 0)
    gen = torch.Generator().manual_seed(2)
    x, emb = torch.randn(2, channels, 8, 8, generator=gen), torch.randn(2, 16, generator=gen)
    with torch.no_grad(), RecordOps() as ops:
        y = block(x, emb)
    with torch.no_grad():
        expected = _plain_resblock(block, x, emb)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert ("baddbmm" in ops.names) == (fused == "baddbmm")
    assert ops.names.count("upsample_nearest2d") == (1 if resample.get("up") else 0)  # h only, never x


def test_half_precision_blocks_stay_close_to_float32(small_flags, small_model, vectors):
    """guided-diffusion's use_fp16 scheme: only block convolutions are cast; output in the input's dtype."""
    half = load_adm_unet(SMALL_PT, small_flags).convert_blocks_to(torch.float16)
    assert half.block_dtype == torch.float16
    assert half.out[2].weight.dtype == torch.float32
    assert half.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32  # GroupNorm stays float32
    with torch.no_grad():
        y16 = half(vectors["x0"], vectors["t0"])
        y32 = small_model(vectors["x0"], vectors["t0"])
    assert y16.dtype == torch.float32
    err = (y16 - y32).abs().max().item()
    assert 0 < err < 0.02 * y32.abs().max().item()


# --- the architecture of the paper's checkpoint ---------------------------------------------------


def test_256_uncond_flags_give_exactly_the_checkpoint_keys_and_shapes():
    ref = json.loads((DATA / "adm_256x256_uncond_keys.json").read_text())
    assert ADM_PRESETS["256x256_uncond"] == ref["flags"]
    with torch.device("meta"):
        model = ADMUNet(**ref["flags"])
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == ref["state_dict_shapes"]
    assert sum(p.numel() for p in model.parameters()) == 552_814_086
    assert model.multiple_of == 32


def test_channel_mult_parsing():
    with torch.device("meta"):
        assert ADMUNet(256, 64, 1, channel_mult="").channel_mult == (1, 1, 2, 2, 4, 4)
        assert ADMUNet(64, 64, 1, channel_mult="1,2,2").channel_mult == (1, 2, 2)
        assert ADMUNet(64, 64, 1, channel_mult=(1, 2)).channel_mult == (1, 2)
    with pytest.raises(ValueError, match="channel_mult"):
        ADMUNet(100, 32, 1, channel_mult="")
    with pytest.raises(ValueError, match="attention_resolutions"):
        ADMUNet(64, 32, 1, channel_mult="1,2", attention_resolutions="16,x")


def test_conv_resampling_uses_guided_diffusion_names():
    """Without resblock_updown the resamplers are convs named op (down) and conv (up)."""
    with torch.device("meta"):
        model = ADMUNet(32, 32, 1, channel_mult="1,2", attention_resolutions="16", resblock_updown=False)
    keys = set(model.state_dict())
    assert "input_blocks.2.0.op.weight" in keys
    assert "output_blocks.1.2.conv.weight" in keys
    assert not any("emb_layers" in k for k in keys if k.startswith("input_blocks.2."))


def test_forward_rejects_bad_sizes_and_labels(small_model):
    with pytest.raises(ValueError, match="multiple of 4"):
        small_model(torch.zeros(1, 3, 30, 32), torch.tensor([1]))
    with pytest.raises(ValueError, match="class labels"):
        small_model(torch.zeros(1, 3, 32, 32), torch.tensor([1]), y=torch.tensor([0]))


# --- checkpoint loading errors --------------------------------------------------------------------


def test_pickle_needing_checkpoint_is_refused(tmp_path, small_model):
    path = tmp_path / "whole_model.pt"
    torch.save(small_model, path)  # pickles the module: loading it would run code
    with pytest.raises(ValueError, match=r"refusing to load .*whole_model\.pt.*state_dict"):
        load_adm_checkpoint(path)


def test_non_state_dict_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "step": 3}, path)
    with pytest.raises(ValueError, match=r"wrapped\.pt does not hold a state_dict"):
        load_adm_checkpoint(path)


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_adm_checkpoint(tmp_path / "nowhere.pt")


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (
            {"attention_resolutions": "16"},
            r"missing keys: \['output_blocks.*unexpected keys: \['input_blocks.5.1.norm",
        ),
        ({"learn_sigma": False}, r"out\.2\.weight: checkpoint \(6, 32, 3, 3\) vs model \(3, 32, 3, 3\)"),
        ({"num_channels": 64}, r"shape mismatches"),
    ],
)
def test_wrong_flags_give_a_clear_key_mismatch_error(small_flags, change, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        load_adm_unet(SMALL_PT, {**small_flags, **change})
    message = str(info.value)
    assert "adm_small.pt" in message and "wrong flags" in message


# --- noise schedules ------------------------------------------------------------------------------


def test_linear_schedule_matches_diffusers_ddpm():
    from diffusers import DDPMScheduler

    ours = adm_alphas_cumprod("linear", 1000)
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    assert ours.dtype == torch.float32 and ours.shape == (1000,)
    torch.testing.assert_close(ours, theirs.alphas_cumprod, rtol=1e-5, atol=1e-6)


def test_linear_schedule_is_rescaled_for_other_step_counts():
    from diffusers import DDPMScheduler

    theirs = DDPMScheduler(
        num_train_timesteps=4000, beta_schedule="linear", beta_start=0.25e-4, beta_end=0.005
    )
    torch.testing.assert_close(
        adm_alphas_cumprod("linear", 4000), theirs.alphas_cumprod, rtol=1e-5, atol=1e-6
    )


def test_cosine_schedule_matches_diffusers_squaredcos():
    from diffusers import DDPMScheduler

    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(
        adm_alphas_cumprod("cosine", 1000), theirs.alphas_cumprod, rtol=1e-5, atol=1e-6
    )


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="noise_schedule"):
        adm_alphas_cumprod("quadratic", 1000)
    with pytest.raises(ValueError, match="diffusion_steps"):
        adm_alphas_cumprod("linear", 0)


# --- the ADM denoiser -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def load_adm_denoiser():
    pytest.importorskip(
        "ray_certseg.models.denoisers", reason="DiffusionDenoiser is written in another module"
    )
    from ray_certseg.models.loading import load_adm_denoiser

    return load_adm_denoiser


@pytest.fixture(scope="module")
def small_spec(small_flags) -> dict:
    return {
        "kind": "adm",
        "checkpoint": str(SMALL_PT),
        "flags": small_flags,
        "noise_schedule": "linear",
        "diffusion_steps": 1000,
        "resolution": "native",
    }


def _one_shot(model: ADMUNet, noisy: torch.Tensor, sigma: float, t: int, channels: slice) -> torch.Tensor:
    """Carlini et al.'s one-shot x0 from an epsilon model.

    x_t = sqrt(abar)(2x - 1), x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), clipped, mapped to [0, 1].
    """
    abar = adm_alphas_cumprod("linear", 1000)[t].double()
    x_t = (abar.sqrt() * (2 * noisy.double() - 1)).float()
    with torch.no_grad():
        eps = model(x_t, torch.full((noisy.shape[0],), t))[:, channels].double()
    x0 = ((x_t.double() - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
    return ((x0 + 1) / 2).float()


def test_adm_denoiser_end_to_end(load_adm_denoiser, small_spec, small_model):
    denoiser = load_adm_denoiser(small_spec)
    assert denoiser.timestep(0.25) == 145  # linear 1000-step schedule, method.md section 3.4
    assert denoiser.timestep(0.5) == 259
    sigma = 0.25
    clean = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    noisy = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = denoiser(noisy, sigma)
    assert out.shape == (2, 3, 32, 32)
    t = denoiser.timestep(sigma)
    epsilon = _one_shot(small_model, noisy, sigma, t, slice(0, 3))
    variance = _one_shot(small_model, noisy, sigma, t, slice(3, 6))
    torch.testing.assert_close(out, epsilon, rtol=1e-4, atol=1e-4)  # the first 3 (epsilon) channels are used
    assert (out - variance).abs().max().item() > 1e-2


def test_adm_denoiser_pads_native_sizes(load_adm_denoiser, small_spec):
    denoiser = load_adm_denoiser(small_spec)
    noisy = torch.rand(1, 3, 30, 42)
    with torch.no_grad():
        out = denoiser(noisy, 0.5)
    assert out.shape == (1, 3, 30, 42)
    assert 0.0 <= out.min().item() and out.max().item() <= 1.0


def test_adm_denoiser_is_float32_on_cpu_whatever_dtype(load_adm_denoiser, small_spec):
    noisy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out32 = load_adm_denoiser(small_spec)(noisy, 0.33)
        out16 = load_adm_denoiser(small_spec, dtype=torch.float16)(noisy, 0.33)
    torch.testing.assert_close(out16, out32, rtol=0, atol=0)


def test_adm_denoiser_reads_a_flags_file(load_adm_denoiser, small_spec, small_flags, tmp_path):
    flags_file = tmp_path / "flags.json"  # guided-diffusion scripts dump model and diffusion flags together
    flags_file.write_text(
        json.dumps(
            {**small_flags, "diffusion_steps": 1000, "noise_schedule": "cosine", "timestep_respacing": ""}
        )
    )
    spec = {"kind": "adm", "checkpoint": str(SMALL_PT), "flags_file": str(flags_file)}
    cosine = adm_alphas_cumprod("cosine", 1000)
    r = (1 - cosine) / cosine
    assert load_adm_denoiser(spec).timestep(0.25) == int(torch.nonzero(r >= 0.25).min())
    assert load_adm_denoiser({**spec, "noise_schedule": "linear"}).timestep(0.25) == 145


def test_adm_denoiser_with_the_paper_preset_names_the_flag_mismatch(load_adm_denoiser):
    with pytest.raises(ValueError, match=r"adm_small\.pt does not fit .*wrong flags"):
        load_adm_denoiser({"kind": "adm", "checkpoint": str(SMALL_PT), "preset": "256x256_uncond"})


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        ({"tile_size": 256}, ValueError, "unknown keys \\['tile_size'\\]"),
        ({"flags": {"num_chanels": 32}}, ValueError, "unknown ADM flags \\['num_chanels'\\]"),
        ({"flags": {"class_cond": True}}, ValueError, "class_cond"),
        ({"preset": "512x512_cond"}, ValueError, "unknown ADM preset"),
        ({"flags": "image_size=32"}, TypeError, "mapping"),
        ({"checkpoint": "missing/256x256_diffusion_uncond.pt"}, FileNotFoundError, "missing/256x256"),
    ],
)
def test_adm_denoiser_rejects_bad_specs(load_adm_denoiser, small_spec, change, error, pattern):
    with pytest.raises(error, match=pattern):
        load_adm_denoiser({**small_spec, **change})


@pytest.mark.parametrize("config", ["paper_cityscapes.yaml", "paper_pascal_context.yaml"])
def test_paper_configs_point_the_adm_loader_at_the_checkpoint(
    load_adm_denoiser, config, tmp_path, monkeypatch
):
    from ray_certseg.config import load_config

    monkeypatch.chdir(tmp_path)  # relative paths stay relative: no checkpoint here
    cfg = load_config(Path(__file__).parents[1] / "configs" / config)
    spec = cfg.models.denoisers[cfg.methods["diffusion"].denoiser]
    assert cfg.sampling.n0 == 10 and cfg.sampling.n == 100 and cfg.certify.taus == (0.75,)
    with pytest.raises(FileNotFoundError, match="256x256_diffusion_uncond.pt"):
        load_adm_denoiser(spec)
