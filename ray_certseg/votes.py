"""The vote-count Parquet schema: one row per (image, method, sigma).

Per pixel i (H x W maps, row-major, flattened into ``large_list`` columns so images of different sizes share a
file and plain pyarrow/pandas read it without Ray):

- ``c_hat[i]``: the class selected on the n0 selection samples (mode, ties to the lowest index);
- ``k[i]``: how many of the n independent estimation samples predict ``c_hat[i]`` (0 <= k <= n < 65536);
- ``label[i]``: the ground truth (``ignore_index`` for unlabelled pixels); ``clean_pred[i]``: the segmenter's
  prediction on the clean image (no noise, no denoiser: at sigma = 0 every denoiser is the identity), so it
  is the same for every method that shares a segmenter; an uncertified reference, not a smoothed prediction;
- ``counts``: optionally the full estimation counts, (C, H, W) flattened (null unless ``store_counts``);
- version 2, for hierarchical certification (null unless the job names ``dataset.hierarchy``):
  ``hierarchy`` (its name and a hash of its tree), ``margin[i]`` (first minus second largest fine-class vote
  count in S0: exact, an integer in [0, n0]), ``c_hat_levels`` (L, H, W) (the mode of S0 at levels 1..L,
  fine votes summed per node, ties to the lowest node id) and ``k_levels`` (L, H, W) (the S votes under that
  node); level 0 is ``c_hat``, ``k``.

Version 1 files (no hierarchy columns) stay readable. That is all SegCertify needs: p_i = P[Binomial(n, tau) >= k_i], then Holm/Bonferroni over the pixels, for any
tau, alpha and correction, later and without the models. The schema version is stored both in the Parquet
schema
metadata (``b"ray_certseg.schema_version"``) and as a column (metadata can be lost by tools that rewrite
tables). See docs/schema.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_certseg import storage
from ray_certseg.dtypes import MAX_UINT16, UINT8_LABEL_CLASSES

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Versions this code reads (and may resume into): 2 adds the hierarchy columns, null in version 1 files."""
VERSION_KEY = b"ray_certseg.schema_version"
PARQUET_ARGS: dict[str, Any] = {"compression": "zstd", "compression_level": 3}
CLASS_MAP_COLUMNS = ("label", "c_hat", "clean_pred")
ARRAY_COLUMNS = ("label", "c_hat", "k", "clean_pred", "counts", "margin", "c_hat_levels", "k_levels")


class SchemaVersionError(ValueError):
    """An existing output was written with another (or no) vote schema version."""


def class_map_type(num_classes: int) -> pa.DataType:
    """uint8 for class maps when num_classes <= 254 (room for the ignore label 255), else uint16."""
    return pa.uint8() if num_classes <= UINT8_LABEL_CLASSES else pa.uint16()


def schema_for(num_classes: int) -> pa.Schema:
    """The vote schema whose class-map columns fit ``num_classes`` classes, with the version metadata."""
    cls = pa.large_list(class_map_type(num_classes))
    fields = [
        ("image_id", pa.string()),
        ("dataset", pa.string()),
        ("method", pa.string()),
        ("denoiser", pa.string()),
        ("segmenter", pa.string()),
        ("sigma", pa.float64()),
        ("n0", pa.int32()),
        ("n", pa.int32()),
        ("seed", pa.int64()),
        ("num_classes", pa.int32()),
        ("ignore_index", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("label", cls),
        ("c_hat", cls),
        ("k", pa.large_list(pa.uint16())),
        ("clean_pred", cls),
        ("sample_seconds", pa.float64()),
        ("counts", pa.large_list(pa.uint16())),
        ("schema_version", pa.int32()),
        ("hierarchy", pa.string()),
        ("margin", pa.large_list(pa.uint16())),
        ("c_hat_levels", cls),
        ("k_levels", pa.large_list(pa.uint16())),
    ]
    return pa.schema(fields, metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()})


SCHEMA = schema_for(UINT8_LABEL_CLASSES)
SCALAR_COLUMNS = tuple(name for name in SCHEMA.names if name not in ARRAY_COLUMNS)


@dataclass
class VoteRecord:
    """One row: ids, sampling parameters and the per-pixel maps as (H, W) arrays (``counts``: (C, H, W)).

    Arrays read by :func:`read_votes` are read-only views of the Arrow buffers (copy before changing them);
    an array column not read (``columns=``) or not stored (``counts``) is ``None``."""

    image_id: str
    dataset: str
    method: str
    denoiser: str
    segmenter: str
    sigma: float
    n0: int
    n: int
    seed: int
    num_classes: int
    ignore_index: int
    height: int
    width: int
    label: np.ndarray | None
    c_hat: np.ndarray | None
    k: np.ndarray | None
    clean_pred: np.ndarray | None
    sample_seconds: float
    counts: np.ndarray | None = None
    schema_version: int = SCHEMA_VERSION
    hierarchy: str | None = None
    margin: np.ndarray | None = None
    c_hat_levels: np.ndarray | None = None
    k_levels: np.ndarray | None = None

    @classmethod
    def from_votes(
        cls, v: Any, spec: Any, *, label: np.ndarray, hierarchy: str | None = None, **ids: Any
    ) -> VoteRecord:
        """The row of one image's votes: ``v`` (``sampling.Votes``: the maps and the sampling time) counted
        as ``spec`` says (``sampling.SamplingSpec``), with the ground truth ``label``, the digest of the
        ``hierarchy`` whose levels ``v`` holds (if any) and the row's ``ids`` (image_id, dataset, method,
        denoiser, segmenter, ignore_index)."""
        maps = ("c_hat", "k", "clean_pred", "counts", "margin", "c_hat_levels", "k_levels")
        height, width = v.c_hat.shape
        return cls(
            **ids,
            **{name: getattr(spec, name) for name in ("sigma", "n0", "n", "seed", "num_classes")},
            **{name: getattr(v, name) for name in maps},
            height=height,
            width=width,
            label=label,
            sample_seconds=v.seconds,
            hierarchy=hierarchy,
        )


def _as_record(row: VoteRecord | Mapping[str, Any], index: int) -> VoteRecord:
    if isinstance(row, VoteRecord):
        return row
    if not isinstance(row, Mapping):
        raise TypeError(f"vote row {index}: must be a VoteRecord or a dict, got {type(row).__name__}")
    row = dict(row)
    if row.get("label") is not None:
        shape = np.shape(row["label"])
        if len(shape) == 2:
            row.setdefault("height", shape[0])
            row.setdefault("width", shape[1])
    names = {f.name for f in dataclasses.fields(VoteRecord)}
    unknown = sorted(set(row) - names)
    missing = sorted(
        f.name
        for f in dataclasses.fields(VoteRecord)
        if f.default is dataclasses.MISSING and f.name not in row
    )
    if unknown or missing:
        raise ValueError(f"vote row {index}: unknown field(s) {unknown}, missing field(s) {missing}")
    return VoteRecord(**row)


def _check_range(
    row: int, name: str, array: np.ndarray, lo: int, hi: int, allowed: int | None = None
) -> None:
    """Every value in [lo, hi] (or equal to ``allowed``)."""
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"vote row {row}: {name} must hold integers, got dtype {array.dtype}")
    bad = (array < lo) | (array > hi)
    if allowed is not None:
        bad &= array != allowed
    if bad.any():
        extra = f" or {allowed}" if allowed is not None else ""
        raise ValueError(
            f"vote row {row}: {name} has values outside [{lo}, {hi}]{extra}, e.g. {array[bad][0]}"
        )


def _validated(r: VoteRecord, i: int) -> dict[str, np.ndarray | None]:
    """Check one record; return its arrays as numpy."""
    if r.schema_version != SCHEMA_VERSION:
        raise ValueError(
            f"vote row {i}: schema_version {r.schema_version}, this writes version {SCHEMA_VERSION}"
        )
    if not 1 <= r.n <= MAX_UINT16:
        raise ValueError(f"vote row {i}: n must be in [1, {MAX_UINT16}] (k is stored as uint16), got {r.n}")
    if not 1 <= r.num_classes <= MAX_UINT16:
        raise ValueError(f"vote row {i}: num_classes must be in [1, {MAX_UINT16}], got {r.num_classes}")
    if not (np.isfinite(r.sigma) and r.sigma >= 0):
        raise ValueError(f"vote row {i}: sigma must be a finite number >= 0, got {r.sigma}")
    arrays = {
        name: None if getattr(r, name) is None else np.asarray(getattr(r, name)) for name in ARRAY_COLUMNS
    }
    shape = (r.height, r.width)
    for name in ("label", "c_hat", "k", "clean_pred"):
        if arrays[name] is None or arrays[name].shape != shape:
            got = None if arrays[name] is None else arrays[name].shape
            raise ValueError(
                f"vote row {i} ({r.image_id}): {name} must be an array of shape (height, width) = "
                f"{shape}, got {got}"
            )
    top = r.num_classes - 1
    _check_range(i, "label", arrays["label"], 0, top, allowed=r.ignore_index)
    _check_range(i, "c_hat", arrays["c_hat"], 0, top)
    _check_range(i, "clean_pred", arrays["clean_pred"], 0, top)
    _check_range(i, "k", arrays["k"], 0, r.n)
    if arrays["counts"] is not None:
        if arrays["counts"].shape != (r.num_classes, *shape):
            raise ValueError(
                f"vote row {i} ({r.image_id}): counts must have shape (num_classes, height, width) = "
                f"{(r.num_classes, *shape)}, got {arrays['counts'].shape}"
            )
        _check_range(i, "counts", arrays["counts"], 0, r.n)
    levels = [arrays[name] for name in ("margin", "c_hat_levels", "k_levels")]
    if any(a is not None for a in levels) or r.hierarchy is not None:
        margin, c_levels, k_levels = levels
        if r.hierarchy is None or any(a is None for a in levels):
            raise ValueError(
                f"vote row {i} ({r.image_id}): hierarchy, margin, c_hat_levels and k_levels go together"
            )
        if margin.shape != shape or c_levels.ndim != 3 or c_levels.shape[1:] != shape:
            raise ValueError(
                f"vote row {i} ({r.image_id}): margin must be (height, width) and c_hat_levels (L, height, "
                f"width), got {margin.shape} and {c_levels.shape}"
            )
        if k_levels.shape != c_levels.shape:
            raise ValueError(f"vote row {i} ({r.image_id}): k_levels must have the shape of c_hat_levels")
        _check_range(i, "margin", margin, 0, r.n0)
        _check_range(i, "c_hat_levels", c_levels, 0, top)
        _check_range(i, "k_levels", k_levels, 0, r.n)
    if r.num_classes <= UINT8_LABEL_CLASSES and not 0 <= r.ignore_index <= 255:
        raise ValueError(
            f"vote row {i}: ignore_index must be in [0, 255] for uint8 labels, got {r.ignore_index}"
        )
    return arrays


def _list_column(arrays: Sequence[np.ndarray | None], value_type: pa.DataType) -> pa.LargeListArray:
    """One ``large_list`` column from per-row arrays: a single concatenated values buffer plus int64 offsets;
    ``None`` rows are nulls."""
    dtype = value_type.to_pandas_dtype()
    sizes = np.array([0 if a is None else a.size for a in arrays], dtype=np.int64)
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    present = [a.astype(dtype, copy=False).ravel() for a in arrays if a is not None]
    values = np.concatenate(present) if present else np.zeros(0, dtype=dtype)
    mask = pa.array([a is None for a in arrays]) if any(a is None for a in arrays) else None
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type), mask=mask)


def make_table(rows: Iterable[VoteRecord | Mapping[str, Any]], *, num_classes: int | None = None) -> pa.Table:
    """Validate rows (VoteRecords or dicts with the same keys; height/width may be left out of dicts) and
    build a table in the vote schema. Class maps are uint16 if any row (or ``num_classes``, which also
    fixes the schema of an empty table) has more than 254 classes."""
    records = [_as_record(r, i) for i, r in enumerate(rows)]
    arrays = [_validated(r, i) for i, r in enumerate(records)]
    schema = schema_for(max([r.num_classes for r in records] + [num_classes or 1]))
    columns = []
    for f in schema:
        if f.name in ARRAY_COLUMNS:
            columns.append(_list_column([a[f.name] for a in arrays], f.type.value_type))
        else:
            columns.append(pa.array([getattr(r, f.name) for r in records], type=f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def row_nbytes(pixels: int, num_classes: int, *, levels: int = 0, store_counts: bool = False) -> int:
    """In-memory (Arrow) bytes of one vote row of ``pixels`` pixels: the three class maps, k, and with a
    hierarchy of ``levels`` coarser levels its margin and per-level maps, the counts when stored, plus the
    scalar columns and list offsets (about 256 bytes)."""
    cls = class_map_type(num_classes).byte_width
    per_pixel = (
        3 * cls + 2 + (2 + levels * (cls + 2) if levels else 0) + (2 * num_classes if store_counts else 0)
    )
    return pixels * per_pixel + 256


# ----------------------------------------------------------------------------------------------------- files
def _filesystem(path: str, filesystem: Any, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """A pyarrow filesystem and the path on it (``filesystem`` may be pyarrow or fsspec)."""
    if filesystem is None:
        return storage.pyarrow_filesystem(path, storage_options)
    import pyarrow.fs as pafs

    if not isinstance(filesystem, pafs.FileSystem):
        filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(filesystem))
    return filesystem, storage.strip_protocol(path) if storage.is_local(path) else storage.split_protocol(
        path
    )[1]


def parquet_files(
    path: str, *, filesystem: Any = None, storage_options: Mapping[str, Any] | None = None
) -> tuple[Any, list[str]]:
    """The pyarrow filesystem and the sorted ``*.parquet`` files at ``path`` (a file, or a folder searched
    recursively); empty when nothing is there."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(path, filesystem, storage_options)
    with storage.translate_errors(path, storage_options):
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            return fs, [root]
        if info.type == pafs.FileType.NotFound:
            if filesystem is None:
                storage.check_bucket(path, storage_options)  # a missing bucket is an error, not "no files"
            return fs, []
        found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return fs, sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet"))


def write_votes(
    rows: pa.Table | Iterable[VoteRecord | Mapping[str, Any]],
    path: str,
    *,
    filesystem: Any = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Write rows (or a table from :func:`make_table`) to one Parquet file with :data:`PARQUET_ARGS`."""
    table = rows if isinstance(rows, pa.Table) else make_table(rows)
    fs, target = _filesystem(path, filesystem, storage_options)
    with storage.translate_errors(path, storage_options):
        if storage.is_local(path):
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, target, filesystem=fs, **PARQUET_ARGS)


def _read_table(
    path: str, filesystem: Any, storage_options: Mapping[str, Any] | None, columns: list[str] | None
) -> pa.Table:
    fs, files = parquet_files(path, filesystem=filesystem, storage_options=storage_options)
    if not files:
        raise FileNotFoundError(f"no vote files (*.parquet) at {path}")
    with storage.translate_errors(path, storage_options):
        tables = []
        for f in files:  # a version 1 file lacks the version 2 columns: read what it has, nulls for the rest
            names = pq.read_schema(f, filesystem=fs).names
            present = None if columns is None else [c for c in columns if c in names]
            tables.append(pq.read_table(f, filesystem=fs, columns=present, partitioning=None))
    return pa.concat_tables(tables, promote_options="permissive")


def read_votes(
    source: str | pa.Table,
    *,
    filesystem: Any = None,
    storage_options: Mapping[str, Any] | None = None,
    columns: Iterable[str] | None = None,
) -> list[VoteRecord]:
    """Vote rows from a Parquet file, a folder of them (local or ``s3://``), or a table, as VoteRecords with
    (H, W) arrays that are zero-copy, read-only views of the Arrow ``large_list`` values. ``columns`` limits
    which array columns are loaded (the scalar columns always are)."""
    wanted = list(ARRAY_COLUMNS) if columns is None else list(columns)
    unknown = [c for c in wanted if c not in SCHEMA.names]
    if unknown:
        raise ValueError(f"read_votes: unknown column(s) {unknown}; the vote columns are {SCHEMA.names}")
    arrays = [c for c in ARRAY_COLUMNS if c in wanted]
    selected = list(SCALAR_COLUMNS) + arrays
    if isinstance(source, pa.Table):
        table = source.select([c for c in selected if c in source.column_names])
    else:
        table = _read_table(source, filesystem, storage_options, selected)
    absent = [None] * table.num_rows  # columns a version 1 file does not have
    scalars = {
        name: table.column(name).to_pylist() if name in table.column_names else absent
        for name in SCALAR_COLUMNS
    }
    arrays = [c for c in arrays if c in table.column_names]
    records = [
        VoteRecord(
            **{name: scalars[name][i] for name in SCALAR_COLUMNS}, **{name: None for name in ARRAY_COLUMNS}
        )
        for i in range(table.num_rows)
    ]
    for name in arrays:
        column = table.column(name).combine_chunks()
        offsets = column.offsets.to_numpy()
        values = column.values.to_numpy(zero_copy_only=True)
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        for i, r in enumerate(records):
            if valid[i]:
                shape = (r.num_classes, r.height, r.width) if name == "counts" else (r.height, r.width)
                if name in ("c_hat_levels", "k_levels"):
                    shape = (-1, r.height, r.width)
                setattr(r, name, values[offsets[i] : offsets[i + 1]].reshape(shape))
    return records


RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(VoteRecord))


def records_of(frame: Any) -> Iterable[VoteRecord]:
    """The rows of a DataFrame of vote rows (``analysis.load_votes``'s columns) as VoteRecords, their arrays
    shared, never copied."""
    missing = [c for c in RECORD_FIELDS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"votes DataFrame lacks column(s) {missing}: pass a frame made by analysis.load_votes"
        )
    for row in frame[list(RECORD_FIELDS)].itertuples(index=False, name=None):
        yield VoteRecord(*(v.item() if isinstance(v, np.generic) else v for v in row))


def _file_versions(fs: Any, file: str) -> set[int]:
    """The schema version(s) of one file: its metadata, else the distinct values of its column."""
    schema = pq.read_schema(file, filesystem=fs)
    meta = (schema.metadata or {}).get(VERSION_KEY)
    if meta is not None:
        return {int(meta)}
    if "schema_version" in schema.names:
        return set(
            pq.read_table(file, filesystem=fs, columns=["schema_version"]).column(0).unique().to_pylist()
        )
    return set()


def check_schema_version(
    path: str, *, filesystem: Any = None, storage_options: Mapping[str, Any] | None = None
) -> int | None:
    """The newest schema version of the vote files at ``path`` (None when there are none). Raises
    :class:`SchemaVersionError` when a file has a version this code cannot read, or none (not a vote file)."""
    fs, files = parquet_files(path, filesystem=filesystem, storage_options=storage_options)
    found: set[int] = set()
    for file in files:
        with storage.translate_errors(path, storage_options):
            versions = _file_versions(fs, file)
        if not versions:
            raise SchemaVersionError(
                f"{file} is not a ray_certseg vote file (no schema version): "
                "use a new --output or --overwrite"
            )
        other = sorted(versions - set(READABLE_VERSIONS))
        if other:
            raise SchemaVersionError(
                f"{path} was written with schema version {other[0]}; this reads versions "
                f"{list(READABLE_VERSIONS)}: use a new --output or --overwrite"
            )
        found.update(versions)
    return max(found) if files else None
