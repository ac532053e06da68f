"""Tests for the deterministic demo scene generator and the shipped demo dataset."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ray_certseg.data import demo as demo_data
from ray_certseg.data.demo import (
    CLASSES,
    IGNORE_INDEX,
    NUM_CLASSES,
    class_fractions,
    scene,
    write_demo_dataset,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "assets" / "demo" / "data"


@pytest.fixture(scope="module")
def val_scenes() -> tuple[np.ndarray, np.ndarray]:
    """The 64 val scenes of seed 0 as (images (64, 64, 64, 3), labels (64, 64, 64))."""
    pairs = [scene(0, "val", i) for i in range(64)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def test_scene_is_deterministic_and_seed_dependent() -> None:
    a_img, a_lab = scene(3, "train", 5)
    b_img, b_lab = scene(3, "train", 5)
    assert a_img.tobytes() == b_img.tobytes() and a_lab.tobytes() == b_lab.tobytes()
    c_img, _ = scene(4, "train", 5)
    d_img, _ = scene(3, "train", 6)
    e_img, _ = scene(3, "val", 5)
    assert (
        not np.array_equal(a_img, c_img)
        and not np.array_equal(a_img, d_img)
        and not np.array_equal(a_img, e_img)
    )


def test_scene_shapes_and_dtypes() -> None:
    image, label = scene(0, "train", 0)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert label.shape == (64, 64) and label.dtype == np.uint8
    assert set(np.unique(label)) <= set(range(NUM_CLASSES)) | {IGNORE_INDEX}


def test_written_dataset_is_byte_identical_for_the_same_seed(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path / "a", num_train=3, num_val=2, seed=7)
    write_demo_dataset(tmp_path / "b", num_train=3, num_val=2, seed=7)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 2 * 5 + 3
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_class_balance(val_scenes: tuple[np.ndarray, np.ndarray]) -> None:
    fractions = class_fractions(val_scenes[1])
    assert NUM_CLASSES >= 6 and fractions.shape == (NUM_CLASSES,)
    assert fractions.max() <= 0.40, fractions
    assert fractions.min() >= 0.05, fractions  # every class is well represented
    ignore = (val_scenes[1] == IGNORE_INDEX).mean()
    assert 0.0 < ignore < 0.15


def test_class_colours_are_distinct(val_scenes: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = val_scenes
    means = np.stack([images[labels == k].mean(axis=0) / 255.0 for k in range(NUM_CLASSES)])
    gaps = [np.linalg.norm(means[i] - means[j]) for i, j in itertools.combinations(range(NUM_CLASSES), 2)]
    assert min(gaps) > 0.3, gaps
    base = np.asarray([c.colour for c in CLASSES])
    assert np.abs(means - base).max() < 0.1  # pixels of class k sit near its base colour


def test_class_fractions_rejects_all_ignore() -> None:
    with pytest.raises(ValueError, match="no labelled pixels"):
        class_fractions(np.full((4, 4), IGNORE_INDEX, dtype=np.uint8))


@pytest.mark.parametrize(
    "call", [lambda: scene(0, "test", 0), lambda: demo_data.write_split("/tmp/x", "train", 0)]
)
def test_bad_arguments_raise(call) -> None:
    with pytest.raises(ValueError):
        call()


def test_shipped_dataset_matches_generator() -> None:
    meta = json.loads((SHIPPED / "classes.json").read_text())
    assert meta["num_classes"] == NUM_CLASSES and meta["ignore_index"] == IGNORE_INDEX
    assert [c["name"] for c in meta["classes"]] == [c.name for c in CLASSES]
    assert len({tuple(c["colour"]) for c in meta["classes"]}) == NUM_CLASSES
    for split, count in (("train", 1000), ("val", 64)):
        with (SHIPPED / f"{split}.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == count and set(rows[0]) == {"image_path", "label_path", "image_id"}
        assert len({r["image_id"] for r in rows}) == count
        for i in (0, count - 1):
            image = np.asarray(Image.open(SHIPPED / rows[i]["image_path"]))
            label = np.asarray(Image.open(SHIPPED / rows[i]["label_path"]))
            expected_image, expected_label = scene(0, split, i)
            np.testing.assert_array_equal(image, expected_image)
            np.testing.assert_array_equal(label, expected_label)


def test_shipped_manifest_reads_through_project_readers() -> None:
    from ray_certseg.data import list_items, load_item

    cfg = {
        "kind": "manifest",
        "manifest": str(SHIPPED / "val.csv"),
        "num_classes": NUM_CLASSES,
        "ignore_index": 255,
    }
    refs = list(list_items(cfg))
    assert len(refs) == 64
    item = load_item(refs[3], cfg)
    expected_image, expected_label = scene(0, "val", 3)
    np.testing.assert_array_equal(np.asarray(item["image"]), expected_image)
    np.testing.assert_array_equal(np.asarray(item["label"]), expected_label)
