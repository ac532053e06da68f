"""Tests for the Ray Train recipes (segmenter clean / noise-augmented, DDPM) and their saved artefacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_certseg.data.demo import NUM_CLASSES, write_demo_dataset
from ray_certseg.train import LOG_NAME, SEGMENTER_SPEC_NAME, TrainConfig, ddpm_scheduler, fit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ray_local(ray_session):
    """The session's local Ray instance (tests/conftest.py): one per test session."""
    yield


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, num_train=16, num_val=2, seed=1)
    return {
        "kind": "manifest",
        "manifest": str(root / "train.csv"),
        "num_classes": NUM_CLASSES,
        "ignore_index": 255,
    }


def _segmenter_cfg(data_cfg: dict, out: Path, **kw) -> TrainConfig:
    base = {
        "kind": "segmenter",
        "data": data_cfg,
        "out": str(out),
        "steps": 30,
        "batch_size": 4,
        "lr": 1e-2,
        "warmup_steps": 5,
        "crop": 32,
        "log_every": 5,
        "model_kwargs": {"width": 16},
        "storage_path": str(out.parent / "ray_train"),
    }
    return TrainConfig(**{**base, **kw})


def _ddpm_cfg(data_cfg: dict, out: Path, **kw) -> TrainConfig:
    base = {
        "kind": "ddpm",
        "data": data_cfg,
        "out": str(out),
        "steps": 30,
        "batch_size": 4,
        "lr": 2e-3,
        "warmup_steps": 5,
        "crop": 32,
        "log_every": 5,
        "model_kwargs": {"width": 8},
        "max_timestep": 400,
        "storage_path": str(out.parent / "ray_train"),
    }
    return TrainConfig(**{**base, **kw})


def _losses(out: Path) -> list[float]:
    return [row["loss"] for row in json.loads((out / LOG_NAME).read_text())["log"]]


@pytest.mark.ray
def test_segmenter_local_mode_learns_and_saves_a_loadable_spec(ray_local, data_cfg, tmp_path) -> None:
    from safetensors.torch import load_file

    from ray_certseg.models.registry import load_segmenter

    out = tmp_path / "seg"
    metrics = fit(_segmenter_cfg(data_cfg, out))
    losses = _losses(out)
    assert len(losses) == 6 and metrics["step"] == 30 and metrics["out"] == str(out)
    assert np.mean(losses[-2:]) < 0.7 * losses[0], losses
    spec = json.loads((out / SEGMENTER_SPEC_NAME).read_text())
    assert spec["weights"] == str(out / "model.safetensors") and spec["num_classes"] == NUM_CLASSES
    seg = load_segmenter(spec)
    state = load_file(str(out / "model.safetensors"))
    for name, tensor in seg.net.state_dict().items():
        torch.testing.assert_close(tensor, state[name])
    logits = seg(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, NUM_CLASSES, 32, 32)


@pytest.mark.ray
def test_segmenter_training_is_deterministic_and_noise_changes_it(ray_local, data_cfg, tmp_path) -> None:
    from safetensors.torch import load_file

    fit(_segmenter_cfg(data_cfg, tmp_path / "a", steps=6))
    fit(_segmenter_cfg(data_cfg, tmp_path / "b", steps=6))
    fit(_segmenter_cfg(data_cfg, tmp_path / "c", steps=6, noise_sigmas=[0.25, 0.5]))
    a, b, c = (load_file(str(tmp_path / d / "model.safetensors")) for d in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


@pytest.mark.ray
def test_ddpm_local_mode_learns_and_saves_a_diffusers_pipeline(ray_local, data_cfg, tmp_path) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from ray_certseg.models.loading import load_diffusers

    out = tmp_path / "ddpm"
    fit(_ddpm_cfg(data_cfg, out))
    losses = _losses(out)
    assert np.mean(losses[-2:]) < 0.7 * losses[0], losses
    unet = UNet2DModel.from_pretrained(str(out / "unet"), local_files_only=True)
    assert unet.config.sample_size == 32 and tuple(unet.config.block_out_channels) == (8, 16, 16)
    scheduler = DDPMScheduler.from_pretrained(str(out), subfolder="scheduler", local_files_only=True)
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.beta_schedule == "linear"
    assert scheduler.config.prediction_type == "epsilon"
    torch.testing.assert_close(scheduler.alphas_cumprod, ddpm_scheduler().alphas_cumprod)
    assert isinstance(DDPMPipeline.from_pretrained(str(out), local_files_only=True).unet, UNet2DModel)
    denoiser = load_diffusers(str(out))
    x = denoiser(torch.rand(2, 3, 32, 32), 0.25)
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()


@pytest.mark.ray
def test_edm_local_mode_learns_and_saves_a_continuous_sigma_folder(ray_local, data_cfg, tmp_path) -> None:
    """The EDM recipe: its weighted loss falls, and the folder (unet/ + an EDMEulerScheduler holding the trained
    range) loads as the one-shot continuous-sigma denoiser over sigmas sigma_min / 2 .. sigma_max / 2."""
    from ray_certseg.models.karras import KarrasDenoiser
    from ray_certseg.models.loading import load_diffusers

    out = tmp_path / "edm"
    fit(_ddpm_cfg(data_cfg, out, kind="edm", sigma_min=0.2, sigma_max=2.0))
    losses = _losses(out)
    assert np.mean(losses[-2:]) < 0.85 * losses[0], losses  # 30 tiny steps: 1.35 -> 0.98 here
    denoiser = load_diffusers(str(out))
    assert isinstance(denoiser, KarrasDenoiser) and denoiser.sigma_range == (0.1, 1.0)
    x = denoiser(torch.rand(2, 3, 32, 32), 0.25)
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()


@pytest.mark.ray
def test_one_worker_process(ray_local, data_cfg, tmp_path) -> None:
    """The same recipe through a real Ray Train worker actor (num_workers=1), checkpoint persisted to storage."""
    out = tmp_path / "seg1"
    metrics = fit(_segmenter_cfg(data_cfg, out, steps=4, log_every=2, num_workers=1))
    assert metrics["step"] == 4 and len(_losses(out)) == 2
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"kind": "gan"}, "kind must be one of"),
        ({"data": {"kind": "manifest", "manifest": "x.csv"}}, "num_classes"),
        ({"factory": "ray_certseg.models.tiny"}, "package.module:function"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"num_workers": -1}, "num_workers"),
        ({"noise_sigmas": [-0.1]}, "noise_sigmas"),
        ({"max_timestep": 1001}, "max_timestep"),
        ({"sigma_min": 2.0, "sigma_max": 1.0}, "sigma_min < sigma_max"),
        ({"std": [0.2, 0.0, 0.2]}, "std"),
    ],
)
def test_bad_config_raises(data_cfg, tmp_path, change, match) -> None:
    base = _segmenter_cfg(data_cfg, tmp_path / "x").__dict__
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**base, **change})


def test_unknown_config_key_is_named(data_cfg, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"\['stpes'\]"):
        TrainConfig.from_dict({"kind": "ddpm", "data": data_cfg, "out": str(tmp_path), "stpes": 3})


@pytest.mark.slow
def test_job_cli_trains_from_a_yaml_config(data_cfg, tmp_path) -> None:
    """jobs/train.py end to end in a fresh process (its own local Ray instance), local mode, 3 steps."""
    import yaml

    cfg = _segmenter_cfg(data_cfg, tmp_path / "cli", steps=3, log_every=1).__dict__
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "train.py"),
            "--config",
            str(tmp_path / "cfg.yaml"),
            "--steps",
            "2",
        ],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 2 and (tmp_path / "cli" / "model.safetensors").is_file()


# ------------------------------------------------------------------ the shipped demo models (assets/demo/models)
# Claim, in miniature (Laousy et al. 2023): the clean-trained segmenter certifies few pixels on its own and many more
# behind the one-shot DDPM denoiser, with almost no certified-but-wrong pixels.

MODELS = REPO / "assets" / "demo" / "models"
DATA = REPO / "assets" / "demo" / "data"


def _shipped_segmenter(name: str):
    """load_segmenter on a shipped segmenter.json (its weights path is relative to the repository root)."""
    from ray_certseg.models.registry import load_segmenter

    spec = json.loads((MODELS / name / "segmenter.json").read_text())
    return load_segmenter({**spec, "weights": str(REPO / spec["weights"])})


def _certified_metrics(segmenter, denoiser, sigma: float, num_images: int):
    from ray_certseg.certify import certify
    from ray_certseg.data import list_items, load_item
    from ray_certseg.results.metrics import image_stats, pooled_metrics
    from ray_certseg.sampling import count_votes

    cfg = {
        "kind": "manifest",
        "manifest": str(DATA / "val.csv"),
        "num_classes": 7,
        "ignore_index": 255,
        "limit": num_images,
    }
    stats = []
    for ref in list_items(cfg):
        item = load_item(ref, cfg)
        votes = count_votes(
            item["image"],
            segmenter,
            denoiser=denoiser,
            sigma=sigma,
            n0=10,
            n=100,
            num_classes=7,
            batch_size=55,
            seed=0,
            image_id=item["image_id"],
        )
        cert = certify(votes.c_hat, votes.k, n=100, sigma=sigma, tau=0.75, alpha=0.001, correction="holm")
        stats.append(image_stats(item["label"], cert.labels, 7))
    fractions = [s.abstain_fraction for s in stats]  # pooled as the reducer pools (aggregate.Pool)
    return pooled_metrics(np.sum([s.confusion for s in stats], axis=0), float(np.mean(fractions)), len(stats))


@pytest.mark.slow
def test_shipped_models_show_the_denoising_effect() -> None:
    from ray_certseg.models.loading import load_diffusers

    clean = _shipped_segmenter("segmenter_clean")
    denoiser = load_diffusers(str(MODELS / "ddpm"))
    alone = _certified_metrics(clean, None, 0.25, num_images=4)
    denoised = _certified_metrics(clean, denoiser, 0.25, num_images=4)
    assert denoised.accuracy >= alone.accuracy + 0.2, (alone.accuracy, denoised.accuracy)
    assert denoised.miou > alone.miou
    assert denoised.error_rate < 0.05


@pytest.mark.slow
def test_shipped_segmenters_load_and_are_accurate_on_clean_images() -> None:
    import torch

    from ray_certseg.data import iter_dataset

    cfg = {
        "kind": "manifest",
        "manifest": str(DATA / "val.csv"),
        "num_classes": 7,
        "ignore_index": 255,
        "limit": 16,
    }
    items = list(iter_dataset(cfg))
    x = torch.stack([torch.from_numpy(np.array(i["image"])).permute(2, 0, 1).float() / 255 for i in items])
    y = np.stack([i["label"] for i in items])
    for name in ("segmenter_clean", "segmenter_noise"):
        seg = _shipped_segmenter(name)
        with torch.no_grad():
            pred = seg(x).argmax(1).numpy()
        labelled = y != 255
        assert (pred[labelled] == y[labelled]).mean() > 0.9, name
