"""Any other dataset: a CSV or Parquet manifest with columns ``image_path,label_path[,image_id][,split]``.

Relative paths resolve against the manifest's folder. Without ``image_id`` the id is the image path
relative to that folder without its extension (``imgs/a.png`` -> ``imgs_a`` once sanitised), or the file
stem for absolute paths and URLs. With a ``split`` column only the rows of ``dataset.split`` are kept.
Label values are used as stored (plus ``dataset.label_map``). Two rows with different images and the same id
(given or derived) are an error naming both rows, unless ``dataset.duplicate_ids: rename``."""

from __future__ import annotations

import csv
import io
import logging
import posixpath
from typing import Any

from ray_certseg import storage
from ray_certseg.data.config import DatasetConfig

log = logging.getLogger("ray_certseg")
REQUIRED = ("image_path", "label_path")
PARQUET_SUFFIXES = (".parquet", ".pq")


def _rows(path: str, data: bytes) -> list[dict[str, Any]]:
    if path.lower().endswith(PARQUET_SUFFIXES):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))


def default_id(image_path: str) -> str:
    """The id of an image without an explicit one (before sanitising)."""
    if storage.split_protocol(image_path)[0] is not None or image_path.startswith("/"):
        return posixpath.splitext(posixpath.basename(image_path))[0]
    return posixpath.splitext(posixpath.normpath(image_path))[0]


def list_refs(cfg: DatasetConfig) -> list[dict[str, Any]]:
    """One reference per manifest row (of ``dataset.split`` if there is a ``split`` column), in file order."""
    manifest = storage.canonical(cfg.manifest)
    try:
        rows = _rows(manifest, storage.read_bytes(manifest, cfg.storage_options))
    except FileNotFoundError:
        raise FileNotFoundError(f"dataset.manifest: {manifest} not found") from None
    if not rows:
        raise ValueError(f"dataset.manifest: {manifest} has no rows")
    missing = [c for c in REQUIRED if c not in rows[0]]
    if missing:
        raise ValueError(
            f"dataset.manifest: {manifest} lacks column(s) {', '.join(missing)}; it needs "
            f"image_path,label_path[,image_id][,split], has {', '.join(map(str, rows[0]))}"
        )
    base = posixpath.dirname(manifest)
    refs = []
    first_row: dict[str, tuple[int, str]] = {}  # raw id -> (row number, image path) of its first row
    for number, row in enumerate(rows, start=1):
        if "split" in row and str(row["split"]) != cfg.split:
            continue
        for column in REQUIRED:
            if row[column] in (None, ""):
                raise ValueError(f"dataset.manifest: {manifest} row {number}: empty {column}")
        image_path, label_path = str(row["image_path"]), str(row["label_path"])
        explicit = row.get("image_id") not in (None, "")
        image_id = str(row["image_id"]) if explicit else default_id(image_path)
        if image_id in first_row and first_row[image_id][1] != image_path:
            _duplicate(cfg, manifest, image_id, explicit, first_row[image_id], (number, image_path))
        first_row.setdefault(image_id, (number, image_path))
        refs.append(
            {
                "image_id": image_id,
                "dataset": cfg.name,
                "image_path": storage.join(base, image_path),
                "label_path": storage.join(base, label_path),
            }
        )
    return refs


def _duplicate(
    cfg: DatasetConfig,
    manifest: str,
    image_id: str,
    explicit: bool,
    first: tuple[int, str],
    again: tuple[int, str],
) -> None:
    """Two different images under one id: an error naming both rows (data rows, counted from 1 after the
    header), or with ``dataset.duplicate_ids: rename`` a warning (both get a ``-<crc32 of the path>`` suffix)."""
    source = "image_id" if explicit else "the id derived from image_path (no image_id column value)"
    what = (
        f"dataset.manifest: {manifest} rows {first[0]} ({first[1]}) and {again[0]} ({again[1]}) are "
        f"different images with the same {source} {image_id!r}"
    )
    if cfg.duplicate_ids == "error":
        raise ValueError(
            f"{what}: give each image its own image_id, or set dataset.duplicate_ids: rename to "
            "suffix both with a hash of their path"
        )
    log.warning("%s: both renamed with a hash suffix (dataset.duplicate_ids: rename)", what)


def label_map(label_path: str) -> None:
    """Manifest labels are used as stored."""
    return
