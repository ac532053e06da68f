"""A job's output in pandas: vote rows and metrics as DataFrames, and re-certification at any (tau, alpha,
correction) without resampling. Certified accuracy against the radius is in :mod:`ray_certseg.results.curves`;
both are re-exported as :mod:`ray_certseg.analysis`.

The metrics are the reducer's (:func:`ray_certseg.results.image_records.image_rows`,
:class:`~ray_certseg.results.aggregate.Pool`): certified accuracy counts abstentions as wrong, confusion matrices are
pooled over the images.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ray_certseg import votes
from ray_certseg.certify import CORRECTIONS
from ray_certseg.config import DatasetConfig, JobConfig
from ray_certseg.job import rundir
from ray_certseg.job.rundir import RunDir
from ray_certseg.results import aggregate, image_records, reduce, stream, tables
from ray_certseg.sampling import ESTIMATION, noise_seed, sample_seed, to_tensor_image

log = logging.getLogger("ray_certseg")

RECORD_FIELDS = votes.RECORD_FIELDS
CERTIFY_COLUMNS = ["label", "c_hat", "k", "clean_pred"]


# ------------------------------------------------------------------------------------------------- loading
def votes_dir(path: RunDir | str, storage_options: Mapping[str, Any] | None = None) -> str:
    """``<output>/votes`` for an output folder, else ``path`` itself (a votes folder or one Parquet file)."""
    return stream.votes_location(RunDir.of(path, storage_options))


def _vote_files(run: RunDir) -> tuple[Any, list[str], str]:
    """(pyarrow filesystem, vote files, where they are) of an output folder, a votes folder or one file."""
    fs, files = stream.source_files(run)
    return fs, files, votes_dir(run)


def load_votes(
    path: RunDir | str,
    *,
    columns: Iterable[str] | None = None,
    image_ids: Iterable[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Vote rows as a DataFrame, one row per (image, method, sigma), the columns of
    :class:`~ray_certseg.votes.VoteRecord`. For a run that fits in memory; the results steps stream instead.

    Args:
        path: an output folder, its ``votes/`` folder or one vote file (local or ``s3://``).
        columns: the per-pixel columns to read (default all; ``[]``: ids and scalars only).
        image_ids: read only these images (a Parquet filter: other rows are never decoded).

    Returns:
        The rows. Per-pixel columns (``label``, ``c_hat``, ``k``, ``clean_pred``: (H, W); ``counts``:
        (C, H, W) or None) hold zero-copy, read-only numpy views of the Arrow buffers (copy before changing)."""
    wanted = list(votes.ARRAY_COLUMNS) if columns is None else list(columns)
    unknown = sorted(set(wanted) - set(votes.ARRAY_COLUMNS))
    if unknown:
        raise ValueError(
            f"load_votes: unknown column(s) {unknown}; the per-pixel columns are {votes.ARRAY_COLUMNS}"
        )
    run = RunDir.of(path, storage_options)
    fs, files, _ = _vote_files(run)
    selected = list(votes.SCALAR_COLUMNS) + [c for c in votes.ARRAY_COLUMNS if c in wanted]
    filters = None if image_ids is None else [("image_id", "in", sorted(set(image_ids)))]
    with run.io():
        tables = [
            pq.read_table(f, filesystem=fs, columns=selected, filters=filters, partitioning=None)
            for f in files
        ]
    records = votes.read_votes(pa.concat_tables(tables, promote_options="permissive"), columns=wanted)
    frame: dict[str, Any] = {}
    for name in RECORD_FIELDS:
        values = [getattr(r, name) for r in records]
        if name in votes.ARRAY_COLUMNS:  # filled element-wise: numpy must not stack equal-shaped maps
            column = np.empty(len(values), dtype=object)
            for i, value in enumerate(values):
                column[i] = value
            values = column
        frame[name] = values
    return pd.DataFrame(frame)


def load_metrics(
    path: RunDir | str, *, per_image: bool = False, storage_options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """The dataset metrics of a run, or its per-image records.

    Args:
        path: an output folder (local or ``s3://``), its metrics folder or the Parquet file.
        per_image: read ``per_image.parquet`` instead of ``metrics.parquet``.

    Returns:
        One row per dataset, method, sigma and grid point; with ``per_image`` one per image too, in canonical
        order (image, method, sigma, point). List columns (``iou_per_class``, ``confusion``...) hold arrays."""
    run = RunDir.of(path, storage_options)
    name = "per_image.parquet" if per_image else "metrics.parquet"
    if run.url.endswith(".parquet"):
        parts: tuple[str, ...] = ()
    else:
        parts = (rundir.METRICS, name) if run.exists(rundir.METRICS, name) else (name,)
    if not run.exists(*parts):
        raise FileNotFoundError(
            f"no {name} at {run.url}: run `ray-certseg reduce {run.url}` (or the job) first"
        )
    frame = run.read_table(*parts).to_pandas()
    return aggregate.canonical_order(frame) if per_image else frame


def load_config(path: RunDir | str, *, storage_options: Mapping[str, Any] | None = None) -> JobConfig:
    """The job configuration recorded in ``<output>/config.json``.

    Args:
        path: the output folder.
        storage_options: the folder's options; they replace the recorded job-level ones, which config.json
            holds redacted (the dataset's reads use them).

    Returns:
        The validated :class:`~ray_certseg.config.JobConfig`."""
    run = RunDir.of(path, storage_options)
    if not run.exists(rundir.CONFIG):
        raise FileNotFoundError(f"no config.json in {run.url}: pass the output folder of a `ray-certseg run`")
    data = run.read_json(rundir.CONFIG)
    data["dataset"] = DatasetConfig.upgrade_recorded(data.get("dataset") or {})
    if storage_options is not None or isinstance(path, RunDir):  # the folder's own options are the real ones
        data["storage_options"] = dict(run.storage_options)
    return JobConfig.from_dict(data)


# -------------------------------------------------------------------------------------------- certification
records = votes.records_of
"""The rows of a :func:`load_votes` DataFrame as VoteRecords (arrays shared, never copied)."""


def _values(name: str, value: float | str | Sequence[Any]) -> tuple[Any, ...]:
    out = (value,) if isinstance(value, (int, float, str)) else tuple(value)
    if not out:
        raise ValueError(f"{name}: give at least one value")
    return out


def source_of(
    votes_source: stream.VoteSource, storage_options: Mapping[str, Any] | None
) -> stream.VoteSource:
    """The vote source that :func:`ray_certseg.results.stream.fold` reads: a DataFrame as it is, a path as its
    RunDir (with ``storage_options``)."""
    if isinstance(votes_source, pd.DataFrame):
        return votes_source
    if isinstance(votes_source, (str, RunDir)):
        return RunDir.of(votes_source, storage_options)
    raise TypeError(f"votes must be a load_votes DataFrame or a path, got {type(votes_source).__name__}")


def recertify(
    votes_source: stream.VoteSource,
    *,
    tau: float | Sequence[float] = 0.75,
    alpha: float | Sequence[float] = 0.001,
    correction: str | Sequence[str] = "holm",
    procedures: Sequence[Any] = ("segcertify",),
    pooling: str = "common",
    storage_options: Mapping[str, Any] | None = None,
) -> reduce.ReduceResult:
    """Certify the stored votes again at every point of ``procedures`` (entries as in ``certify.procedures``;
    SegCertify by default) over the shared grid ``tau`` x ``alpha`` x ``correction``, and pool per (dataset,
    method, sigma, point): the reducer's per-image records and metrics (same columns, same numbers as
    ``ray-certseg reduce OUTPUT --tau ... --alpha ...``), computed in this process, nothing written and no
    resampling.

    Args:
        votes_source: a :func:`load_votes` DataFrame, or an output / votes folder / vote file (local or
            ``s3://``), read chunk by chunk (:func:`ray_certseg.results.stream.fold`): memory holds one chunk of
            vote rows, never the run.
        tau, alpha, correction: scalars or sequences; their product is the shared grid.
        procedures: entries as in the config's ``certify.procedures``.
        pooling: ``common`` (like for like) or ``all``.

    Returns:
        A :class:`ray_certseg.results.reduce.ReduceResult`: ``metrics`` (one row per dataset, method, sigma and
        point), ``per_image`` (the records, canonical order), ``summary_markdown`` and ``left_out``."""
    corrections = _values("correction", correction)
    bad = [c for c in corrections if c not in CORRECTIONS]
    if bad:
        raise ValueError(f"correction {bad[0]!r} is not one of {CORRECTIONS}")
    grid = image_records.Grid(
        tuple(float(t) for t in _values("tau", tau)),
        tuple(float(a) for a in _values("alpha", alpha)),
        corrections,
        tuple(procedures),
    )
    if pooling not in aggregate.POOLINGS:
        raise ValueError(f"pooling must be one of {aggregate.POOLINGS}, got {pooling!r}")
    kept: list[pa.Table] = []  # per-image records (small: matrices, not maps)
    pools, vote_plan = stream.fold(
        source_of(votes_source, storage_options),
        image_records.GridRecords(grid),
        pooling=pooling,
        each=kept.append,
    )
    acc = pools["all"]
    metrics = acc.metrics() if not acc.empty else pd.DataFrame(columns=aggregate.GROUP_KEY)
    per_image = aggregate.canonical_order(
        pa.concat_tables(kept).to_pandas() if kept else aggregate.PER_IMAGE_SCHEMA.empty_table().to_pandas()
    )
    left = vote_plan.left_out if pooling == "common" and not acc.empty else None
    return reduce.ReduceResult(per_image, metrics, tables.summary_markdown(metrics, 0, left), left)


def noisy_sample(
    image: np.ndarray, *, sigma: float, seed: int, image_id: str, index: int = 0, stage: int = ESTIMATION
) -> torch.Tensor:
    """x + sigma * eps for draw ``index`` of ``stage`` (default: the first estimation draw) of the job's
    ``count_votes``: eps ~ N(0, I) from a CPU ``torch.Generator`` seeded with
    sample_seed(noise_seed(seed, image_id, sigma), stage, index). ``image``: uint8 (H, W, 3); returns float32
    (3, H, W) in [0, 1] space (not clipped). Bit-identical to the job's draw when the job sampled on the CPU
    (a CUDA generator draws other numbers from the same seed)."""
    x = to_tensor_image(image)
    generator = torch.Generator().manual_seed(sample_seed(noise_seed(seed, image_id, sigma), stage, index))
    return x + float(sigma) * torch.empty_like(x).normal_(generator=generator)
