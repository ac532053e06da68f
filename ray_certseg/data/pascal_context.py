"""Pascal-Context 59 classes as distributed for mmsegmentation: ``JPEGImages/{id}.jpg``,
``SegmentationClassContext/{id}.png`` (0 = background, 1..59 = classes) and the split list
``ImageSets/SegmentationContext/{split}.txt``. Background becomes the ignore label and classes shift to
0..58, as SegCertify evaluates it (``resize: [480, 480]`` reproduces its 480 x 480 evaluation size)."""

from __future__ import annotations

from typing import Any

from ray_certseg import storage
from ray_certseg.data.config import DatasetConfig

NUM_CONTEXT_CLASSES = 59
LABEL_MAP: dict[int, int | None] = {  # None = the ignore index
    0: None,
    255: None,
    **{c: c - 1 for c in range(1, NUM_CONTEXT_CLASSES + 1)},
}


def list_refs(cfg: DatasetConfig) -> list[dict[str, Any]]:
    """One reference per line of the split list, in the list's order."""
    root = storage.canonical(cfg.root)
    split_file = storage.join(root, "ImageSets", "SegmentationContext", f"{cfg.split}.txt")
    try:
        names = storage.read_bytes(split_file, cfg.storage_options).decode("utf-8").split()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"dataset.split: split list {split_file} not found: check dataset.root (the "
            "folder holding JPEGImages/, SegmentationClassContext/ and ImageSets/) and "
            "dataset.split"
        ) from None
    return [
        {
            "image_id": name,
            "dataset": cfg.name,
            "image_path": storage.join(root, "JPEGImages", f"{name}.jpg"),
            "label_path": storage.join(root, "SegmentationClassContext", f"{name}.png"),
        }
        for name in names
    ]


def label_map(label_path: str) -> dict[int, int | None]:
    """Background (0) -> ignore, class c -> c - 1."""
    return LABEL_MAP
