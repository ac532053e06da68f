"""A tiny, real world for job tests: a manifest dataset of PNGs, a tiny segmenter (safetensors) and a tiny
diffusers DDPM saved as a DDPMPipeline folder, plus a config that uses them. Nothing is mocked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

NUM_CLASSES = 3
SIZE = 16


def write_dataset(root: Path, count: int, *, seed: int = 0, corrupt: tuple[int, ...] = ()) -> Path:
    """``count`` 16x16 images: class = which third of the image (by colour), plus an ignore-label border."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["image_path,label_path,image_id"]
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=np.float64)
    for i in range(count):
        label = np.zeros((SIZE, SIZE), np.uint8)
        cut = sorted(rng.integers(3, SIZE - 3, size=2))
        label[:, cut[0] :] = 1
        label[:, cut[1] :] = 2
        image = colours[label] + rng.normal(0, 10, (SIZE, SIZE, 3))
        label[0, :] = 255
        ip, lp = root / f"img{i:03d}.png", root / f"lab{i:03d}.png"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(ip)
        Image.fromarray(label).save(lp)
        if i in corrupt:
            ip.write_bytes(ip.read_bytes()[:40])  # truncated PNG
        rows.append(f"{ip.name},{lp.name},img{i:03d}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def write_models(root: Path) -> dict[str, Path]:
    """A random tiny segmenter and a random tiny DDPM, saved the way users' checkpoints are."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from safetensors.torch import save_file

    from ray_certseg.models.tiny import tiny_segnet

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    seg = tiny_segnet(NUM_CLASSES, width=8)
    save_file(seg.state_dict(), str(root / "seg.safetensors"))
    unet = UNet2DModel(
        sample_size=SIZE,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(root / "ddpm")
    return {"seg": root / "seg.safetensors", "ddpm": root / "ddpm"}


def config(manifest: Path, models: dict[str, Path], output: Path, **sampling: Any) -> dict[str, Any]:
    return {
        "name": "jobtest",
        "output": str(output),
        "dataset": {"kind": "manifest", "manifest": str(manifest), "name": "toy", "num_classes": NUM_CLASSES},
        "models": {
            "segmenters": {
                "seg": {
                    "kind": "module",
                    "factory": "ray_certseg.models.tiny:tiny_segnet",
                    "kwargs": {"num_classes": NUM_CLASSES, "width": 8},
                    "weights": str(models["seg"]),
                    "num_classes": NUM_CLASSES,
                }
            },
            "denoisers": {"ddpm": {"kind": "diffusers", "path": str(models["ddpm"])}},
        },
        "methods": {"plain": {"segmenter": "seg"}, "diffusion": {"segmenter": "seg", "denoiser": "ddpm"}},
        "sampling": {
            "sigmas": [0.25, 0.5],
            "n0": 3,
            "n": 12,
            "batch_size": 8,
            "seed": 7,
            "device": "cpu",
            **sampling,
        },
        "certify": {"taus": [0.6], "alphas": [0.1], "corrections": ["holm", "bonferroni"]},
        "ray": {"actors": 1, "num_cpus_per_actor": 0.5, "batch_size": 2},
    }


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path
