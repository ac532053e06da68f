"""Segmenters: one interface, (B, 3, H, W) images in [0, 1] -> logits (B, C, H, W) at the input size.

``Segmenter`` wraps any network: it applies the per-channel normalisation (x - mean) / std inside, and
upsamples logits bilinearly (align_corners=False) when the network returns another size.

``input_scale`` s (or ``input_size`` (h, w)) is SegCertify's ``scale``: the noisy image is resized
bilinearly (no antialiasing, as cv2.INTER_LINEAR) to (round(H s), round(W s)) inside f, and the logits come
back to H x W.
The resize is part of the base classifier, so the noise, the certificate (R in full-resolution [0,1] pixel
units) and the scores all stay at the image's resolution. ``dataset.certify_at_scale`` is the other thing: it
resizes before the noise and certifies the small image.

Kinds (``models.registry`` builds them from a spec; all accept ``name``, ``mean``, ``std``, ``input_scale``
or ``input_size``; checkpoints also ``state_dict_key``, ``strip_prefix``):

* ``{"kind": "module", "factory": "pkg.mod:fn", "kwargs": {...}, "weights": "w.safetensors", "num_classes": C}``
* ``{"kind": "torchscript", "path": "m.pt", "num_classes": C}``
* ``{"kind": "torchvision", "arch": "deeplabv3_mobilenet_v3_large", "num_classes": C, "weights": "w.pth"}``
  (ImageNet mean/std by default; the output dict's "out")
* ``{"kind": "transformers", "path": DIR}`` (alias ``segformer``): any transformers semantic or universal
  segmentation folder (``models.hf_segmenters``; mean/std from preprocessor_config.json, else ImageNet)

Checkpoints load only as safetensors or with ``torch.load(weights_only=True)``: pickles are never executed.
"""

from __future__ import annotations

import importlib
import pickle
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ray_certseg.models.util import resolve_dtype, short_hash

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Segmenter(nn.Module):
    """logits = upsample(net((x - mean) / std)) for x (B, 3, H, W) in [0, 1]; logits (B, num_classes, H, W).

    net: a module or callable returning a logits tensor (B, num_classes, h, w); mean/std: 3 floats each, or
    None for none (the net gets [0, 1] images). input_scale / input_size: resize the input inside f (module
    doc); at most one. ``name`` identifies the model in outputs.
    """

    def __init__(
        self,
        net: nn.Module | Callable[[Tensor], Tensor],
        *,
        num_classes: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        name: str = "",
        input_scale: float | None = None,
        input_size: Sequence[int] | None = None,
    ):
        super().__init__()
        if not callable(net):
            raise TypeError(f"net must be a module or callable returning logits, got {type(net).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std (3 floats each) or neither")
        if input_scale is not None and input_size is not None:
            raise ValueError("give input_scale or input_size, not both")
        if input_scale is not None and not (isinstance(input_scale, (int, float)) and 0 < input_scale):
            raise ValueError(f"input_scale must be a number > 0, got {input_scale!r}")
        if input_size is not None and not (
            len(input_size) == 2 and all(isinstance(v, int) and v >= 1 for v in input_size)
        ):
            raise ValueError(f"input_size must be [height, width] of ints >= 1, got {input_size!r}")
        self.input_scale = None if input_scale in (None, 1, 1.0) else float(input_scale)
        self.input_size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
        self.net, self.num_classes, self.name = net, num_classes, name or "segmenter"
        self.normalize = mean is not None
        if mean is not None:
            for key, v in (("mean", mean), ("std", std)):
                if len(v) != 3:
                    raise ValueError(f"{key} must have 3 values (RGB), got {list(v)}")
            if min(std) <= 0:
                raise ValueError(f"std values must be > 0, got {list(std)}")
            self.register_buffer(
                "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
            )
            self.register_buffer(
                "std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
            )

    def network_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the network sees for an H x W image: ``input_size``, (round(H s), round(W s)) for
        ``input_scale`` s (at least 1 x 1), else (H, W)."""
        if self.input_size is not None:
            return self.input_size
        if self.input_scale is not None:
            return max(1, round(height * self.input_scale)), max(1, round(width * self.input_scale))
        return height, width

    def forward(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"segmenter input must be (B, 3, H, W) images in [0, 1], got {got}")
        x = (images - self.mean) / self.std if self.normalize else images
        size = self.network_size(*images.shape[-2:])
        if size != tuple(images.shape[-2:]):  # per-channel affine and bilinear weights commute: order is free
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        param = next(self.net.parameters(), None) if isinstance(self.net, nn.Module) else None
        if param is not None and param.is_floating_point():
            x = x.to(param.dtype)
        logits = self.net(x)
        b, _, h, w = images.shape
        if not isinstance(logits, Tensor) or logits.ndim != 4 or logits.shape[:2] != (b, self.num_classes):
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"segmenter {self.name!r} must output logits (B, {self.num_classes}, h, w), got {got}"
            )
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits


class _OutputKey(nn.Module):
    """net(x)[key]: torchvision segmentation models return a dict (``"out"``, ``"aux"``)."""

    def __init__(self, net: nn.Module, key: str):
        super().__init__()
        self.net, self.key = net, key

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[self.key]


def load_state_dict(
    path: str | Path, *, key: str | None = None, strip_prefix: str = "", mmap: bool = False
) -> dict[str, Tensor]:
    """Tensors of a checkpoint: ``.safetensors`` via safetensors, ``.pt/.pth/.bin/.ckpt`` via
    ``torch.load(weights_only=True)``. ``key`` selects a nested state dict (e.g. "state_dict", "model");
    ``strip_prefix`` removes a key prefix (e.g. "module."). A pickle that needs code execution is refused.
    ``mmap``: map a zip-format ``torch.save`` file instead of reading it (only the shapes are wanted)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path))
    elif path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            obj = torch.load(
                path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path)
            )
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"checkpoint {path} is a pickle that needs code execution to load; it is refused (never "
                "unpickled). Convert it once, where you trust it, to safetensors: "
                "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')"
            ) from exc
    else:
        raise ValueError(
            f"checkpoint {path} has an unknown extension; use .safetensors (or .pt/.pth state dicts)"
        )
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            raise ValueError(f"checkpoint {path} has no entry {key!r}")
        obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"checkpoint {path} is not a flat state dict of tensors; pass state_dict_key= to select one "
            "(e.g. 'state_dict' or 'model')"
        )
    return {
        (k[len(strip_prefix) :] if strip_prefix and k.startswith(strip_prefix) else k): v
        for k, v in obj.items()
    }


def _load_weights(net: nn.Module, spec: Mapping[str, Any]) -> None:
    state = load_state_dict(
        spec["weights"], key=spec.get("state_dict_key"), strip_prefix=spec.get("strip_prefix", "")
    )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights {spec['weights']} do not fit the {spec['kind']} model: {exc}") from exc


def _import_factory(target: str) -> Callable[..., Any]:
    """'package.module:callable' -> the callable."""
    module_name, sep, attr = str(target).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"factory must look like 'package.module:callable', got {target!r}")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.split(".")[0]
        raise ValueError(
            f"cannot import segmenter factory {target!r}: {exc}. The package {top!r} must be importable "
            f"where the sampling actors run: name its folder (the one holding {top}/__init__.py, or {top}.py) "
            f"in the config, ray: {{runtime_env: {{py_modules: [path/to/{top}]}}}}, which works locally and "
            "under `ray job submit` alike; or pip-install it on every node (docs/own-data.md)"
        ) from exc
    except ImportError as exc:
        raise ValueError(f"cannot import segmenter factory {target!r}: {exc}") from exc
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise ValueError(f"cannot import segmenter factory {target!r}: {exc}") from exc
    if not callable(obj):
        raise TypeError(f"segmenter factory {target!r} is not callable")
    return obj


def _num_classes(spec: Mapping[str, Any]) -> int:
    if "num_classes" not in spec:
        raise ValueError(
            f"a {spec['kind']!r} segmenter spec needs num_classes (the number of logit channels)"
        )
    return spec["num_classes"]


def build_module(spec: Mapping[str, Any]) -> tuple[nn.Module, int, Any]:
    net = _import_factory(spec.get("factory", ""))(**dict(spec.get("kwargs") or {}))
    if not isinstance(net, nn.Module):
        raise TypeError(f"factory {spec['factory']!r} returned {type(net).__name__}, not a torch.nn.Module")
    if spec.get("weights"):
        _load_weights(net, spec)
    return net, _num_classes(spec), (spec.get("mean"), spec.get("std"))


def check_module(spec: Mapping[str, Any]) -> None:
    """What ``build_module`` would refuse, found without loading weights: the factory imports and builds (on
    the meta device: no memory, no initialisation; on the CPU if the factory cannot build on meta), and the
    tensor names and shapes of ``weights`` (a safetensors header, or a weights-only checkpoint read lazily)
    fit the module. Raises as ``build_module`` would."""
    factory = _import_factory(spec.get("factory", ""))
    kwargs = dict(spec.get("kwargs") or {})
    try:
        with torch.device("meta"):
            net = factory(**kwargs)
    except Exception:  # noqa: BLE001 - a factory that cannot build on meta; the CPU build decides
        net = factory(**kwargs)
    if not isinstance(net, nn.Module):
        raise TypeError(f"factory {spec['factory']!r} returned {type(net).__name__}, not a torch.nn.Module")
    if not spec.get("weights"):
        return
    shapes = _checkpoint_shapes(spec["weights"], spec.get("state_dict_key"), spec.get("strip_prefix", ""))
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [
        f"{k}: {shapes[k]} in the file, {expected[k]} in the model"
        for k in sorted(expected)
        if k in shapes and shapes[k] != expected[k]
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{len(items)} {label} (first: {', '.join(items[:3])})"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("mis-shaped", wrong),
            )
            if items
        ]
        raise ValueError(
            f"weights {spec['weights']} do not fit the module model: {'; '.join(parts)}; "
            "check the factory's kwargs (they must match the ones the weights were trained with), "
            "state_dict_key and strip_prefix"
        )


def _checkpoint_shapes(path: str | Path, key: str | None, strip_prefix: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a checkpoint: from the safetensors header without reading a tensor; other
    checkpoints through ``load_state_dict`` (weights only, as the build reads them)."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors" or key is not None:
        return {
            k: tuple(v.shape) for k, v in load_state_dict(path, key=key, strip_prefix=strip_prefix).items()
        }
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
    return {
        (k[len(strip_prefix) :] if strip_prefix and k.startswith(strip_prefix) else k): v
        for k, v in shapes.items()
    }


def build_torchscript(spec: Mapping[str, Any]) -> tuple[nn.Module, int, Any]:
    path = Path(spec.get("path", "")).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"TorchScript file {path} does not exist")
    return (
        torch.jit.load(str(path), map_location="cpu"),
        _num_classes(spec),
        (spec.get("mean"), spec.get("std")),
    )


def build_torchvision(spec: Mapping[str, Any]) -> tuple[nn.Module, int, Any]:
    import torchvision.models.segmentation as tvseg

    arch = spec.get("arch", "")
    factory = getattr(tvseg, arch, None) if not str(arch).startswith("_") else None
    if not callable(factory):  # an unknown name, not a wrong type
        raise ValueError(  # noqa: TRY004
            f"unknown torchvision segmentation arch {arch!r}; e.g. deeplabv3_mobilenet_v3_large, "
            "deeplabv3_resnet50, fcn_resnet50, lraspp_mobilenet_v3_large"
        )
    if not spec.get("weights"):
        raise ValueError(
            "a torchvision segmenter spec needs weights (a local .safetensors or .pth state dict)"
        )
    state = load_state_dict(
        spec["weights"], key=spec.get("state_dict_key"), strip_prefix=spec.get("strip_prefix", "")
    )
    aux = any(k.startswith("aux_classifier.") for k in state)
    num_classes = _num_classes(spec)
    net = factory(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights {spec['weights']} do not fit torchvision {arch}: {exc}") from exc
    return (
        _OutputKey(net, "out"),
        num_classes,
        (spec.get("mean", IMAGENET_MEAN), spec.get("std", IMAGENET_STD)),
    )


def assemble(
    spec: Mapping[str, Any], built: tuple[nn.Module, int, Any], *, device: Any = "cpu", dtype: Any = "float32"
) -> Segmenter:
    """The ``Segmenter`` around a builder's ``(net, num_classes, (mean, std))``, on ``device`` in ``dtype``,
    eval mode, no gradients. ``name`` defaults to ``<file or folder stem>-<hash of the spec>``."""
    net, num_classes, (mean, std) = built
    source = spec.get("weights") or spec.get("path") or spec.get("factory") or spec["kind"]
    name = spec.get("name") or f"{Path(str(source).split(':')[-1]).stem}-{short_hash(dict(spec))}"
    size = spec.get("input_size")
    segmenter = Segmenter(
        net,
        num_classes=num_classes,
        mean=mean,
        std=std,
        name=name,
        input_scale=spec.get("input_scale"),
        input_size=None if size is None else list(size),
    )
    return segmenter.to(device=torch.device(device), dtype=resolve_dtype(dtype)).eval().requires_grad_(False)
