"""Loading denoisers from their specs: diffusers folders and guided-diffusion (ADM) checkpoints.

``load_diffusers`` reads a diffusers ``UNet2DModel`` and a DDPM-family scheduler config (safetensors weights
only, local files only unless a hub id is given where a hub is reachable); ``load_adm_denoiser`` builds the
guided-diffusion UNet (``models.adm``) from a preset or flags and its checkpoint. Both return a
``DiffusionDenoiser`` (``models.denoisers``) whose default name hashes what determines its output. The
``build_*`` functions are the registry's builders (``models.registry``).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ray_certseg.models.adm import _DIFFUSION_FLAGS, ADM_PRESETS, ADMUNet, check_adm_unet, load_adm_unet
from ray_certseg.models.denoisers import DiffusionDenoiser, IdentityDenoiser
from ray_certseg.models.karras import KARRAS_SCHEDULERS, KarrasDenoiser, sigma_range
from ray_certseg.models.schedule import adm_alphas_cumprod
from ray_certseg.models.specs import DIFFUSERS_FOLDER_HELP, ADMDenoiserSpec
from ray_certseg.models.util import resolve_dtype, short_hash


class DiffusersUNet(nn.Module):
    """``model(x_t, t)`` around a diffusers ``UNet2DModel``: ``unet(x_t, t).sample`` (input in its dtype)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.unet(x_t.to(self.unet.dtype), t).sample


def load_diffusers(
    path: str | os.PathLike | None = None,
    *,
    unet: Any = None,
    scheduler: Any = None,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> DiffusionDenoiser | KarrasDenoiser:
    """Load a diffusers ``UNet2DModel`` and its scheduler config: a DDPM-family scheduler gives the one-shot
    DDPM :class:`DiffusionDenoiser` (t*, ``models.schedule``), a continuous-sigma one
    (``CMStochasticIterativeScheduler``, ``EDMEulerScheduler``) the :class:`KarrasDenoiser` at exactly
    sigma_model = 2 sigma (``models.karras``).

    ``path``: a DDPMPipeline-style folder (``unet/``, ``scheduler/``) or a folder holding both configs
    (``config.json`` + ``scheduler_config.json``), or a hub id where a hub is reachable. ``unet`` /
    ``scheduler``: folders (or loaded objects) given separately; they override ``path``. Weights load
    only from safetensors. kwargs go to the constructor; prediction_type and sample_size default to the
    scheduler's and the UNet's config; name defaults to ``<folder>-<hash of configs and options>``.
    """
    from diffusers import UNet2DModel

    if path is None and unet is None:
        raise ValueError(
            "load_diffusers needs path= (a diffusers folder) or unet= and scheduler=; "
            + DIFFUSERS_FOLDER_HELP
        )
    unet_src = unet if unet is not None else path
    sched_src = scheduler if scheduler is not None else (path if path is not None else unet)
    dtype = resolve_dtype(dtype)
    if isinstance(unet_src, (str, os.PathLike)):
        unet_model = _from_pretrained(
            UNet2DModel,
            unet_src,
            "unet",
            "config.json",
            torch_dtype=dtype,
            use_safetensors=True,
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
        )
    else:
        unet_model = unet_src
    if isinstance(sched_src, (str, os.PathLike)):
        klass = scheduler_class(sched_src)
        sched = _from_pretrained(klass, sched_src, "scheduler", "scheduler_config.json")
    else:
        sched = sched_src
    karras = type(sched).__name__ in KARRAS_SCHEDULERS
    if not karras and not hasattr(sched, "alphas_cumprod"):
        raise TypeError(
            "scheduler must be a DDPM-family scheduler with alphas_cumprod or one of "
            f"{KARRAS_SCHEDULERS} (continuous sigma), got {type(sched).__name__}"
        )
    cfg = dict(getattr(unet_model, "config", {}))
    _check_unet_config(cfg)
    if karras:
        kwargs = _karras_options(kwargs, type(sched).__name__)
    else:
        kwargs.setdefault("prediction_type", sched.config.get("prediction_type", "epsilon"))
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        size = size[0]
    kwargs.setdefault("sample_size", size)
    if not kwargs.get("name"):
        configs = [{k: v for k, v in c.items() if not k.startswith("_")} for c in (cfg, dict(sched.config))]
        options = {k: v for k, v in kwargs.items() if k != "name"}
        kwargs["name"] = f"{_folder_name(unet_src)}-{short_hash([configs, options])}"
    if any(p.dtype != dtype for p in unet_model.parameters()):  # loaded folders already are (torch_dtype)
        unet_model = unet_model.to(dtype=dtype)
    unet_model = unet_model.to(device=torch.device(device)).eval().requires_grad_(False)
    if karras:
        return KarrasDenoiser(DiffusersUNet(unet_model), sched, **kwargs)
    return DiffusionDenoiser(DiffusersUNet(unet_model), sched.alphas_cumprod, **kwargs)


#: options of the DDPM denoiser that a continuous-sigma one has no use for, with their defaults
DDPM_ONLY = {"multistep": 0, "multistep_seed": 0, "variance": "auto", "prediction_type": None}


def _karras_options(kwargs: Mapping[str, Any], scheduler: str) -> dict[str, Any]:
    """The options a :class:`KarrasDenoiser` takes; a DDPM-only option set to anything but its default is
    refused (a one-shot continuous-sigma denoiser has no reverse chain and takes its preconditioning from
    the scheduler)."""
    changed = sorted(k for k, default in DDPM_ONLY.items() if kwargs.get(k, default) != default)
    if changed:
        raise ValueError(
            f"{', '.join(changed)} apply to DDPM schedulers; this folder's {scheduler} denoises in one shot at "
            "the exact sigma (remove them)"
        )
    return {k: v for k, v in kwargs.items() if k not in DDPM_ONLY}


def scheduler_class(source: str | os.PathLike) -> Any:
    """The diffusers scheduler class that a folder's ``scheduler_config.json`` names when it is one of
    :data:`KARRAS_SCHEDULERS`; else ``DDPMScheduler``, which reads every DDPM-family config (DDIM, PNDM...:
    the same betas). A hub id gets ``DDPMScheduler``."""
    import diffusers

    try:
        folder = _local_folder(diffusers.DDPMScheduler, source, "scheduler", "scheduler_config.json")
    except (ValueError, FileNotFoundError):
        return diffusers.DDPMScheduler
    if folder is None:
        return diffusers.DDPMScheduler
    name = json.loads((folder / "scheduler_config.json").read_text()).get("_class_name", "")
    return getattr(diffusers, name) if name in KARRAS_SCHEDULERS else diffusers.DDPMScheduler


def noise_range(spec: Mapping[str, Any]) -> tuple[float, float] | None:
    """The smoothing sigmas a local continuous-sigma diffusers folder denoises (:func:`karras.sigma_range`),
    read from its scheduler config without loading the model; None for a DDPM scheduler or a hub id."""
    source = spec.get("scheduler") or spec.get("path") or spec.get("unet")
    if source is None:
        return None
    klass = scheduler_class(source)
    if klass.__name__ not in KARRAS_SCHEDULERS:
        return None
    folder = _local_folder(klass, source, "scheduler", "scheduler_config.json")
    return sigma_range(klass.from_config(klass.load_config(str(folder))).config)


def _folder_name(source: Any) -> str:
    """Name of a model folder for output records: the folder (its parent for a pipeline's ``unet/``)."""
    if not isinstance(source, (str, os.PathLike)):
        return "diffusers"
    path = Path(source).expanduser().resolve() if Path(source).expanduser().exists() else Path(source)
    return path.parent.name if path.name == "unet" and path.parent.name else path.name


def _from_pretrained(
    klass: Any, source: str | os.PathLike, subfolder: str, config_name: str, **kwargs: Any
) -> Any:
    """``klass.from_pretrained`` from a local folder (``<source>/<subfolder>/`` or ``<source>/``, local
    files only) or, for a string that is not a local path, a hub id."""
    folder = _local_folder(klass, source, subfolder, config_name)
    if folder is not None:
        return klass.from_pretrained(str(folder), local_files_only=True, **kwargs)
    text = str(source)
    try:
        return klass.from_pretrained(text, subfolder=subfolder, **kwargs)
    except OSError:
        try:
            return klass.from_pretrained(text, **kwargs)
        except OSError as exc:
            raise FileNotFoundError(
                f"{text!r} is neither a local folder nor a reachable hub model "
                f"({exc}); " + DIFFUSERS_FOLDER_HELP
            ) from exc


def _local_folder(klass: Any, source: str | os.PathLike, subfolder: str, config_name: str) -> Path | None:
    """The local folder holding ``klass``'s ``config_name`` (``<source>/<subfolder>/`` or ``<source>/``);
    None for a hub id (``org/model``, not a local path). Anything else raises, with the folder layout."""
    local = Path(source).expanduser()
    if local.is_dir():
        for folder in (local / subfolder, local):
            if (folder / config_name).is_file():
                if config_name == "config.json":
                    class_name = json.loads((folder / config_name).read_text()).get(
                        "_class_name", klass.__name__
                    )
                    if class_name != klass.__name__:
                        raise ValueError(
                            f"{folder} holds a {class_name}, not a {klass.__name__}; " + DIFFUSERS_FOLDER_HELP
                        )
                return folder
        raise ValueError(
            f"{local} is not a diffusers model folder: no {subfolder}/{config_name} or {config_name}; "
            + DIFFUSERS_FOLDER_HELP
        )
    text = str(source)
    if local.exists():
        raise ValueError(f"{local} is a file, not a folder; " + DIFFUSERS_FOLDER_HELP)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"denoiser folder {text!r} does not exist; " + DIFFUSERS_FOLDER_HELP)
    return None


def check_diffusers(spec: Mapping[str, Any]) -> None:
    """What :func:`load_diffusers` would refuse, found without reading a tensor (driver side): the folders'
    layout and configs, the scheduler, and the UNet built from its config on the meta device against the
    names and shapes in its safetensors header(s). Hub ids are left to the loader."""
    from diffusers import DDPMScheduler, UNet2DModel
    from safetensors import safe_open

    path = spec.get("path")
    if path is None and spec.get("unet") is None:
        raise ValueError(
            "a diffusers denoiser spec needs path (a diffusers folder) or unet and scheduler; "
            + DIFFUSERS_FOLDER_HELP
        )
    unet_src = spec.get("unet") or path
    sched_src = spec.get("scheduler") or path or unet_src
    sched_dir = _local_folder(DDPMScheduler, sched_src, "scheduler", "scheduler_config.json")
    if sched_dir is not None:
        klass = scheduler_class(sched_src)
        klass.from_config(klass.load_config(str(sched_dir)))
        if klass.__name__ in KARRAS_SCHEDULERS:
            _karras_options(spec, klass.__name__)
    unet_dir = _local_folder(UNet2DModel, unet_src, "unet", "config.json")
    if unet_dir is None:
        return
    config = UNet2DModel.load_config(str(unet_dir))
    _check_unet_config(config)
    with torch.device("meta"):
        unet = UNet2DModel.from_config(config)
    single = unet_dir / "diffusion_pytorch_model.safetensors"
    index = unet_dir / "diffusion_pytorch_model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({unet_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        raise FileNotFoundError(
            f"{unet_dir} has no diffusion_pytorch_model.safetensors (weights load only from "
            "safetensors); " + DIFFUSERS_FOLDER_HELP
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118 - no mapping
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    wrong = sorted(k for k in expected if k in shapes and shapes[k] != expected[k])
    if missing or wrong:
        raise ValueError(
            f"{unet_dir}'s weights do not fit its config.json: {len(missing)} missing tensors "
            f"{missing[:3]}, {len(wrong)} mis-shaped {[f'{k}: {shapes[k]} vs {expected[k]}' for k in wrong[:3]]}; "
            "the weights and config.json must come from the same model"
        )


def _check_unet_config(cfg: Mapping[str, Any]) -> None:
    """A UNet config the denoiser can use: 3-channel images, a square sample size."""
    if cfg.get("in_channels", 3) != 3:
        raise ValueError(
            f"the denoiser UNet must take 3-channel images, its config has in_channels={cfg['in_channels']}"
        )
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)) and len(set(size)) != 1:
        raise ValueError(f"non-square UNet sample_size {size} is not supported; pass sample_size=")


_ADM_SPEC_KEYS = frozenset(ADMDenoiserSpec.model_fields)


def _read_flags(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Preset flags, updated by those of ``flags_file`` (JSON), then by ``flags``."""
    if not any(key in spec for key in ("preset", "flags", "flags_file")):
        raise ValueError(
            "an ADM denoiser spec needs 'preset' (e.g. '256x256_uncond'), 'flags' or 'flags_file' to know "
            "the architecture of its checkpoint"
        )
    flags: dict[str, Any] = {}
    if "preset" in spec:
        if spec["preset"] not in ADM_PRESETS:
            raise ValueError(f"unknown ADM preset {spec['preset']!r}; known: {sorted(ADM_PRESETS)}")
        flags.update(ADM_PRESETS[spec["preset"]])
    if "flags_file" in spec:
        path = Path(spec["flags_file"])
        if not path.is_file():
            raise FileNotFoundError(f"ADM flags_file {path} not found")
        try:
            flags.update(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(
                f"ADM flags_file {path} must be a JSON object of guided-diffusion flags: {err}"
            ) from err
    if "flags" in spec:
        if not isinstance(spec["flags"], Mapping):
            raise TypeError(
                f"ADM 'flags' must be a mapping of guided-diffusion flags; got {type(spec['flags']).__name__}"
            )
        flags.update(spec["flags"])
    return flags


def _split_flags(flags: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model flags, diffusion flags); unknown names raise."""
    model_names = set(inspect.signature(ADMUNet).parameters)
    unknown = sorted(set(flags) - model_names - _DIFFUSION_FLAGS)
    if unknown:
        raise ValueError(
            f"unknown ADM flags {unknown}; model flags are {sorted(model_names)}, diffusion flags "
            f"{sorted(_DIFFUSION_FLAGS)}"
        )
    return (
        {k: v for k, v in flags.items() if k in model_names},
        {k: v for k, v in flags.items() if k in _DIFFUSION_FLAGS},
    )


def _adm_flags(spec: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (model, diffusion) flags of an ADM spec, with what the denoiser cannot use refused."""
    if not isinstance(spec, Mapping):
        raise TypeError(f"an ADM denoiser spec must be a mapping; got {type(spec).__name__}")
    unknown = sorted(set(spec) - _ADM_SPEC_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in ADM denoiser spec; allowed: {sorted(_ADM_SPEC_KEYS)}")
    if spec.get("kind", "adm") != "adm":
        raise ValueError(f"load_adm_denoiser needs kind: adm; got kind: {spec['kind']!r}")
    if "checkpoint" not in spec:
        raise ValueError("ADM denoiser spec needs 'checkpoint': the path of the guided-diffusion .pt file")
    model_flags, diffusion_flags = _split_flags(_read_flags(spec))
    if model_flags.get("class_cond"):
        raise ValueError(
            "class_cond ADM checkpoints need class labels and cannot denoise as model(x_t, t); use an "
            "unconditional checkpoint such as 256x256_diffusion_uncond.pt"
        )
    if diffusion_flags.get("rescale_timesteps"):
        raise ValueError("rescale_timesteps=True (improved-diffusion style float timesteps) is not supported")
    return model_flags, diffusion_flags


def check_adm(spec: Mapping[str, Any]) -> None:
    """What :func:`load_adm_denoiser` would refuse, found without reading a tensor (driver side): the spec's
    flags, and the checkpoint's names and shapes against the network built on the meta device."""
    model_flags, _ = _adm_flags(spec)
    check_adm_unet(spec["checkpoint"], model_flags)


def load_adm_denoiser(
    spec: Mapping[str, Any], *, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
) -> DiffusionDenoiser:
    """A :class:`~ray_certseg.models.denoisers.DiffusionDenoiser` around a guided-diffusion checkpoint.

    spec: ``{"kind": "adm", "checkpoint": PATH, "preset": "256x256_uncond" | "flags": {...} |
    "flags_file": JSON, "noise_schedule": "linear", "diffusion_steps": 1000, "resolution": "native" | "tile" |
    "resize", "tile_overlap": 16, "multistep": 0, "multistep_seed": 0, "variance": "auto", "name": ""}``.
    ``flags`` and ``flags_file`` update the preset; a flags file may also carry guided-diffusion's
    diffusion flags (``diffusion_steps``, ``noise_schedule``, ``predict_xstart``; top-level keys win). The denoiser tiles at
    ``image_size`` and pads to ``2 ** (len(channel_mult) - 1)``.

    Precision: float32 on CPU whatever ``dtype``. On CUDA the input, middle and output blocks run in half
    precision as guided-diffusion does (:meth:`ADMUNet.convert_blocks_to`; not autocast): in ``dtype`` when it
    is float16 or bfloat16, else in float16 when the flags say ``use_fp16`` (``flags: {use_fp16: false}`` for
    full float32).
    """
    model_flags, diffusion_flags = _adm_flags(spec)
    schedule = spec.get("noise_schedule", diffusion_flags.get("noise_schedule", "linear"))
    steps = spec.get("diffusion_steps", diffusion_flags.get("diffusion_steps", 1000))
    alphas_cumprod = adm_alphas_cumprod(schedule, steps)

    model = load_adm_unet(spec["checkpoint"], model_flags)
    device = torch.device(device)
    if device.type == "cuda":
        dtype = resolve_dtype(dtype) or torch.float32
        half = (
            dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16 if model.use_fp16 else None
        )
        if half is not None:
            model.convert_blocks_to(half)
    model.to(device)

    options = {k: spec[k] for k in ("resolution", "tile_overlap", "multistep", "multistep_seed") if k in spec}
    if spec.get("multistep"):  # only a reverse chain uses the variance; one-shot names stay as they were
        options["variance"] = spec.get("variance", "auto")
    digest = short_hash([model_flags, schedule, steps, options])
    return DiffusionDenoiser(
        model,
        alphas_cumprod,
        prediction_type="sample" if diffusion_flags.get("predict_xstart") else "epsilon",
        resolution=spec.get("resolution", "native"),
        sample_size=model.image_size,
        tile_overlap=spec.get("tile_overlap", 16),
        multiple_of=model.multiple_of,
        multistep=spec.get("multistep", 0),
        multistep_seed=spec.get("multistep_seed", 0),
        variance=spec.get("variance", "auto"),
        name=spec.get("name") or f"adm-{Path(spec['checkpoint']).stem}-{digest}",
    )


# ------------------------------------------------------------------------------------------- registry builders
def build_identity(spec: Mapping[str, Any], *, device: Any = "cpu", dtype: Any = None) -> IdentityDenoiser:
    """``{"kind": "identity"}``: no denoising."""
    return IdentityDenoiser()


def build_diffusers(
    spec: Mapping[str, Any], *, device: Any = "cpu", dtype: Any = torch.float32
) -> DiffusionDenoiser | KarrasDenoiser:
    """``{"kind": "diffusers", "path": DIR, ...}`` (or ``unet:``/``scheduler:`` folders): :func:`load_diffusers`
    with the spec's other keys as the denoiser's options."""
    options = {k: v for k, v in spec.items() if k not in ("kind", "path", "unet", "scheduler")}
    return load_diffusers(
        spec.get("path"),
        unet=spec.get("unet"),
        scheduler=spec.get("scheduler"),
        dtype=dtype,
        device=device,
        **options,
    )


def build_adm(
    spec: Mapping[str, Any], *, device: Any = "cpu", dtype: Any = torch.float32
) -> DiffusionDenoiser:
    """``{"kind": "adm", "checkpoint": PATH, "preset": ...}``: :func:`load_adm_denoiser`."""
    return load_adm_denoiser(spec, device=device, dtype=dtype)
