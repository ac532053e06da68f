"""Deterministic demo scenes built from scikit-learn's bundled handwritten digits (no download).

Each scene is a 64 x 64 RGB image x in [0,1]^(64x64x3) with a label map y in {0..C-1, ignore_index}:

* class 0 ("background") is a grey, low-frequency "cloudy" texture with a small per-scene tint;
* classes 1..6 are digit groups. Every digit instance is the 8 x 8 ``load_digits`` bitmap upscaled to an
  h x w box (h ~ U{22..36}), used as an alpha matte a in [0,1] and composited over the scene in its class's
  colour family c_k (+ N(0, 0.05^2) per-channel jitter per instance): x <- a * c + (1 - a) * x;
* label: y = k where a >= 0.5 (later digits overwrite earlier ones), y = ignore_index on the soft rim
  0.2 < a < 0.5 (mixed colours), otherwise the label underneath.

Classes differ in colour as well as shape, which survives one-shot diffusion denoising (texture alone does not).
Scene i of split s with seed S is drawn from ``numpy.random.default_rng([S, s, i])``, so every image is reproducible
on its own; train and val scenes use disjoint digit instances (``load_digits`` rows [0, 1400) and [1400, 1797)).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

IGNORE_INDEX = 255
SIZE = 64
SPLITS = {"train": 0, "val": 1}
_DIGIT_ROWS = {"train": (0, 1400), "val": (1400, 1797)}


@dataclass(frozen=True)
class DemoClass:
    """One semantic class: its name, base RGB colour in [0,1] and the digits drawn in it."""

    name: str
    colour: tuple[float, float, float]
    digits: tuple[int, ...]


CLASSES: tuple[DemoClass, ...] = (
    DemoClass("background", (0.50, 0.50, 0.50), ()),
    DemoClass("red_0_8", (0.90, 0.12, 0.12), (0, 8)),
    DemoClass("green_1_7", (0.12, 0.80, 0.15), (1, 7)),
    DemoClass("blue_2_5", (0.15, 0.25, 0.95), (2, 5)),
    DemoClass("yellow_3_9", (0.95, 0.88, 0.10), (3, 9)),
    DemoClass("magenta_4", (0.88, 0.15, 0.85), (4,)),
    DemoClass("cyan_6", (0.10, 0.85, 0.90), (6,)),
)
NUM_CLASSES = len(CLASSES)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 scikit-learn digits as float alpha mattes in [0,1] (N, 8, 8) and their targets (N,)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def _matte(patch: np.ndarray, height: int, width: int) -> np.ndarray:
    """Alpha matte of a digit: bilinear upscaling (PIL 'F' mode) to (height, width), then a' = clip((a - 0.15) / 0.3, 0, 1).

    The ramp thickens the strokes (a' >= 0.5 <=> a >= 0.3) and narrows the soft rim.
    """
    img = Image.fromarray(patch.astype(np.float32), mode="F").resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.clip((np.asarray(img, dtype=np.float32) - 0.15) / 0.3, 0.0, 1.0)


def _smooth_field(rng: np.random.Generator, size: int, std: float, channels: int) -> np.ndarray:
    """(size, size, channels) low-frequency field: a 6 x 6 N(0, std^2) grid per channel, bicubic-upsampled (PIL)."""
    grids = rng.normal(0.0, std, (channels, 6, 6)).astype(np.float32)
    up = [
        np.asarray(Image.fromarray(g, mode="F").resize((size, size), Image.Resampling.BICUBIC)) for g in grids
    ]
    return np.stack(up, axis=-1)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey cloudy texture: 0.5 + tint (N(0, 0.02^2) per scene) + grey field (std 0.08) + colour field (std 0.02)."""
    tint = rng.normal(0.0, 0.02, size=3)
    return np.clip(
        0.5 + tint + _smooth_field(rng, size, 0.08, 1) + _smooth_field(rng, size, 0.02, 3), 0.0, 1.0
    )


def make_scene(
    rng: np.random.Generator, split: str = "train", size: int = SIZE, num_digits: tuple[int, int] = (12, 17)
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene: (uint8 image (size, size, 3), uint8 label (size, size)) as described in the module docstring.

    ``num_digits`` = (low, high): the number of digit instances is U{low..high-1}; each picks its class uniformly
    among the digit classes, then a digit instance of that group from the split's pool.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    images, targets = _digits()
    lo, hi = _DIGIT_ROWS[split]
    pool = {k: lo + np.flatnonzero(np.isin(targets[lo:hi], cls.digits)) for k, cls in enumerate(CLASSES) if k}
    x = _background(rng, size)
    y = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(*num_digits))):
        k = int(rng.integers(1, NUM_CLASSES))
        matte = images[int(rng.choice(pool[k]))]
        h = int(rng.integers(22, 37))
        w = round(h * rng.uniform(0.8, 1.1))
        a = _matte(matte, h, w)
        top, left = (
            int(rng.integers(-h // 4, size - 3 * h // 4)),
            int(rng.integers(-w // 4, size - 3 * w // 4)),
        )
        colour = np.clip(np.asarray(CLASSES[k].colour) + rng.normal(0.0, 0.05, 3), 0.0, 1.0)
        # crop the box to the canvas
        ys, xs = slice(max(top, 0), min(top + h, size)), slice(max(left, 0), min(left + w, size))
        a = a[ys.start - top : ys.stop - top, xs.start - left : xs.stop - left, None]
        x[ys, xs] = a * colour + (1.0 - a) * x[ys, xs]
        a2 = a[..., 0]
        region = y[ys, xs]
        region[(a2 > 0.2) & (a2 < 0.5)] = IGNORE_INDEX
        region[a2 >= 0.5] = k
    return np.round(x * 255.0).astype(np.uint8), y


def scene(seed: int, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``index`` of ``split`` for ``seed``: ``make_scene(default_rng([seed, SPLITS[split], index]), split)``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return make_scene(np.random.default_rng([seed, SPLITS[split], index]), split)


def write_split(root: str | Path, split: str, count: int, seed: int = 0) -> Path:
    """Write ``count`` scenes as ``root/split/NNNN_{image,label}.png`` and the manifest ``root/split.csv``.

    Manifest columns: ``image_path,label_path,image_id`` with paths relative to the csv's folder.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    manifest = root / f"{split}.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_path", "label_path", "image_id"])
        for i in range(count):
            image, label = scene(seed, split, i)
            stem = f"{split}/{i:04d}"
            Image.fromarray(image, mode="RGB").save(root / f"{stem}_image.png", optimize=True)
            Image.fromarray(label, mode="L").save(root / f"{stem}_label.png", optimize=True)
            writer.writerow([f"{stem}_image.png", f"{stem}_label.png", f"demo-{split}-{i:04d}"])
    return manifest


def write_classes(root: str | Path) -> Path:
    """Write ``root/classes.json``: names, base colours (uint8 RGB), digits per class, ignore index."""
    path = Path(root) / "classes.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "num_classes": NUM_CLASSES,
        "ignore_index": IGNORE_INDEX,
        "classes": [
            {"id": k, "name": c.name, "colour": [round(v * 255) for v in c.colour], "digits": list(c.digits)}
            for k, c in enumerate(CLASSES)
        ],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def write_demo_dataset(
    root: str | Path, num_train: int = 1000, num_val: int = 64, seed: int = 0
) -> dict[str, Path]:
    """Write the whole demo dataset under ``root``; returns the manifest paths per split (and classes.json)."""
    return {
        "train": write_split(root, "train", num_train, seed),
        "val": write_split(root, "val", num_val, seed),
        "classes": write_classes(root),
    }


def class_fractions(
    labels: np.ndarray, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Fraction of labelled (non-ignore) pixels per class over a stack of label maps: bincount / #labelled."""
    flat = np.asarray(labels).ravel()
    flat = flat[flat != ignore_index]
    if flat.size == 0:
        raise ValueError("labels contain no labelled pixels (all are ignore_index)")
    return np.bincount(flat, minlength=num_classes)[:num_classes] / flat.size
