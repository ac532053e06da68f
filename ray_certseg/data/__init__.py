"""Dataset readers in two steps, shaped for Ray.

1. :func:`list_items` (driver, cheap): one small reference per image, ``{"image_id", "dataset",
   "image_path", "label_path"}``, with stable, unique, file-name-safe ids, after ``subset`` and ``limit``.
2. :func:`load_item` (inside Ray tasks/actors): read and decode one reference into ``{"image_id", "dataset",
   "image": uint8 (H, W, 3), "label": (H, W) uint8/uint16}``; a bad item raises :class:`ItemError`.

Layouts (``dataset.kind``): ``cityscapes``, ``pascal_context``, ``manifest`` (see the modules of the same
names). Both functions take a :class:`~ray_certseg.config.DatasetConfig` or a plain dict with its keys.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from ray_certseg.data.config import DatasetConfig, Subset
from ray_certseg.data.ids import sanitize_id, unique_ids
from ray_certseg.data.load import LAYOUTS, ItemError
from ray_certseg.data.load import load_item as _load_item

__all__ = [
    "ItemError",
    "as_dataset_config",
    "iter_dataset",
    "list_items",
    "load_item",
    "sanitize_id",
    "subset_indices",
    "unique_ids",
]


def as_dataset_config(cfg: DatasetConfig | Mapping[str, Any]) -> DatasetConfig:
    """A validated :class:`DatasetConfig` from either itself or a plain dict with the same keys."""
    if isinstance(cfg, DatasetConfig):
        return cfg
    if isinstance(cfg, Mapping):
        return DatasetConfig.from_dict(cfg)
    raise TypeError(f"dataset config must be a DatasetConfig or a dict, got {type(cfg).__name__}")


def subset_indices(length: int, subset: Subset | None) -> range:
    """SegCertify's evaluation subset of a listing of ``length`` items: ``every`` m -> 0, m, 2m, ...;
    ``count`` N -> stride m = max(1, floor(length / N)), the first N of 0, m, 2m, ..."""
    if subset is None:
        return range(length)
    if subset.every is not None:
        return range(0, length, subset.every)
    return range(0, length, max(1, length // subset.count))[: subset.count]


def list_items(dataset_cfg: DatasetConfig | Mapping[str, Any]) -> list[dict[str, Any]]:
    """The dataset's reference records: listed, given unique safe ids, then ``subset``, then ``limit``."""
    cfg = as_dataset_config(dataset_cfg)
    refs = LAYOUTS[cfg.kind].list_refs(cfg)
    if not refs:
        raise ValueError(f"dataset {cfg.name!r}: no items found for split {cfg.split!r}")
    ids = unique_ids([r["image_id"] for r in refs], [r["image_path"] for r in refs])
    refs = [{**r, "image_id": i} for r, i in zip(refs, ids)]
    refs = [refs[i] for i in subset_indices(len(refs), cfg.subset)]
    return refs[: cfg.limit] if cfg.limit is not None else refs


def load_item(ref: Mapping[str, Any], dataset_cfg: DatasetConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Read and decode one reference from :func:`list_items` (see :mod:`ray_certseg.data.load`)."""
    return _load_item(ref, as_dataset_config(dataset_cfg))


def iter_dataset(dataset_cfg: DatasetConfig | Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every loaded item in listing order (in-process use and training)."""
    cfg = as_dataset_config(dataset_cfg)
    for ref in list_items(cfg):
        yield load_item(ref, cfg)
