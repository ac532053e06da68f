"""Grouping work and vote rows for scale (issue 17): images per Ray batch from a pixel budget, vote rows per
file from an in-memory byte budget, and the row-size estimate they rest on. The end-to-end side (votes
unchanged by the grouping, few files, exactly once after a crash) is in test_pipeline.py and test_faults.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from ray_certseg import votes
from ray_certseg.config import JobConfig
from ray_certseg.job import pipeline

BASE = {
    "dataset": {"kind": "manifest", "manifest": "m.csv", "num_classes": 4},
    "models": {"segmenters": {"s": {"kind": "module", "factory": "x:y", "num_classes": 4}}},
    "methods": {"m": {"segmenter": "s"}},
    "ray": {"actors": 2},
}


def job(**changes) -> JobConfig:
    data = copy.deepcopy(BASE)
    for key, value in changes.items():
        section, name = key.split("__")
        data.setdefault(section, {})[name] = value
    return JobConfig.from_dict(data, base_dir="/tmp")


def test_images_per_batch_fills_the_pixel_budget_but_leaves_every_actor_two_batches():
    cfg = job()
    assert cfg.ray.batch_size == "auto" and cfg.ray.batch_pixels == 1 << 20
    assert pipeline.images_per_batch(cfg, 3000, (16, 16)) == pipeline.MAX_IMAGES_PER_BATCH  # 4096 fit
    assert pipeline.images_per_batch(cfg, 24, (64, 64)) == 6  # 256 fit; 24 images over 2 actors x 2 batches
    assert pipeline.images_per_batch(cfg, 500, (1024, 2048)) == 1  # one image is over the budget
    assert pipeline.images_per_batch(cfg, 500, None) == 1  # no probe image: one at a time
    assert pipeline.images_per_batch(job(ray__actors={"min": 1, "max": 8}), 64, (16, 16)) == 4  # by the max
    assert pipeline.images_per_batch(job(ray__batch_size=3), 3000, (16, 16)) == 3  # given: kept
    assert pipeline.images_per_batch(job(ray__batch_pixels=1024), 3000, (16, 16)) == 4


def test_rows_per_file_fills_the_byte_budget_but_leaves_every_actor_four_files():
    cfg = job()
    assert cfg.ray.rows_per_file == "auto" and cfg.ray.file_bytes == 64 << 20
    assert pipeline.rows_per_file(cfg, (16, 16), 100_000) == pipeline.MAX_ROWS_PER_FILE  # 1.5 KB rows: capped
    assert pipeline.rows_per_file(cfg, (16, 16), 3000) == 375  # 3000 rows / (4 files x 2 actors): 8 files
    assert pipeline.rows_per_file(cfg, (64, 64), 144) == 18  # the demo: files (and progress) keep coming
    big = votes.row_nbytes(1024 * 2048, 4)
    assert pipeline.rows_per_file(cfg, (1024, 2048), 500) == (64 << 20) // big == 6  # the byte budget
    assert pipeline.rows_per_file(job(ray__file_bytes=1), (1024, 2048), 500) == 1  # never 0
    assert pipeline.rows_per_file(cfg, (16, 16), 1) == 1
    assert pipeline.rows_per_file(cfg, None, 3000) == 1
    assert pipeline.rows_per_file(job(ray__rows_per_file=5), (16, 16), 3000) == 5
    assert pipeline.rows_per_file(job(ray__actors={"min": 1, "max": 8}), (16, 16), 3200) == 100
    counted = job(sampling__store_counts=True)
    assert pipeline.rows_per_file(counted, (1024, 2048), 500) < pipeline.rows_per_file(cfg, (1024, 2048), 500)


@pytest.mark.parametrize("levels, store_counts", [(0, False), (2, False), (0, True)])
def test_row_nbytes_is_within_a_fifth_of_a_real_rows_arrow_size(levels, store_counts):
    h, w, c = 48, 64, 7
    rng = np.random.default_rng(0)
    cls = lambda: rng.integers(0, c, (h, w)).astype(np.uint8)
    row = votes.VoteRecord(
        image_id="a",
        dataset="d",
        method="m",
        denoiser="",
        segmenter="s",
        sigma=0.25,
        n0=10,
        n=100,
        seed=0,
        num_classes=c,
        ignore_index=255,
        height=h,
        width=w,
        label=cls(),
        c_hat=cls(),
        k=rng.integers(0, 100, (h, w)).astype(np.uint16),
        clean_pred=cls(),
        sample_seconds=1.0,
        counts=rng.integers(0, 100, (c, h, w)).astype(np.uint16) if store_counts else None,
        hierarchy="demo-0" if levels else None,
        margin=rng.integers(0, 10, (h, w)).astype(np.uint16) if levels else None,
        c_hat_levels=rng.integers(0, 3, (levels, h, w)).astype(np.uint8) if levels else None,
        k_levels=rng.integers(0, 100, (levels, h, w)).astype(np.uint16) if levels else None,
    )
    real = votes.make_table([row]).nbytes
    estimate = votes.row_nbytes(h * w, c, levels=levels, store_counts=store_counts)
    assert 0.8 * real <= estimate <= 1.2 * real, (estimate, real)


@pytest.mark.parametrize("key, value", [("batch_size", 0), ("batch_size", "all"), ("rows_per_file", True)])
def test_a_bad_grouping_key_is_one_line_naming_it(key, value):
    from ray_certseg.config import ConfigError

    with pytest.raises(ConfigError, match=rf"^ray\.{key}: must be an integer >= 1 .* or \"auto\""):
        job(**{f"ray__{key}": value})
