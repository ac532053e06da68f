"""Ray Train loops for the demo models (and for users' own domain segmenters / denoisers).

Four recipes share one data path (any dataset config ``ray_certseg.data`` reads) and one driver (``fit``):

* ``segmenter`` with ``noise_sigmas = []``: the off-the-shelf segmenter f, trained on clean images with
  per-pixel cross-entropy (ignore_index dropped);
* ``segmenter`` with ``noise_sigmas = [s_1, ...]``: Gaussian noise augmentation (SegCertify's base model):
  each training image gets x + sigma * eps, eps ~ N(0, I) in [0,1] pixel space, sigma drawn uniformly from the list;
* ``ddpm``: a diffusers ``UNet2DModel`` with the DDPM epsilon objective on x0 = 2x - 1 in [-1,1]:
  t ~ U{0..max_timestep-1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, loss = ||eps_theta(x_t, t) - eps||^2,
  1000-step linear beta schedule. ``max_timestep < 1000`` trains only the low-noise end that one-shot denoising uses
  (t*(sigma) = min{t : (1 - abar_t)/abar_t >= (2 sigma)^2}, 0-based: 145 at sigma 0.25, 259 at 0.5, 396 at 1.0);
* ``edm``: the same ``UNet2DModel`` as F of an EDM-preconditioned denoiser (Karras et al. 2022) on x0 = 2x - 1:
  s log-uniform on [sigma_min, sigma_max] (the model's units: twice the smoothing sigma), y = x0 + s n,
  D(y; s) = c_skip(s) y + c_out(s) F(c_in(s) y, c_noise(s)) with ``EDMEulerScheduler``'s preconditioning
  (sigma_data 0.5), loss = lambda(s) ||D(y; s) - x0||^2 with EDM's lambda = 1 / c_out(s)^2. It loads as the
  one-shot continuous-sigma denoiser (``models.karras``), which evaluates D at exactly s = 2 sigma.

Each worker reads its shard ``list_items(data)[rank::world_size]``; rank 0 writes the artefacts into a fresh
directory and reports it as the Ray Train checkpoint; ``fit`` copies that checkpoint to ``out``.
Artefacts: segmenter -> ``model.safetensors`` + ``segmenter.json`` (a ``load_segmenter`` module spec: factory,
kwargs, weights = ``out/model.safetensors``, num_classes, mean, std); ddpm -> the
``DDPMPipeline(unet, scheduler).save_pretrained`` layout; edm -> ``unet/`` + ``scheduler/`` (an
``EDMEulerScheduler`` config holding the trained sigma range); all -> ``train_log.json`` (config and loss curve).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

KINDS = ("segmenter", "ddpm", "edm")
DEFAULT_FACTORIES = {
    "segmenter": "ray_certseg.models.tiny:tiny_segnet",
    "ddpm": "ray_certseg.models.tiny:tiny_ddpm_unet",
    "edm": "ray_certseg.models.tiny:tiny_ddpm_unet",
}
LOG_NAME = "train_log.json"
SEGMENTER_SPEC_NAME = "segmenter.json"
SEGMENTER_WEIGHTS_NAME = "model.safetensors"


@dataclass
class TrainConfig:
    """One training run. ``data`` is a dataset config as ``ray_certseg.data`` reads it (needs ``num_classes``)."""

    kind: str
    data: dict[str, Any]
    out: str
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    seed: int = 0
    crop: int = 64
    hflip: bool = True
    log_every: int = 25
    num_workers: int = 0
    use_gpu: bool = False
    storage_path: str = "outputs/ray_train"
    name: str | None = None
    factory: str | None = None  # 'module:function'; default tiny_segnet / tiny_ddpm_unet by kind
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # segmenter
    noise_sigmas: list[float] = field(default_factory=list)
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    # ddpm
    max_timestep: int = 1000
    # edm: the noise levels trained, in the model's [-1, 1] units (twice the smoothing sigma)
    sigma_min: float = 0.1
    sigma_max: float = 2.5

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.data, dict):
            raise TypeError(
                f"data must be a dataset config dict (kind: manifest, manifest: ...), got {type(self.data)}"
            )
        from ray_certseg.data import as_dataset_config

        as_dataset_config(
            self.data
        )  # ConfigError (a ValueError) naming the bad key, before any worker starts
        if self.factory is None:
            self.factory = DEFAULT_FACTORIES[self.kind]
        if not isinstance(self.factory, str) or self.factory.count(":") != 1:
            raise ValueError(f"factory must look like 'package.module:function', got {self.factory!r}")
        for name in ("steps", "batch_size", "crop", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 = Ray Train local mode), got {self.num_workers}")
        if any(s < 0 for s in self.noise_sigmas):
            raise ValueError(f"noise_sigmas must be >= 0, got {self.noise_sigmas}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if not 1 <= self.max_timestep <= 1000:
            raise ValueError(f"max_timestep must be in [1, 1000], got {self.max_timestep}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(
                f"mean and std need 3 entries with std > 0, got mean={self.mean}, std={self.std}"
            )

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> TrainConfig:
        """Build from a plain dict (e.g. parsed YAML); unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known keys: {sorted(known)}")
        return cls(**cfg)


# ----------------------------------------------------------------------------------------------- data


def _load_factory(path: str):
    """Resolve ``'package.module:function'``."""
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"factory must look like 'package.module:function', got {path!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import model factory {path!r}: {exc}") from exc


class CropDataset(torch.utils.data.Dataset):
    """Items of a dataset config as (image (3, crop, crop) float in [0,1], label (crop, crop) int64) pairs.

    Random crop (images smaller than ``crop`` are padded: image by edge replication, label with ignore_index)
    and an optional horizontal flip, both from the per-item generator seeded with (seed, epoch, index).
    """

    def __init__(self, refs: list[Any], data: dict[str, Any], crop: int, hflip: bool, seed: int) -> None:
        self.refs, self.data, self.crop, self.hflip, self.seed = refs, data, crop, hflip, seed
        self.ignore_index = int(data.get("ignore_index", 255))
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from ray_certseg.data import load_item

        item = load_item(self.refs[i], self.data)
        image, label = np.asarray(item["image"]), item.get("label")
        label = np.full(image.shape[:2], self.ignore_index) if label is None else np.asarray(label)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        h, w = image.shape[:2]
        ph, pw = max(self.crop - h, 0), max(self.crop - w, 0)
        if ph or pw:
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="edge")
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=self.ignore_index)
        top = int(rng.integers(0, image.shape[0] - self.crop + 1))
        left = int(rng.integers(0, image.shape[1] - self.crop + 1))
        image = image[top : top + self.crop, left : left + self.crop]
        label = label[top : top + self.crop, left : left + self.crop]
        if self.hflip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
        return x, torch.from_numpy(np.array(label, dtype=np.int64))


def _batches(dataset: CropDataset, batch_size: int, seed: int, steps: int):
    """Yield ``steps`` batches, reshuffling (seeded by (seed, epoch)) at every pass over the shard."""
    if len(dataset) < batch_size:
        raise ValueError(f"the shard has {len(dataset)} items, fewer than batch_size={batch_size}")
    step, epoch = 0, 0
    while True:
        dataset.epoch = epoch
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=gen
        )
        for batch in loader:
            yield batch
            step += 1
            if step == steps:
                return
        epoch += 1


# ----------------------------------------------------------------------------------------------- loops


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up for ``warmup_steps`` then cosine decay to 0: lr * min(1, s/w) * (1 + cos(pi s / S)) / 2."""
    return (
        cfg.lr
        * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        * 0.5
        * (1.0 + math.cos(math.pi * step / cfg.steps))
    )


def _run(cfg: TrainConfig, model: torch.nn.Module, loss_fn, save_fn) -> None:
    """Shared worker loop: shard, seeded batches, AdamW + schedule, periodic ``ray.train.report``, final checkpoint.

    ``loss_fn(model, x, y, gen) -> scalar``; ``save_fn(unwrapped_model, directory)`` writes the artefacts (rank 0).
    """
    import ray.train
    import ray.train.torch

    from ray_certseg.data import list_items

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    stream = cfg.seed * 7919 + rank  # the worker's random stream: crops, flips, shuffling, noise, timesteps
    device = ray.train.torch.get_device()
    net = ray.train.torch.prepare_model(model)
    refs = list(list_items(cfg.data))[rank::world]
    dataset = CropDataset(refs, cfg.data, cfg.crop, cfg.hflip, seed=stream)
    gen = torch.Generator(device=device).manual_seed(stream)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    log: list[dict[str, float]] = []
    running = 0.0
    net.train()
    for step, (x, y) in enumerate(_batches(dataset, cfg.batch_size, stream, cfg.steps)):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = loss_fn(net, x.to(device), y.to(device), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += float(loss.detach())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            n = (step % cfg.log_every) + 1
            log.append({"step": step + 1, "loss": running / n, "lr": _lr_at(step, cfg)})
            running = 0.0
            if step + 1 < cfg.steps:
                ray.train.report(log[-1])
    checkpoint = None
    if rank == 0:
        # a directory that outlives the loop: in local mode result.checkpoint points at it (not a copy)
        out = Path(tempfile.mkdtemp(prefix=f"certseg-{cfg.kind}-"))
        out.chmod(0o755)  # mkdtemp makes it owner-only; fit() copies it to cfg.out
        save_fn(getattr(net, "module", net).cpu(), out)
        (out / LOG_NAME).write_text(
            json.dumps({"config": dataclasses.asdict(cfg), "log": log}, indent=1) + "\n"
        )
        checkpoint = ray.train.Checkpoint.from_directory(str(out))
    ray.train.report(log[-1], checkpoint=checkpoint)


def segmenter_loss(
    net, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, cfg: TrainConfig
) -> torch.Tensor:
    """Cross-entropy of f((x + sigma eps - mean) / std) against y (ignore_index dropped); sigma ~ U(noise_sigmas)."""
    if cfg.noise_sigmas:
        sigmas = torch.tensor(cfg.noise_sigmas, device=x.device, dtype=x.dtype)
        pick = torch.randint(len(cfg.noise_sigmas), (x.shape[0],), generator=gen, device=x.device)
        x = x + sigmas[pick].view(-1, 1, 1, 1) * torch.randn(
            x.shape, generator=gen, device=x.device, dtype=x.dtype
        )
    mean = torch.tensor(cfg.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    logits = net((x - mean) / std)
    return F.cross_entropy(logits, y, ignore_index=int(cfg.data.get("ignore_index", 255)))


def ddpm_loss(
    net, x: torch.Tensor, alphas_cumprod: torch.Tensor, gen: torch.Generator, max_timestep: int
) -> torch.Tensor:
    """DDPM epsilon loss: mean ||eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) - eps||^2, x0 = 2x - 1."""
    x0 = 2.0 * x - 1.0
    t = torch.randint(max_timestep, (x0.shape[0],), generator=gen, device=x0.device)
    eps = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    abar = alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps
    return F.mse_loss(net(x_t, t).sample, eps)


def ddpm_scheduler():
    """The 1000-step linear DDPM schedule (beta 1e-4 .. 0.02), epsilon prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
    )


def segmenter_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop for ``kind == 'segmenter'``."""
    from safetensors.torch import save_file

    cfg = TrainConfig.from_dict(config)
    kwargs = {"num_classes": int(cfg.data["num_classes"]), **cfg.model_kwargs}
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = _load_factory(cfg.factory)(**kwargs)

    def save(net: torch.nn.Module, out: Path) -> None:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / SEGMENTER_WEIGHTS_NAME))
        # a load_segmenter spec; weights as they will lie after fit() copies the checkpoint to cfg.out
        spec = {
            "kind": "module",
            "factory": cfg.factory,
            "kwargs": kwargs,
            "weights": str(Path(cfg.out) / SEGMENTER_WEIGHTS_NAME),
            "num_classes": kwargs["num_classes"],
            "mean": cfg.mean,
            "std": cfg.std,
        }
        (out / SEGMENTER_SPEC_NAME).write_text(json.dumps(spec, indent=2) + "\n")

    _run(cfg, model, lambda net, x, y, gen: segmenter_loss(net, x, y, gen, cfg), save)


def ddpm_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop for ``kind == 'ddpm'``: the UNet factory gets ``sample_size = crop`` unless given."""
    from diffusers import DDPMPipeline

    cfg = TrainConfig.from_dict(config)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    unet = _load_factory(cfg.factory)(**{"sample_size": cfg.crop, **cfg.model_kwargs})
    scheduler = ddpm_scheduler()

    def save(net: torch.nn.Module, out: Path) -> None:
        DDPMPipeline(unet=net, scheduler=scheduler).save_pretrained(str(out))

    _run(
        cfg,
        unet,
        lambda net, x, y, gen: ddpm_loss(net, x, scheduler.alphas_cumprod, gen, cfg.max_timestep),
        save,
    )


def edm_scheduler(cfg: TrainConfig):
    """The EDM preconditioning of the trained range (sigma_data 0.5, epsilon-type c_out)."""
    from diffusers import EDMEulerScheduler

    return EDMEulerScheduler(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, sigma_data=0.5)


def edm_loss(net, x: torch.Tensor, scheduler: Any, gen: torch.Generator, cfg: TrainConfig) -> torch.Tensor:
    """EDM's weighted denoising loss, mean of ||D(y; s) - x0||^2 / c_out(s)^2, s log-uniform on the range."""
    x0 = 2.0 * x - 1.0
    u = torch.rand((x0.shape[0], 1, 1, 1), generator=gen, device=x0.device, dtype=x0.dtype)
    s = cfg.sigma_min * (cfg.sigma_max / cfg.sigma_min) ** u
    y = x0 + s * torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    out = net(scheduler.precondition_inputs(y, s), scheduler.precondition_noise(s.flatten())).sample
    sd = scheduler.config.sigma_data
    c_out = s * sd / (s**2 + sd**2).sqrt()
    return (((scheduler.precondition_outputs(y, out, s) - x0) / c_out) ** 2).mean()


def edm_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop for ``kind == 'edm'``: the UNet factory gets ``sample_size = crop`` unless given."""
    cfg = TrainConfig.from_dict(config)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    unet = _load_factory(cfg.factory)(**{"sample_size": cfg.crop, **cfg.model_kwargs})
    scheduler = edm_scheduler(cfg)

    def save(net: torch.nn.Module, out: Path) -> None:
        net.save_pretrained(str(out / "unet"))
        scheduler.save_pretrained(str(out / "scheduler"))

    _run(cfg, unet, lambda net, x, y, gen: edm_loss(net, x, scheduler, gen, cfg), save)


# ----------------------------------------------------------------------------------------------- driver


def fit(cfg: TrainConfig) -> dict[str, Any]:
    """Run the recipe with ``TorchTrainer(ScalingConfig(num_workers, use_gpu))``; copy the checkpoint to ``cfg.out``.

    Returns the final metrics (step, loss, lr) plus ``out``. ``num_workers = 0`` is Ray Train's local mode
    (in-process, no actors); Ray must already be initialised (``jobs/train.py`` does it).
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    loop = {"segmenter": segmenter_loop, "ddpm": ddpm_loop, "edm": edm_loop}[cfg.kind]
    trainer = TorchTrainer(
        loop,
        train_loop_config=dataclasses.asdict(cfg),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(
            name=cfg.name or f"train-{cfg.kind}",
            storage_path=str(Path(cfg.storage_path).resolve())
            if "://" not in cfg.storage_path
            else cfg.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    out = Path(cfg.out)
    if out.exists():
        shutil.rmtree(out)
    with result.checkpoint.as_directory() as directory:
        shutil.copytree(directory, out, copy_function=shutil.copyfile)
    return {**result.metrics, "out": str(out)}
