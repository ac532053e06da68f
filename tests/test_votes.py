"""Vote schema: round trips through real Parquet files, pandas, mixed sizes, counts, versions, size."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_certseg import votes
from ray_certseg.votes import (
    SCHEMA,
    SCHEMA_VERSION,
    VERSION_KEY,
    SchemaVersionError,
    VoteRecord,
    check_schema_version,
    make_table,
    read_votes,
    write_votes,
)


def record(
    seed: int, h: int, w: int, *, num_classes: int = 19, n: int = 100, store_counts: bool = False, **kw
) -> VoteRecord:
    """A random but consistent row: counts (C, H, W) sum to n, k = counts[c_hat]."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(num_classes, 1 / num_classes), size=(h, w)).transpose(2, 0, 1)
    c_hat = rng.integers(0, num_classes, (h, w))
    label = rng.integers(0, num_classes, (h, w))
    label[0, 0] = 255 if num_classes <= 254 else 65535
    k = np.take_along_axis(counts, c_hat[None], 0)[0]
    fields = {
        "image_id": f"img{seed}",
        "dataset": "toy",
        "method": "diffusion",
        "denoiser": "ddpm-abc",
        "segmenter": "seg",
        "sigma": 0.25,
        "n0": 10,
        "n": n,
        "seed": seed,
        "num_classes": num_classes,
        "ignore_index": int(label[0, 0]),
        "height": h,
        "width": w,
        "label": label,
        "c_hat": c_hat,
        "k": k,
        "clean_pred": rng.integers(0, num_classes, (h, w)),
        "sample_seconds": 1.5 + seed,
        "counts": counts if store_counts else None,
    }
    return VoteRecord(**{**fields, **kw})


def assert_same(a: VoteRecord, b: VoteRecord) -> None:
    for name in VoteRecord.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
        else:
            assert x == y, name


def test_round_trip_parquet_file_mixed_sizes_and_counts(tmp_path):
    rows = [
        record(0, 5, 7),
        record(1, 3, 11, store_counts=True),
        record(2, 8, 2, method="clean", denoiser=""),
    ]
    path = tmp_path / "votes" / "part-0.parquet"
    write_votes(rows, str(path))
    assert pq.read_schema(path).metadata[VERSION_KEY] == str(SCHEMA_VERSION).encode()
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
    back = read_votes(str(path))
    assert len(back) == 3
    for a, b in zip(rows, back):
        assert_same(a, b)
    assert back[0].counts is None and back[1].counts.shape == (19, 3, 11)
    assert back[0].label.dtype == np.uint8 and back[0].k.dtype == np.uint16
    assert not back[0].k.flags.writeable  # a view of the Arrow buffer


def test_read_folder_and_column_selection(tmp_path):
    write_votes([record(0, 4, 4)], str(tmp_path / "a.parquet"))
    write_votes([record(1, 2, 3)], str(tmp_path / "sub" / "b.parquet"))
    (tmp_path / "b.parquet.partial").write_bytes(b"garbage from a killed writer")
    back = read_votes(str(tmp_path), columns=["k"])
    assert [r.image_id for r in back] == ["img0", "img1"]
    assert back[1].k.shape == (2, 3) and back[1].label is None and back[1].c_hat is None
    with pytest.raises(ValueError, match="unknown column"):
        read_votes(str(tmp_path), columns=["votes"])


def test_plain_pandas_reads_it(tmp_path):
    rows = [record(0, 5, 7), record(1, 3, 4, store_counts=True)]
    write_votes(rows, str(tmp_path / "v.parquet"))
    df = pd.read_parquet(tmp_path / "v.parquet")
    assert list(df.columns) == SCHEMA.names
    for r, (_, row) in zip(rows, df.iterrows()):
        np.testing.assert_array_equal(np.asarray(row["c_hat"]).reshape(row["height"], row["width"]), r.c_hat)
        np.testing.assert_array_equal(np.asarray(row["k"]).reshape(row["height"], row["width"]), r.k)
    assert df["counts"].isna().tolist() == [True, False]


def test_table_slices_read_correctly():
    table = make_table([record(i, 2 + i, 3) for i in range(4)])
    back = read_votes(table.slice(1, 2))
    assert [r.image_id for r in back] == ["img1", "img2"]
    np.testing.assert_array_equal(back[1].k, record(2, 4, 3).k)


def test_dict_rows_and_height_width_derived():
    r = record(3, 4, 6)
    row = {
        k: getattr(r, k)
        for k in VoteRecord.__dataclass_fields__
        if k not in ("height", "width", "counts", "schema_version")
    }
    assert_same(read_votes(make_table([row]))[0], r)
    with pytest.raises(ValueError, match="unknown field.*'votes'"):
        make_table([{**row, "votes": 1}])


def test_many_classes_use_uint16_maps():
    table = make_table([record(0, 3, 3, num_classes=300), record(1, 2, 2)])
    assert table.schema.field("c_hat").type == pa.large_list(pa.uint16())
    back = read_votes(table)
    assert back[0].label[0, 0] == 65535 and back[0].c_hat.dtype == np.uint16


def test_empty_table_has_the_schema():
    assert make_table([]).schema == SCHEMA
    assert make_table([], num_classes=500).schema.field("label").type == pa.large_list(pa.uint16())


@pytest.mark.parametrize(
    "change,message",
    [
        ({"n": 65536}, "n must be in"),
        ({"k": np.full((3, 3), 101)}, "k has values outside"),
        ({"c_hat": np.full((3, 3), 19)}, "c_hat has values outside"),
        ({"label": np.full((3, 3), 200)}, "label has values outside"),
        ({"clean_pred": np.zeros((3, 4), int)}, r"clean_pred must be an array of shape \(height, width\)"),
        ({"counts": np.zeros((18, 3, 3), int)}, "counts must have shape"),
        ({"k": np.full((3, 3), 0.5)}, "k must hold integers"),
        ({"sigma": float("nan")}, "sigma must be"),
    ],
)
def test_bad_rows_are_refused(change, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make_table([record(0, 3, 3), record(1, 3, 3, **change)])


def test_version_from_metadata_or_column_and_mismatch_error(tmp_path):
    assert check_schema_version(str(tmp_path / "nothing")) is None
    table = make_table([record(0, 2, 2)])
    write_votes(table, str(tmp_path / "ok" / "a.parquet"))
    assert check_schema_version(str(tmp_path / "ok")) == SCHEMA_VERSION
    pq.write_table(table.replace_schema_metadata(None), tmp_path / "ok" / "b.parquet")  # column only
    assert check_schema_version(str(tmp_path / "ok")) == SCHEMA_VERSION
    newer = table.replace_schema_metadata({VERSION_KEY: b"3"})  # issue 14: version 2 is this one
    pq.write_table(newer, tmp_path / "ok" / "c.parquet")
    with pytest.raises(
        SchemaVersionError,
        match=r"was written with schema version 3; this reads versions \[1, 2\]: use a new --output or --overwrite",
    ):
        check_schema_version(str(tmp_path / "ok"))
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(SchemaVersionError, match="not a ray_certseg vote file"):
        check_schema_version(str(tmp_path / "other.parquet"))


def test_version_1_files_stay_readable_beside_version_2(tmp_path):
    """A version 1 file (no hierarchy columns) and a version 2 file in one folder: both read, the v1 row with
    its hierarchy columns None, and the folder's version is the newest."""
    rec = record(0, 2, 2)
    v2 = make_table([rec])
    v1_names = [n for n in v2.column_names if n not in ("hierarchy", "margin", "c_hat_levels", "k_levels")]
    v1 = v2.select(v1_names)
    v1 = v1.set_column(v1_names.index("schema_version"), "schema_version", pa.array([1], pa.int32()))
    pq.write_table(v1.replace_schema_metadata({VERSION_KEY: b"1"}), tmp_path / "a.parquet")
    write_votes(v2, str(tmp_path / "b.parquet"))
    assert check_schema_version(str(tmp_path)) == 2
    old, new = read_votes(str(tmp_path))
    assert (old.schema_version, new.schema_version) == (1, 2)
    assert old.hierarchy is None and old.margin is None and old.c_hat_levels is None
    np.testing.assert_array_equal(old.k, new.k)
    np.testing.assert_array_equal(read_votes(v1, columns=["c_hat", "k", "margin"])[0].c_hat, rec.c_hat)


def realistic_map(seed: int, h: int, w: int, num_classes: int = 19, n: int = 100) -> VoteRecord:
    """A Cityscapes-like row: 19 classes in large blocks, an ignore band at the bottom, k ~ Binomial(n, 0.998)
    inside regions and Binomial(n, U(0.4, 0.95)) on the 4-pixel boundaries, where c_hat is often wrong."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, num_classes, (h // 32 + 1, w // 32 + 1))
    label = np.kron(blocks, np.ones((32, 32), int))[:h, :w]
    boundary = np.zeros((h, w), bool)
    boundary[np.abs(np.diff(label, axis=0, prepend=label[:1])).astype(bool)] = True
    boundary[np.abs(np.diff(label, axis=1, prepend=label[:, :1])).astype(bool)] = True
    boundary = np.convolve(boundary.ravel(), np.ones(4), "same").reshape(h, w) > 0
    boundary |= np.roll(boundary, 2, axis=0)
    c_hat = label.copy()
    flip = boundary & (rng.random((h, w)) < 0.3)
    c_hat[flip] = rng.integers(0, num_classes, flip.sum())
    k = rng.binomial(n, np.where(boundary, rng.uniform(0.4, 0.95, (h, w)), 0.998))
    label[int(0.85 * h) :] = 255
    return VoteRecord(
        image_id=f"r{seed}",
        dataset="cityscapes",
        method="diffusion",
        denoiser="adm",
        segmenter="hrnet",
        sigma=0.25,
        n0=10,
        n=n,
        seed=0,
        num_classes=num_classes,
        ignore_index=255,
        height=h,
        width=w,
        label=label,
        c_hat=c_hat,
        k=k,
        clean_pred=c_hat,
        sample_seconds=1.0,
    )


def test_default_schema_stays_under_one_and_a_half_bytes_per_pixel():
    h, w = 256, 512
    buffer = io.BytesIO()
    pq.write_table(make_table([realistic_map(s, h, w) for s in range(4)]), buffer, **votes.PARQUET_ARGS)
    assert buffer.tell() / (4 * h * w) <= 1.5
