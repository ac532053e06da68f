"""Any other dataset: a CSV or Parquet manifest with columns ``image_path,label_path[,image_id][,split]``.

Relative paths resolve against the manifest's folder. Without ``image_id`` the id is the image path
relative to that folder without its extension (``imgs/a.png`` -> ``imgs_a`` once sanitised), or the file
stem for absolute paths and URLs. With a ``split`` column only the rows of ``dataset.split`` are kept.
Label values are used as stored (plus ``dataset.label_map``)."""

from __future__ import annotations

import csv
import io
import posixpath
from typing import Any

from ray_certseg import storage
from ray_certseg.config import DatasetConfig

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
    for number, row in enumerate(rows, start=1):
        if "split" in row and str(row["split"]) != cfg.split:
            continue
        for column in REQUIRED:
            if row[column] in (None, ""):
                raise ValueError(f"dataset.manifest: {manifest} row {number}: empty {column}")
        image_path, label_path = str(row["image_path"]), str(row["label_path"])
        image_id = row.get("image_id")
        refs.append(
            {
                "image_id": str(image_id) if image_id not in (None, "") else default_id(image_path),
                "dataset": cfg.name,
                "image_path": storage.join(base, image_path),
                "label_path": storage.join(base, label_path),
            }
        )
    return refs


def label_map(label_path: str) -> None:
    """Manifest labels are used as stored."""
    return
