"""The reducer's pooling: like-for-like by default (every method over the same images per dataset and sigma),
the all-rows variant on request, and the Dice / worst-case columns of the dataset table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ray_certseg import votes
from ray_certseg.results import aggregate, image_records, tables

GRID = image_records.Grid((0.6,), (0.1,), ("holm",))


def record(image_id: str, method: str, sigma: float, seed: int) -> votes.VoteRecord:
    """A 4x4, 3-class vote row: votes random but fixed by seed; k large so some pixels certify."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, (4, 4)).astype(np.uint8)
    c_hat = np.where(rng.random((4, 4)) < 0.7, label, rng.integers(0, 3, (4, 4))).astype(np.uint8)
    k = rng.integers(30, 41, (4, 4)).astype(np.uint16)
    return votes.VoteRecord(
        image_id=image_id,
        dataset="toy",
        method=method,
        denoiser="",
        segmenter="s",
        sigma=sigma,
        n0=2,
        n=40,
        seed=0,
        num_classes=3,
        ignore_index=255,
        height=4,
        width=4,
        label=label,
        c_hat=c_hat,
        k=k,
        clean_pred=label,
        sample_seconds=0.1,
        counts=None,
    )


@pytest.fixture
def per_image() -> pd.DataFrame:
    """Methods a and b at sigma 0.25 and 0.5 over images 0-2, except b's row of image 2 at sigma 0.25 (failed)."""
    recs = [
        record(f"img{i}", m, s, seed=10 * i + (m == "b") + int(s * 4))
        for s in (0.25, 0.5)
        for m in ("a", "b")
        for i in range(3)
        if (m, s, i) != ("b", 0.25, 2)
    ]
    rows = [r for rec in recs for r in image_records.image_rows(rec, GRID)]
    return aggregate.deduplicate(pd.DataFrame(rows))


def test_default_pooling_compares_every_method_over_the_same_images(per_image):
    left = aggregate.left_out(per_image)
    assert left.to_dict("records") == [
        {"dataset": "toy", "sigma": 0.25, "image_id": "img2", "has": "a", "lacks": "b"}
    ]
    common = aggregate.pool_records(per_image).set_index(["method", "sigma"])
    assert common.loc[("a", 0.25), "images"] == common.loc[("b", 0.25), "images"] == 2
    assert common.loc[("a", 0.25), "images_left_out"] == 1 and common.loc[("b", 0.25), "images_left_out"] == 0
    assert (common.xs(0.5, level="sigma")["images"] == 3).all()  # nothing missing at sigma 0.5
    # a's pooled numbers at 0.25 are those of images 0 and 1 alone
    only = per_image[(per_image["method"] == "a") & (per_image["image_id"] != "img2")]
    alone = aggregate.pool_records(only).set_index(["method", "sigma"])
    assert common.loc[("a", 0.25), "certified_accuracy"] == alone.loc[("a", 0.25), "certified_accuracy"]
    assert (common["pooling"] == "common").all()


def test_all_rows_pooling_is_kept_as_a_variant(per_image):
    every = aggregate.pool_records(per_image, "all").set_index(["method", "sigma"])
    assert every.loc[("a", 0.25), "images"] == 3 and every.loc[("b", 0.25), "images"] == 2
    assert (every["pooling"] == "all").all() and (every["images_left_out"] == 0).all()
    with pytest.raises(ValueError, match="pooling"):
        aggregate.pool_records(per_image, "some")


def test_summary_lists_what_was_left_out_and_the_bounds(per_image):
    metrics = aggregate.pool_records(per_image)
    text = tables.summary_markdown(metrics, left=aggregate.left_out(per_image))
    assert "Like for like" in text and "image `img2` (has a; lacks b)" in text
    assert "worst_miou" in text and "certified_dice" in text
    everything = tables.summary_markdown(aggregate.pool_records(per_image, "all"))
    assert "Every row pooled" in everything and "Like for like" not in everything


def test_dataset_table_has_dice_and_worst_case_columns_in_order(per_image):
    m = aggregate.pool_records(per_image)
    assert (m["worst_miou"] <= m["miou"] + 1e-12).all() and (
        m["worst_dice"] <= m["certified_dice"] + 1e-12
    ).all()
    assert np.allclose(m["worst_accuracy"], m["certified_accuracy"])
    assert all(len(v) == 3 for v in m["worst_iou_per_class"]) and all(
        len(v) == 3 for v in m["dice_per_class"]
    )
