"""Hugging Face transformers segmentation models as segmenters: any ``save_pretrained`` folder, offline.

``kind: transformers`` (``segformer`` is its alias) loads:

* a semantic model, ``AutoModelForSemanticSegmentation`` (SegFormer, UperNet with ConvNeXt or Swin, DPT, BEiT,
  Data2Vec-vision, MobileViT, ...): its ``logits`` (B, C, h, w), which :class:`~ray_certseg.models.segmenters.
  Segmenter` upsamples bilinearly to the image, as the processors' ``post_process_semantic_segmentation`` does;
* a universal model, ``AutoModelForUniversalSegmentation`` (Mask2Former, MaskFormer): per-pixel class scores
  from its Q queries,

      score_c(i) = sum_q softmax(class_logits_q)_c * sigmoid(mask_logits_q(i)),     c < C (no null class),

  with the mask logits first upsampled bilinearly to the network's input size, as the official semantic
  post-processing does (to its 384 x 384 input). The argmax is the post-processing's label map.

OneFormer is not loaded: its forward needs the task text tokenized ("the task is semantic"), and a tokenizer is
one more artefact to ship offline. mean / std: the spec's, else ``image_mean`` / ``image_std`` of the folder's
``preprocessor_config.json`` (divided by 255 when stored in 0..255), else ImageNet's.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ray_certseg.models.segmenters import IMAGENET_MEAN, IMAGENET_STD

#: ``model_type`` of the universal models loaded through ``AutoModelForUniversalSegmentation``
UNIVERSAL = ("mask2former", "maskformer")


class SemanticLogits(nn.Module):
    """net(pixel_values=x).logits (SegFormer's are at 1/4 resolution)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(pixel_values=x).logits


class UniversalScores(nn.Module):
    """Per-pixel class scores (B, C, H, W) of a universal model at its input size (module docstring)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(pixel_values=x)
        masks = F.interpolate(
            out.masks_queries_logits, size=x.shape[-2:], mode="bilinear", align_corners=False
        )
        classes = out.class_queries_logits.softmax(dim=-1)[..., :-1]
        return torch.einsum("bqc,bqhw->bchw", classes, masks.sigmoid())


def _folder(spec: Mapping[str, Any]) -> tuple[Path, Any, Any]:
    """(folder, its config, the Auto class that loads it), or a clear error."""
    import transformers

    path = Path(spec.get("path", "")).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"transformers folder {path} must contain config.json and model.safetensors (save_pretrained output)"
        )
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    if config.model_type == "oneformer":
        raise ValueError(
            f"{path} holds a OneFormer, whose forward needs its task text tokenized; use a Mask2Former or a "
            "semantic model (AutoModelForSemanticSegmentation) folder"
        )
    universal = config.model_type in UNIVERSAL
    klass = (
        transformers.AutoModelForUniversalSegmentation
        if universal
        else transformers.AutoModelForSemanticSegmentation
    )
    return path, config, klass


def build_transformers(spec: Mapping[str, Any]) -> tuple[nn.Module, int, Any]:
    """``{"kind": "transformers", "path": DIR}``: ``(net, num_classes, (mean, std))`` for ``assemble``."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per actor is noise in a job log
    path, config, klass = _folder(spec)
    try:
        net = klass.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"cannot load {config.model_type} from {path} (safetensors weights required): {exc}"
        ) from exc
    head = UniversalScores(net) if config.model_type in UNIVERSAL else SemanticLogits(net)
    return head, int(config.num_labels), _normalisation(spec, path)


def check_transformers(spec: Mapping[str, Any]) -> None:
    """What :func:`build_transformers` would refuse, found without reading a tensor (driver side): the folder,
    the model built from its config on the meta device, and the shapes of ``model.safetensors``'s header against
    its tensors' (a tensor the model needs and the file lacks is refused)."""
    from safetensors import safe_open

    path, config, klass = _folder(spec)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors (weights load only from safetensors)")
    with torch.device("meta"):
        net = klass.from_config(config)
    with safe_open(str(weights), framework="pt") as f:
        stored = Counter(tuple(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - no mapping
    expected = Counter(tuple(v.shape) for v in net.state_dict().values())
    lacking, extra = expected - stored, stored - expected
    if lacking:  # names are compared by shape: transformers renames some keys between file and module
        raise ValueError(
            f"{weights} does not fit its config.json ({config.model_type}): the model has "
            f"{sum(lacking.values())} tensors of shapes the file lacks (e.g. {sorted(lacking)[:3]}) and the file "
            f"{sum(extra.values())} the model has no place for (e.g. {sorted(extra)[:3]}); the weights and "
            "config.json must come from the same model"
        )


def _normalisation(spec: Mapping[str, Any], path: Path) -> tuple[Any, Any]:
    processor = path / "preprocessor_config.json"
    cfg = json.loads(processor.read_text()) if processor.is_file() else {}
    unit = lambda values: [v / 255 for v in values] if max(values) > 1 else values  # stored in 0..255
    mean = spec.get("mean", unit(cfg.get("image_mean", IMAGENET_MEAN)))
    std = spec.get("std", unit(cfg.get("image_std", IMAGENET_STD)))
    return mean, std
