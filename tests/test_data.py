"""Dataset readers on tiny trees in the real layouts (written with Pillow into tmp_path)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_certseg.config import DatasetConfig
from ray_certseg.data import (
    ItemError,
    iter_dataset,
    list_items,
    load_item,
    sanitize_id,
    subset_indices,
    unique_ids,
)
from ray_certseg.data.cityscapes import LABEL_ID_TO_TRAIN_ID


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def manifest_tree(
    root: Path,
    n: int,
    *,
    h: int = 6,
    w: int = 8,
    num_classes: int = 5,
    seed: int = 0,
    ids: list[str] | None = None,
) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    """n image/label pairs under root/imgs, root/labels and a CSV manifest with relative paths."""
    rng = np.random.default_rng(seed)
    images, labels, lines = [], [], ["image_path,label_path" + (",image_id" if ids else "")]
    for i in range(n):
        image = random_image(rng, h, w)
        label = rng.integers(0, num_classes, (h, w), dtype=np.uint8)
        label[0, 0] = 255
        save(root / "imgs" / f"{i:03d}.png", image)
        save(root / "labels" / f"{i:03d}.png", label)
        images.append(image)
        labels.append(label)
        lines.append(f"imgs/{i:03d}.png,labels/{i:03d}.png" + (f",{ids[i]}" if ids else ""))
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    return root / "list.csv", images, labels


def manifest_cfg(path: Path, **kw) -> dict:
    return {"kind": "manifest", "manifest": str(path), "num_classes": 5, **kw}


# ------------------------------------------------------------------------------------------------ cityscapes
@pytest.fixture
def cityscapes(tmp_path: Path) -> tuple[Path, dict]:
    """Two cities; frankfurt images have trainIds labels, lindau_000000 only a labelIds label."""
    rng = np.random.default_rng(1)
    written = {}
    for city, stems in {
        "lindau": ["lindau_000000_000019", "lindau_000001_000019"],
        "frankfurt": ["frankfurt_000000_000294"],
    }.items():
        for stem in stems:
            image = random_image(rng, 4, 8)
            save(tmp_path / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", image)
            gt = tmp_path / "gtFine" / "val" / city
            if stem == "lindau_000000_000019":
                label = np.array(
                    [
                        [0, 7, 8, 11, 12, 13, 17, 19],
                        [20, 21, 22, 23, 24, 25, 26, 27],
                        [28, 31, 32, 33, 1, 2, 3, 4],
                        [5, 6, 9, 10, 14, 15, 16, 29],
                    ],
                    dtype=np.uint8,
                )
                save(gt / f"{stem}_gtFine_labelIds.png", label)
            else:
                label = rng.integers(0, 19, (4, 8), dtype=np.uint8)
                label[1, 1] = 255
                save(gt / f"{stem}_gtFine_labelTrainIds.png", label)
                save(gt / f"{stem}_gtFine_labelIds.png", np.zeros((4, 8), np.uint8))  # must not be chosen
            written[stem] = (image, label)
    return tmp_path, written


def test_cityscapes_lists_sorted_stems_and_loads_train_ids(cityscapes):
    root, written = cityscapes
    cfg = {"kind": "cityscapes", "root": str(root)}
    refs = list_items(cfg)
    assert [r["image_id"] for r in refs] == sorted(written)
    assert all(r["dataset"] == "cityscapes" for r in refs)
    item = load_item(refs[0], cfg)  # frankfurt: trainIds file
    image, label = written["frankfurt_000000_000294"]
    np.testing.assert_array_equal(item["image"], image)
    np.testing.assert_array_equal(item["label"], label)
    assert (
        item["label"].dtype == np.uint8
        and item["image"].dtype == np.uint8
        and item["image"].shape == (4, 8, 3)
    )


def test_cityscapes_label_ids_mapped_with_official_table(cityscapes):
    root, written = cityscapes
    ref = next(
        r
        for r in list_items({"kind": "cityscapes", "root": str(root)})
        if r["image_id"] == "lindau_000000_000019"
    )
    assert ref["label_path"].endswith("_gtFine_labelIds.png")
    raw = written["lindau_000000_000019"][1]
    expected_train_ids = {
        7: 0,
        8: 1,
        11: 2,
        12: 3,
        13: 4,
        17: 5,
        19: 6,
        20: 7,
        21: 8,
        22: 9,
        23: 10,
        24: 11,
        25: 12,
        26: 13,
        27: 14,
        28: 15,
        31: 16,
        32: 17,
        33: 18,
    }
    expected = np.vectorize(lambda v: expected_train_ids.get(int(v), 250))(raw)
    label = load_item(ref, {"kind": "cityscapes", "root": str(root), "ignore_index": 250})["label"]
    np.testing.assert_array_equal(label, expected)
    assert sorted(v for v in LABEL_ID_TO_TRAIN_ID.values() if v is not None) == list(range(19))


def test_cityscapes_wrong_root_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.root"):
        list_items({"kind": "cityscapes", "root": str(tmp_path)})


# -------------------------------------------------------------------------------------------- pascal context
@pytest.fixture
def pascal(tmp_path: Path) -> Path:
    names = ["2008_000002", "2008_000007", "2008_000009"]
    for i, name in enumerate(names):
        label = np.zeros((100, 60), np.uint8)
        label[:50, :30], label[:50, 30:], label[50:, :30], label[50:, 30:] = 0, 1, 59, 10 + i
        save(tmp_path / "SegmentationClassContext" / f"{name}.png", label)
        save(tmp_path / "JPEGImages" / f"{name}.jpg", np.full((100, 60, 3), 40 * i, np.uint8), quality=95)
    split = tmp_path / "ImageSets" / "SegmentationContext"
    split.mkdir(parents=True)
    (split / "val.txt").write_text("\n".join(reversed(names)) + "\n")
    return tmp_path


def test_pascal_context_shift_background_and_list_order(pascal):
    cfg = {"kind": "pascal_context", "root": str(pascal)}
    refs = list_items(cfg)
    assert [r["image_id"] for r in refs] == ["2008_000009", "2008_000007", "2008_000002"]
    item = load_item(refs[0], cfg)
    assert item["label"][0, 0] == 255 and item["label"][0, 59] == 0
    assert item["label"][99, 0] == 58 and item["label"][99, 59] == 9 + 2
    assert item["image"].shape == (100, 60, 3) and abs(int(item["image"].mean()) - 80) <= 2


def test_pascal_context_resize_image_bilinear_label_nearest(pascal):
    cfg = {"kind": "pascal_context", "root": str(pascal), "resize": [50, 30]}
    item = load_item(list_items(cfg)[2], cfg)
    assert item["image"].shape == (50, 30, 3) and item["label"].shape == (50, 30)
    expected = np.empty((50, 30), np.uint8)
    expected[:25, :15], expected[:25, 15:], expected[25:, :15], expected[25:, 15:] = 255, 0, 58, 9
    np.testing.assert_array_equal(item["label"], expected)


def test_pascal_context_missing_split_names_it(pascal):
    with pytest.raises(FileNotFoundError, match="train.txt"):
        list_items({"kind": "pascal_context", "root": str(pascal), "split": "train"})


# -------------------------------------------------------------------------------------------------- manifest
def test_manifest_csv_relative_paths_and_default_ids(tmp_path):
    path, images, labels = manifest_tree(tmp_path / "data", 3)
    refs = list_items(manifest_cfg(path))
    assert [r["image_id"] for r in refs] == ["imgs_000", "imgs_001", "imgs_002"]
    assert refs[1]["image_path"] == str(tmp_path / "data" / "imgs" / "001.png")
    items = list(iter_dataset(manifest_cfg(path)))
    for item, image, label in zip(items, images, labels):
        np.testing.assert_array_equal(item["image"], image)
        np.testing.assert_array_equal(item["label"], label)
        assert item["dataset"] == "manifest"


def test_manifest_parquet_with_ids_split_column_and_label_map(tmp_path):
    _, _, labels = manifest_tree(tmp_path, 4)
    table = pa.table(
        {
            "image_path": [f"imgs/{i:03d}.png" for i in range(4)],
            "label_path": [f"labels/{i:03d}.png" for i in range(4)],
            "image_id": ["a", "b", "c", "d"],
            "split": ["val", "train", "val", "train"],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    cfg = DatasetConfig.from_dict(
        {
            "kind": "manifest",
            "manifest": str(tmp_path / "m.parquet"),
            "num_classes": 4,
            "name": "mine",
            "split": "train",
            "label_map": {4: 255, 0: 3},
        }
    )
    refs = list_items(cfg)
    assert [(r["image_id"], r["dataset"]) for r in refs] == [("b", "mine"), ("d", "mine")]
    label = load_item(refs[1], cfg)["label"]
    expected = labels[3].copy()
    expected[labels[3] == 4], expected[labels[3] == 0] = 255, 3
    np.testing.assert_array_equal(label, expected)


def test_manifest_missing_column_is_a_clear_error(tmp_path):
    (tmp_path / "m.csv").write_text("image,label\na.png,b.png\n")
    with pytest.raises(ValueError, match="lacks column.*image_path"):
        list_items(manifest_cfg(tmp_path / "m.csv"))


def test_dict_and_dataclass_configs_agree(tmp_path):
    path, _, _ = manifest_tree(tmp_path, 3)
    assert list_items(manifest_cfg(path)) == list_items(DatasetConfig.from_dict(manifest_cfg(path)))


# -------------------------------------------------------------------------------------- subset, limit, scale
@pytest.mark.parametrize(
    "length,subset,expected",
    [
        (10, {"count": 3}, [0, 3, 6]),
        (10, {"count": 4}, [0, 2, 4, 6]),
        (10, {"every": 4}, [0, 4, 8]),
        (3, {"count": 5}, [0, 1, 2]),
        (500, {"count": 100}, list(range(0, 500, 5))),
        (7, None, list(range(7))),
    ],
)
def test_subset_stride(length, subset, expected):
    cfg = DatasetConfig.from_dict(
        {"kind": "manifest", "manifest": "x.csv", "num_classes": 2, "subset": subset}
    )
    assert list(subset_indices(length, cfg.subset)) == expected


def test_subset_then_limit_on_listing(tmp_path):
    path, _, _ = manifest_tree(tmp_path, 10)
    refs = list_items(manifest_cfg(path, subset={"count": 4}, limit=3))
    assert [r["image_id"] for r in refs] == ["imgs_000", "imgs_002", "imgs_004"]


def test_certify_at_scale_half_image_area_label_nearest(tmp_path):
    path, images, labels = manifest_tree(tmp_path, 1, h=8, w=12)
    cfg = manifest_cfg(path, certify_at_scale=0.5)
    item = load_item(list_items(cfg)[0], cfg)
    assert item["image"].shape == (4, 6, 3) and item["label"].shape == (4, 6)
    block_mean = images[0].astype(float).reshape(4, 2, 6, 2, 3).mean(axis=(1, 3))
    assert np.abs(item["image"] - block_mean).max() <= 1
    np.testing.assert_array_equal(item["label"], labels[0][1::2, 1::2])


# ----------------------------------------------------------------------------------------------- item errors
def item_error(ref: dict, cfg: dict) -> ItemError:
    with pytest.raises(ItemError) as info:
        load_item(ref, cfg)
    return info.value


def test_item_errors_name_item_stage_and_fix(tmp_path):
    path, _, _ = manifest_tree(tmp_path, 6)
    cfg = manifest_cfg(path)
    refs = list_items(cfg)
    (tmp_path / "imgs" / "000.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "imgs" / "005.png").unlink()
    png = (tmp_path / "imgs" / "001.png").read_bytes()
    (tmp_path / "imgs" / "001.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "labels" / "002.png").unlink()
    save(tmp_path / "labels" / "003.png", np.zeros((6, 9), np.uint8))
    bad = np.zeros((6, 8), np.uint8)
    bad[2, 3] = 7
    save(tmp_path / "labels" / "004.png", bad)
    cases = {
        0: ("decode_image", "truncated or corrupt"),
        1: ("decode_image", "truncated or corrupt"),
        2: ("read_label", "not found"),
        3: ("check_size", "8x6 but label"),
        4: ("check_label", r"\[7\]"),
        5: ("read_image", "image file not found: .*005.png \\(check the manifest\\)"),
    }
    for index, (stage, message) in cases.items():
        err = item_error(refs[index], cfg)
        assert err.image_id == refs[index]["image_id"] and err.stage == stage
        assert re.search(message, str(err)), str(err)
        assert refs[index]["image_id"] in str(err)
    assert "dataset.num_classes" in str(item_error(refs[4], cfg))


def test_item_error_survives_pickling():
    err = pickle.loads(pickle.dumps(ItemError("img", "check_size", "mismatch")))
    assert (err.image_id, err.stage, err.message) == ("img", "check_size", "mismatch")


def test_colour_label_is_refused(tmp_path):
    path, _, _ = manifest_tree(tmp_path, 1)
    save(tmp_path / "labels" / "000.png", np.zeros((6, 8, 3), np.uint8))
    err = item_error(list_items(manifest_cfg(path))[0], manifest_cfg(path))
    assert err.stage == "decode_label" and "mode RGB" in str(err)


def test_sixteen_bit_labels_for_many_classes(tmp_path):
    path, _, _ = manifest_tree(tmp_path, 1)
    label = np.arange(48, dtype=np.uint16).reshape(6, 8) * 6
    Image.fromarray(label).save(tmp_path / "labels" / "000.png")
    cfg = manifest_cfg(path, num_classes=300, ignore_index=65535)
    out = load_item(list_items(cfg)[0], cfg)["label"]
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, label)


# ------------------------------------------------------------------------------------------------- image ids
@pytest.mark.parametrize(
    "raw",
    ["../x", "..", ".hidden", "a b/c", "café", "日本語", "", "a" * 300, "x/../../etc/passwd", "C:\\temp\\x"],
)
def test_sanitized_ids_are_safe_file_names(raw):
    safe = sanitize_id(raw)
    assert safe and len(safe) <= 160
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in safe), safe
    assert ".." not in safe and not safe.startswith(".")


def test_sanitize_keeps_readable_ascii():
    assert sanitize_id("café crème") == "cafe_creme"
    assert sanitize_id("frankfurt_000000_000294") == "frankfurt_000000_000294"


def test_colliding_ids_made_unique_independent_of_order():
    raw = ["a b", "a_b", "a+b", "c", "d/e", "d?e"]
    keys = [f"/data/{i}.png" for i in range(len(raw))]
    ids = unique_ids(raw, keys)
    assert len(set(ids)) == len(ids) and ids[1] == "a_b" and ids[3] == "c"
    assert ids[0].startswith("a_b-") and ids[4].startswith("d_e-")
    backwards = unique_ids(raw[::-1], keys[::-1])
    assert backwards[::-1] == ids


def test_same_image_listed_twice_is_an_error():
    with pytest.raises(ValueError, match="listed twice"):
        unique_ids(["a b", "a+b"], ["/x.png", "/x.png"])


def test_manifest_ids_sanitised_and_unique(tmp_path):
    path, _, _ = manifest_tree(tmp_path, 3, ids=["../up", "é x", "e_x"])
    ids = [r["image_id"] for r in list_items(manifest_cfg(path))]
    assert ids[0] == "__up" and ids[2] == "e_x" and ids[1].startswith("e_x-") and len(set(ids)) == 3
