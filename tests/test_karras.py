"""Continuous-sigma denoisers (consistency models, EDM): the same x0 as diffusers' own step at the same input and
sigma, the model's sigma range refused on the driver and on the actor, and DDPM-only options refused."""

from __future__ import annotations

import pytest
import torch
from test_denoisers import tiny_unet

from ray_certseg.config import ConfigError, JobConfig
from ray_certseg.job import preflight
from ray_certseg.models.karras import KarrasDenoiser
from ray_certseg.models.loading import load_diffusers, noise_range
from ray_certseg.models.registry import load_denoiser

diffusers = pytest.importorskip("diffusers")


def noisy_input(seed: int, sigma_model: float) -> torch.Tensor:
    """y = x0 + sigma_model n in the model's [-1, 1] units, a batch of two 16 x 16 images."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    return x0 + sigma_model * torch.randn(2, 3, 16, 16, generator=g)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A consistency-model pipeline folder (UNet + CMStochasticIterativeScheduler, sigma_max 2) and an EDM one."""
    root = tmp_path_factory.mktemp("karras")
    unet = tiny_unet(seed=3)
    cm = diffusers.CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=2.0)
    diffusers.ConsistencyModelPipeline(unet=unet, scheduler=cm).save_pretrained(root / "cm")
    edm = diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    unet.save_pretrained(root / "edm" / "unet")
    edm.save_pretrained(root / "edm" / "scheduler")
    return root, unet


def test_a_consistency_model_folder_denoises_as_its_pipelines_one_step(folders):
    """One step of the consistency pipeline at a sigma of its grid (scale_model_input, the UNet at
    sigma_to_t, step with no noise after it) is exactly the denoiser at sigma = sigma_model / 2."""
    root, unet = folders
    den = load_diffusers(root / "cm")
    assert isinstance(den, KarrasDenoiser) and den.sigma_range == (0.001, 1.0)
    scheduler = diffusers.CMStochasticIterativeScheduler.from_pretrained(root / "cm", subfolder="scheduler")
    for index in (5, 20, 39):
        scheduler.set_timesteps(timesteps=[index])
        sigma_model, t = float(scheduler.sigmas[0]), scheduler.timesteps[0]
        y = noisy_input(index, sigma_model)
        with torch.no_grad():
            out = unet(scheduler.scale_model_input(y, t), t).sample
            expected = scheduler.step(out, t, y).prev_sample  # clipped to [-1, 1] (clip_denoised)
            got = den((y + 1) / 2, sigma_model / 2) * 2 - 1
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_an_edm_folder_denoises_as_its_schedulers_preconditioned_step(folders):
    """EDMEulerScheduler's x0 (pred_original_sample of a step at sigma, no churn), clipped, is the denoiser's."""
    root, unet = folders
    spec = {
        "kind": "diffusers",
        "unet": str(root / "edm" / "unet"),
        "scheduler": str(root / "edm" / "scheduler"),
    }
    den = load_denoiser(spec)
    assert isinstance(den, KarrasDenoiser) and den.kind == "EDMEulerScheduler"
    scheduler = diffusers.EDMEulerScheduler.from_pretrained(root / "edm" / "scheduler")
    scheduler.set_timesteps(num_inference_steps=12)
    for i in (7, 9, 11):
        scheduler._step_index = i  # the step at sigma_i, as a sampling loop reaches it
        sigma_model, t = float(scheduler.sigmas[i]), scheduler.timesteps[i]
        y = noisy_input(i, sigma_model)
        with torch.no_grad():
            out = unet(scheduler.scale_model_input(y, t), t).sample
            scheduler._step_index = i
            expected = scheduler.step(out, t, y).pred_original_sample.clamp(-1, 1)
            got = den((y + 1) / 2, sigma_model / 2) * 2 - 1
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_a_sigma_outside_the_models_range_is_refused_with_the_range(folders, tmp_path):
    root, _ = folders
    den = load_diffusers(root / "cm")
    with pytest.raises(ValueError, match=r"sigma 1.5 is outside .* range \[0.001, 1\]"):
        den(torch.full((1, 3, 16, 16), 0.5), 1.5)
    assert noise_range({"kind": "diffusers", "path": str(root / "cm")}) == (0.001, 1.0)
    cfg = JobConfig.from_dict(
        {
            "output": str(tmp_path / "out"),
            "dataset": {"kind": "manifest", "manifest": str(tmp_path / "m.csv"), "num_classes": 3},
            "models": {
                "segmenters": {"s": {"kind": "module", "factory": "ray_certseg.models.tiny:tiny_segnet"}},
                "denoisers": {"cm": {"kind": "diffusers", "path": str(root / "cm")}},
            },
            "methods": {"cm": {"segmenter": "s", "denoiser": "cm"}},
            "sampling": {"sigmas": [0.25, 1.5]},
        }
    )
    with pytest.raises(
        ConfigError, match=r"sampling.sigmas: \[1.5\] outside \[0.001, 1\].*models.denoisers.cm"
    ):
        preflight.check_noise_levels(cfg)


def test_ddpm_only_options_are_refused_for_a_continuous_sigma_folder(folders):
    root, _ = folders
    with pytest.raises(ValueError, match="multistep apply to DDPM schedulers"):
        load_diffusers(root / "cm", multistep=2)


def test_the_memory_probe_denoises_at_a_sigma_the_model_accepts():
    """probe_tile_bytes denoises at ``probe_sigma``: 0.25, or the nearest end of the model's range."""
    high = KarrasDenoiser(lambda y, c: y, diffusers.EDMEulerScheduler(sigma_min=1.0, sigma_max=4.0))
    assert high.probe_sigma == 0.5
    assert high._denoise(torch.full((1, 3, 8, 8), 0.5), high.probe_sigma).shape == (1, 3, 8, 8)
