"""The streaming reducer (issue 17, item 4): vote files certified chunk by chunk into a pool that holds sums
only; the same numbers as pooling every record in memory, whatever the chunking, order or duplicates."""

from __future__ import annotations

import logging
import math
import random
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_pooling import record

from ray_certseg import analysis, votes
from ray_certseg.results import aggregate, image_records, reduce, stream

GRID = {"taus": [0.6, 0.75], "alphas": [0.1, 0.001], "corrections": ["holm", "bonferroni"]}


def write_run(root: Path, images: int, *, per_file: int = 7) -> Path:
    """Methods a, b at sigma 0.25, 0.5 over ``images`` images, b's row of img2 at 0.25 missing (a failed
    row), in files of ``per_file`` rows."""
    recs = [
        record(f"img{i:03d}", m, s, seed=10 * i + (m == "b") + int(s * 4))
        for s in (0.25, 0.5)
        for m in ("a", "b")
        for i in range(images)
        if (m, s, i) != ("b", 0.25, 2)
    ]
    for i, rec in enumerate(recs):
        rec.sample_seconds = 0.01 + 0.1 / (i + 3)  # floats whose sum depends on the order of adding
    for j in range(0, len(recs), per_file):
        votes.write_votes(recs[j : j + per_file], str(root / "votes" / f"part-{j:05d}.parquet"))
    return root


def in_memory(root: Path) -> reduce.ReduceResult:
    """Every record built and pooled at once (the reducer before it streamed)."""
    table = pq.read_table(root / "votes")
    grid = image_records.Grid(tuple(GRID["taus"]), tuple(GRID["alphas"]), tuple(GRID["corrections"]))
    return reduce.reduce_table(image_records.certify_table(table, grid))


def test_exact_sum_does_not_depend_on_order_or_chunking():
    rng = random.Random(0)
    values = [rng.uniform(-1, 1) * 10 ** rng.randint(-12, 12) for _ in range(2000)]
    whole = math.fsum(values)
    for _ in range(5):
        rng.shuffle(values)
        acc, at = aggregate.ExactSum(), 0
        while at < len(values):
            step = rng.randint(1, 97)
            acc.add(values[at : at + step])
            at += step
        assert acc.value == whole


def test_streamed_reduction_equals_pooling_every_record_at_once(tmp_path, monkeypatch):
    root = write_run(tmp_path / "run", 12)
    want = in_memory(root)
    monkeypatch.setattr(stream, "CHUNK_BYTES", 1)  # one vote row per chunk: the most chunks there can be
    got = reduce.reduce_output(str(root), **GRID, engine="local")
    pd.testing.assert_frame_equal(got.metrics, want.metrics)
    assert got.summary_markdown == want.summary_markdown
    stored = analysis.load_metrics(str(root), per_image=True)
    pd.testing.assert_frame_equal(stored, want.per_image)
    pd.testing.assert_frame_equal(got.per_image, want.per_image)
    assert (
        want.left_out.to_dict("records")
        == got.left_out.to_dict("records")
        == [{"dataset": "toy", "sigma": 0.25, "image_id": "img002", "has": "a", "lacks": "b"}]
    )


def test_files_do_not_depend_on_the_chunk_size_or_the_file_layout(tmp_path, monkeypatch):
    names = ["per_image.parquet", "metrics.parquet", "metrics.csv", "summary.md"]
    big = write_run(tmp_path / "big", 12, per_file=1000)
    reduce.reduce_output(str(big), **GRID, engine="local")
    monkeypatch.setattr(reduce, "PER_IMAGE_GROUP_BYTES", 1)  # row groups of 64 records
    small = write_run(tmp_path / "small", 12, per_file=1000)
    for chunk_bytes in (1, 4096, 10**9):
        monkeypatch.setattr(stream, "CHUNK_BYTES", chunk_bytes)
        reduce.reduce_output(str(small), **GRID, engine="local")
        first = (small / "metrics" / "per_image.parquet").read_bytes()
        assert pq.ParquetFile(small / "metrics" / "per_image.parquet").metadata.num_row_groups > 1
        if chunk_bytes == 1:
            reference = first
        assert first == reference  # the same bytes however the records were chunked
    # another file layout of the same votes: the same numbers
    split = write_run(tmp_path / "split", 12, per_file=5)
    reduce.reduce_output(str(split), **GRID, engine="local")
    for name in names[1:]:
        assert (split / "metrics" / name).read_bytes() == (big / "metrics" / name).read_bytes(), name


def test_a_duplicated_vote_file_is_counted_once_loudly(tmp_path, caplog):
    root = write_run(tmp_path / "run", 6)
    want = reduce.reduce_output(str(root), **GRID, engine="local").metrics
    first = min((root / "votes").iterdir())
    shutil.copy(first, root / "votes" / "zz-again.parquet")
    with caplog.at_level(logging.WARNING, logger="ray_certseg"):
        got = reduce.reduce_output(str(root), **GRID, engine="local").metrics
    assert f"{pq.read_metadata(first).num_rows} duplicated vote rows" in caplog.text
    pd.testing.assert_frame_equal(got, want)


def test_the_pool_holds_sums_whose_size_does_not_grow_with_the_images(tmp_path):
    """Driver memory bounded by the grid: after 6 or 60 images the pool holds the same groups and arrays."""
    shapes = []
    for images in (6, 60):
        root = write_run(tmp_path / f"run{images}", images)
        grid = image_records.Grid(tuple(GRID["taus"]), tuple(GRID["alphas"]), tuple(GRID["corrections"]))
        records = image_records.GridRecords(grid)
        plan = stream.plan_run(reduce.RunDir.of(str(root)), records.per_row)
        acc = aggregate.Pool("common", plan.left_out)
        for chunk in stream.chunks(reduce.RunDir.of(str(root)), plan, records):
            acc.add(chunk)
        shapes.append(
            (
                sorted(acc.groups, key=aggregate._sort_key),
                [
                    (
                        sorted((m, a.shape) for m, a in g.matrices.items()),
                        max(len(s.partials) for s in g.sums.values()),
                    )
                    for g in acc.groups.values()
                ],
            )
        )
        assert {g.counts["images"] for g in acc.groups.values()} == {images - 1, images}
    assert shapes[0][0] == shapes[1][0] and [s[0] for s in shapes[0][1]] == [s[0] for s in shapes[1][1]]
    assert max(p for _, p in shapes[1][1]) <= 4  # exact float sums: a handful of partials, not one per image


def test_a_bad_pooling_or_engine_is_refused_before_anything_is_read(tmp_path):
    root = write_run(tmp_path / "run", 3)
    with pytest.raises(ValueError, match="pooling"):
        reduce.reduce_output(str(root), **GRID, pooling="some")
    with pytest.raises(ValueError, match="engine"):
        reduce.reduce_output(str(root), **GRID, engine="spark")
    assert not (root / "metrics").exists()


def test_an_output_without_votes_reduces_to_an_empty_table(tmp_path):
    (tmp_path / "run" / "votes").mkdir(parents=True)
    result = reduce.reduce_output(str(tmp_path / "run"), **GRID, engine="local")
    assert result.metrics.empty and "No vote rows" in result.summary_markdown
    assert analysis.load_metrics(str(tmp_path / "run"), per_image=True).empty
    assert pq.read_schema(tmp_path / "run" / "metrics" / "per_image.parquet").equals(
        aggregate.PER_IMAGE_SCHEMA
    )
