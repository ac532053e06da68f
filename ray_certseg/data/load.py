"""Read and decode one item: image (uint8 H x W x 3 RGB) and label (H x W, uint8 for <= 254 classes else
uint16), then the layout's label map, ``dataset.label_map``, value checks, ``resize`` and
``certify_at_scale``.

Order of operations: decode both files -> check equal sizes -> label map (layout's built-in map, e.g.
Cityscapes labelIds -> trainIds or the Pascal-Context shift, then ``dataset.label_map``) -> check every value
is a class in [0, C) or the ignore index -> ``resize`` to [H, W] -> ``certify_at_scale``. Images are resized
bilinearly (area averaging when shrinking by ``certify_at_scale``), labels with nearest neighbour (pixel
centres), so no new label values appear.

Both resizes happen before the noise, so the job then certifies the resized image: the certificate, R and
every metric are in its pixels. That is ``resize``'s purpose (Pascal-Context is evaluated at 480x480) and
what ``certify_at_scale`` says. SegCertify's scales instead keep noise and certificate at full resolution and
resize inside the base classifier: the segmenter spec's ``input_scale`` (models/segmenters.py).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from ray_certseg import storage
from ray_certseg.data import cityscapes, manifest, pascal_context
from ray_certseg.data.config import DatasetConfig

log = logging.getLogger("ray_certseg")
LAYOUTS = {"cityscapes": cityscapes, "pascal_context": pascal_context, "manifest": manifest}
LABEL_MODES = ("L", "P", "I;16", "I;16L", "I;16B", "I")
SHOWN_VALUES = 8


class ItemError(ValueError):
    """One item cannot be used. ``stage`` is one of read_image, decode_image, read_label, decode_label,
    check_size, check_label; the message says what is wrong and how to fix it."""

    def __init__(self, image_id: str, stage: str, message: str):
        self.image_id, self.stage, self.message = image_id, stage, message
        super().__init__(f"image {image_id!r} ({stage}): {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (ItemError, (self.image_id, self.stage, self.message))


def _read(path: str, cfg: DatasetConfig, image_id: str, what: str) -> bytes:
    try:
        return storage.read_bytes(path, cfg.storage_options)
    except (FileNotFoundError, IsADirectoryError):
        fix = (
            "check the manifest" if cfg.kind == "manifest" else "check dataset.root and the dataset's layout"
        )
        raise ItemError(image_id, f"read_{what}", f"{what} file not found: {path} ({fix})") from None


def _open(data: bytes, path: str, image_id: str, what: str) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ItemError(
            image_id,
            f"decode_{what}",
            f"{path} is not a readable image, or is truncated or corrupt "
            f"({type(exc).__name__}: {exc}); re-download or re-export it",
        ) from None
    return im


def decode_image(data: bytes, path: str, image_id: str) -> np.ndarray:
    """Any Pillow-readable image -> uint8 (H, W, 3) RGB.

    16-bit grayscale (modes I;16*, and I from a PNG) is scaled to 8 bits, v8 = round(v16 * 255 / 65535), and
    repeated over the three channels (Pillow's ``convert("RGB")`` would clip every value above 255 to white).
    Other 32-bit integer or float images (modes I, F) are refused: their range is unknown. An alpha channel
    is dropped (pixels used as stored, not composited), with a warning."""
    with _open(data, path, image_id, "image") as im:
        if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
            grey = np.array(im).astype(np.uint32)
            if grey.size and (grey.min() < 0 or grey.max() > 65535):
                raise ItemError(image_id, "decode_image", f"{path} holds values outside [0, 65535]")
            grey = ((grey * 255 + 32767) // 65535).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        if im.mode in ("I", "F"):
            raise ItemError(
                image_id,
                "decode_image",
                f"{path} is a 32-bit {'integer' if im.mode == 'I' else 'float'} image (mode {im.mode}) of "
                "unknown range; convert it to 8-bit RGB (or 16-bit grayscale PNG) first",
            )
        if "A" in im.mode or "a" in im.mode or (im.mode == "P" and "transparency" in im.info):
            _note_alpha(image_id, path, im.mode)
        return np.array(im.convert("RGB"), dtype=np.uint8)


ALPHA_NOTES = 3
_alpha_notes = [0]


def _note_alpha(image_id: str, path: str, mode: str) -> None:
    """A warning for the first ALPHA_NOTES images of this process whose alpha channel is dropped."""
    _alpha_notes[0] += 1
    if _alpha_notes[0] <= ALPHA_NOTES:
        more = "; further such notices in this worker are not shown" if _alpha_notes[0] == ALPHA_NOTES else ""
        log.warning(
            "image %r: %s has an alpha channel (mode %s): dropped, the colour values are used as stored%s",
            image_id,
            path,
            mode,
            more,
        )


def decode_label(data: bytes, path: str, image_id: str) -> np.ndarray:
    """A single-channel label image (8-bit, palette indices or 16-bit) -> uint8/uint16 (H, W) raw values."""
    with _open(data, path, image_id, "label") as im:
        if im.mode not in LABEL_MODES:
            raise ItemError(
                image_id,
                "decode_label",
                f"{path} has mode {im.mode}; a label must be a single-channel "
                "PNG of class indices (mode L, P or 16-bit): convert colour-coded labels to indices",
            )
        raw = np.array(im)
    if raw.dtype == np.uint8:
        return raw
    if raw.size and (raw.min() < 0 or raw.max() > np.iinfo(np.uint16).max):
        raise ItemError(image_id, "decode_label", f"{path} holds values outside [0, 65535]")
    return raw.astype(np.uint16)


def label_lut(
    builtin: Mapping[int, int | None] | None, user: Mapping[int, int] | None, ignore_index: int, size: int
) -> np.ndarray:
    """Lookup table raw value -> label for raw values in [0, size): the built-in map (``None`` -> the
    ignore index) then ``user`` applied to its result; values mapped by neither stay unchanged."""
    lut = np.arange(size, dtype=np.int64)
    for raw, label in (builtin or {}).items():
        if raw < size:
            lut[raw] = ignore_index if label is None else label
    if user:
        second = np.arange(max(int(lut.max()), *user) + 1, dtype=np.int64)
        second[np.array(list(user), dtype=np.int64)] = np.array(list(user.values()), dtype=np.int64)
        lut = second[lut]
    return lut


def map_label(
    raw: np.ndarray, cfg: DatasetConfig, builtin: Mapping[int, int | None] | None, image_id: str, path: str
) -> np.ndarray:
    """Apply the label maps and check that every value is a class in [0, C) or the ignore index."""
    size = 256 if raw.dtype == np.uint8 else 65536
    lut = label_lut(builtin, cfg.label_map, cfg.ignore_index, size)
    label = lut[raw]
    bad = (label >= cfg.num_classes) & (label != cfg.ignore_index)
    if bad.any():
        raw_bad = np.unique(raw[bad])
        raise ItemError(
            image_id,
            "check_label",
            f"{path}: stored value(s) {raw_bad[:SHOWN_VALUES].tolist()} "
            f"({bad.sum()} pixels) map outside [0, {cfg.num_classes}) and are not the ignore index "
            f"{cfg.ignore_index}: check dataset.num_classes, dataset.ignore_index and dataset.label_map",
        )
    return label.astype(cfg.label_dtype)


def resize_nearest(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize by pixel centres: output pixel i takes input floor((i + 0.5) * H / height)."""
    h, w = label.shape
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return label[rows[:, None], cols[None, :]]


def resize_image(image: np.ndarray, height: int, width: int, resample: Image.Resampling) -> np.ndarray:
    """Resize a uint8 (H, W, 3) image with Pillow."""
    return np.array(Image.fromarray(image).resize((width, height), resample), dtype=np.uint8)


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(round(H * scale), round(W * scale)), at least 1 x 1."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def load_item(ref: Mapping[str, Any], cfg: DatasetConfig) -> dict[str, Any]:
    """Read, decode, map, check and resize one item. Returns ``{"image_id", "dataset", "image", "label"}``;
    raises :class:`ItemError` for a bad item and ``storage.StorageError`` if the store itself fails."""
    image_id = str(ref["image_id"])
    image_path, label_path = str(ref["image_path"]), str(ref["label_path"])
    image = decode_image(_read(image_path, cfg, image_id, "image"), image_path, image_id)
    raw = decode_label(_read(label_path, cfg, image_id, "label"), label_path, image_id)
    if raw.shape != image.shape[:2]:
        raise ItemError(
            image_id,
            "check_size",
            f"image {image_path} is {image.shape[1]}x{image.shape[0]} but label "
            f"{label_path} is {raw.shape[1]}x{raw.shape[0]} (width x height): pair the right files",
        )
    label = map_label(raw, cfg, LAYOUTS[cfg.kind].label_map(label_path), image_id, label_path)
    if cfg.resize is not None and tuple(cfg.resize) != label.shape:
        image = resize_image(image, *cfg.resize, Image.Resampling.BILINEAR)
        label = resize_nearest(label, *cfg.resize)
    if cfg.certify_at_scale != 1.0:
        size = scaled_size(*label.shape, cfg.certify_at_scale)
        resample = Image.Resampling.BOX if cfg.certify_at_scale < 1 else Image.Resampling.BILINEAR
        image = resize_image(image, *size, resample)
        label = resize_nearest(label, *size)
    return {
        "image_id": image_id,
        "dataset": str(ref.get("dataset", cfg.name)),
        "image": image,
        "label": label,
    }
