"""Cityscapes layout: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with
``gtFine/{split}/{city}/*_gtFine_labelTrainIds.png`` (19 train ids, ignore 255), or, where those were not
generated, ``*_gtFine_labelIds.png`` mapped with the official id -> trainId table."""

from __future__ import annotations

from typing import Any

from ray_certseg import storage
from ray_certseg.data.config import DatasetConfig

#: the official Cityscapes label id of each train id 0..18 (cityscapesscripts labels.py)
TRAIN_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
#: label id -> train id; None = the ignore index
LABEL_ID_TO_TRAIN_ID: dict[int, int | None] = {
    **{i: None for i in range(34)},
    **{label: train for train, label in enumerate(TRAIN_LABEL_IDS)},
}
TRAIN_ID_FILE_MAP: dict[int, int | None] = {255: None}

IMAGE_SUFFIX = "_leftImg8bit.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"


def list_refs(cfg: DatasetConfig) -> list[dict[str, Any]]:
    """One reference per image, sorted by city then name; the image id is the file stem without
    ``_leftImg8bit``. The label is the trainIds file when it exists, else the labelIds file."""
    root = storage.canonical(cfg.root)
    pattern = storage.join(root, "leftImg8bit", cfg.split, "*", f"*{IMAGE_SUFFIX}")
    images = storage.glob(pattern, cfg.storage_options)
    if not images:
        raise FileNotFoundError(
            f"dataset.root: no Cityscapes images match {pattern}: check dataset.root "
            "(the folder holding leftImg8bit/ and gtFine/) and dataset.split"
        )
    labels = set(
        storage.glob(
            storage.join(root, "gtFine", cfg.split, "*", "*_gtFine_label*Ids.png"), cfg.storage_options
        )
    )
    refs = []
    for image in images:
        city, file = image.rsplit("/", 2)[-2:]
        stem = file[: -len(IMAGE_SUFFIX)]
        train_ids = storage.join(root, "gtFine", cfg.split, city, stem + TRAIN_IDS_SUFFIX)
        label_ids = storage.join(root, "gtFine", cfg.split, city, stem + LABEL_IDS_SUFFIX)
        label = label_ids if train_ids not in labels and label_ids in labels else train_ids
        refs.append({"image_id": stem, "dataset": cfg.name, "image_path": image, "label_path": label})
    return refs


def label_map(label_path: str) -> dict[int, int | None]:
    """The built-in map for this label file: labelIds -> train ids, or trainIds' 255 -> ignore."""
    return LABEL_ID_TO_TRAIN_ID if label_path.endswith(LABEL_IDS_SUFFIX) else TRAIN_ID_FILE_MAP
