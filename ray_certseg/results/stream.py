"""The one chunked path from stored votes to pooled sums: plan the vote files (keys of every row: duplicates,
like-for-like left-outs), map chunks of rows to per-image records, fold them into pools."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ray_certseg import votes
from ray_certseg.job import rundir
from ray_certseg.job.rundir import RunDir
from ray_certseg.results import aggregate
from ray_certseg.results.aggregate import PER_IMAGE_SCHEMA
from ray_certseg.results.image_records import Records

log = logging.getLogger("ray_certseg")


CHUNK_BYTES = 64 * 1024**2
"""About how much one chunk of the reducer holds: the vote rows it reads plus the records it makes of them."""


MAX_CHUNK_ROWS = 1024


ENGINES = ("auto", "local", "ray")


KEY_COLUMNS = ["image_id", "dataset", "method", "sigma", "num_classes"]


def record_bytes(num_classes: int) -> int:
    """About the bytes of one per-image record: three (C+1)^2 int64 confusion matrices and the rest."""
    return 3 * 8 * (num_classes + 1) ** 2 + 512


@dataclass(frozen=True)
class VoteFile:
    """One vote file as the reducer reads it: its rows in chunks of ``chunk_rows``, without the rows in
    ``skip`` (duplicates of rows seen earlier: a defect upstream)."""

    index: int
    path: str
    chunk_rows: int
    skip: tuple[int, ...] = ()


@dataclass
class VotePlan:
    """What the reducer knows from the keys of every vote row (read before any map): the files to certify,
    and the images like-for-like pooling leaves out (:func:`ray_certseg.results.aggregate.left_out`)."""

    files: list[VoteFile]
    left_out: pd.DataFrame
    widest: int  # the largest num_classes


def plan_votes(fs: Any, paths: Sequence[str], records_per_row: int) -> VotePlan:
    """First pass of the reducer: the key columns (image_id, dataset, method, sigma, num_classes) of every vote
    row, never its maps. Duplicated (image, method, sigma) rows are counted once (the first in file order)."""
    frames, sizes = [], []
    for i, path in enumerate(paths):
        meta = pq.read_metadata(path, filesystem=fs)
        t = pq.read_table(path, filesystem=fs, columns=KEY_COLUMNS, partitioning=None)
        frame = t.to_pandas()
        frame["file"], frame["row"] = i, np.arange(t.num_rows)
        frames.append(frame)
        sizes.append(
            sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)) / max(1, t.num_rows)
        )
    keys = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=[*KEY_COLUMNS, "file", "row"])
    )
    dup = keys.duplicated(aggregate.VOTE_ROW_KEY).to_numpy()
    if dup.any():
        log.warning("%d duplicated vote rows (same image, method, sigma) ignored", int(dup.sum()))
    skip = keys[dup].groupby("file")["row"].agg(tuple).to_dict()
    widest = int(keys["num_classes"].max()) if len(keys) else 1
    record = records_per_row * record_bytes(widest)
    files = [
        VoteFile(
            i, path, max(1, min(MAX_CHUNK_ROWS, int(CHUNK_BYTES // (sizes[i] + record)))), skip.get(i, ())
        )
        for i, path in enumerate(paths)
    ]
    return VotePlan(files, aggregate.left_out(keys[~dup]), widest)


def plan_run(run: RunDir, records_per_row: int) -> VotePlan:
    """:func:`plan_votes` of the run folder's ``votes/`` (none when it has no vote files)."""
    fs, files = run.vote_files()
    with run.io(rundir.VOTES):
        return plan_votes(fs, files, records_per_row)


def certify_file(fs: Any, item: VoteFile, records: Records) -> Iterator[pa.Table]:
    """The per-image records of one vote file, one chunk (``item.chunk_rows`` vote rows) at a time: the unit of
    work of the reducer, in this process or in a Ray Data stage."""
    source = pq.ParquetFile(fs.open_input_file(item.path))
    names = source.schema_arrow.names
    columns = [c for c in dict.fromkeys([*votes.SCALAR_COLUMNS, *records.columns]) if c in names]
    skip, start = np.asarray(item.skip, dtype=np.int64), 0
    for batch in source.iter_batches(batch_size=item.chunk_rows, columns=columns):
        table = pa.Table.from_batches([batch])
        if skip.size:
            table = table.filter(pa.array(~np.isin(np.arange(start, start + table.num_rows), skip)))
        start += batch.num_rows
        yield records(table)


class CertifyFiles:
    """Ray Data UDF of the reducer stage: vote files in (one per call), their chunks of per-image records out."""

    def __init__(self, run: RunDir, records: Records):
        self.fs, self.records = run.pyarrow_filesystem()[0], records

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        for spec in batch["item"]:
            yield from certify_file(self.fs, VoteFile(**json.loads(spec)), self.records)


def chunks(run: RunDir, vote_plan: VotePlan, records: Records, engine: str = "local") -> Iterator[pa.Table]:
    """The per-image records of every planned vote file, chunk by chunk, in file order: in this process
    (``local``) or as a Ray Data stage (``ray``: an actor pool over the files, streamed to the driver in the
    same order with ``preserve_order``; Ray Data may cut the records into other blocks, which neither the
    pool's exact sums nor per_image.parquet's fixed row groups depend on)."""
    if engine == "local":
        fs = run.pyarrow_filesystem()[0]
        for item in vote_plan.files:
            yield from certify_file(fs, item, records)
        return
    if engine != "ray":
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    import ray

    if not vote_plan.files:
        return
    items = [{"item": json.dumps(dataclasses.asdict(f))} for f in vote_plan.files]
    context = ray.data.DataContext.get_current()
    kept, context.execution_options.preserve_order = context.execution_options.preserve_order, True
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            CertifyFiles,
            fn_constructor_args=(run, records),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(
                min_size=1, max_size=max(1, min(len(items), int(ray.cluster_resources().get("CPU", 1))))
            ),
            num_cpus=0.5,
        )
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield block.cast(PER_IMAGE_SCHEMA)
    finally:
        context.execution_options.preserve_order = kept


@dataclass
class FramePlan(VotePlan):
    """:class:`VotePlan` of vote rows already in memory (a ``load_votes`` DataFrame): the rows, deduplicated."""

    frame: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)
    chunk_rows: int = 1


def plan_frame(frame: pd.DataFrame, records_per_row: int) -> FramePlan:
    """:func:`plan_votes` for a DataFrame of vote rows: duplicated (image, method, sigma) rows counted once (the
    first), the like-for-like left-outs from the keys, and chunks of about CHUNK_BYTES of maps and records."""
    if not len(frame):
        return FramePlan([], aggregate.left_out(pd.DataFrame(columns=KEY_COLUMNS)), 1, frame, 1)
    dup = frame.duplicated(aggregate.VOTE_ROW_KEY).to_numpy()
    if dup.any():
        log.warning("%d duplicated vote rows (same image, method, sigma) ignored", int(dup.sum()))
    frame = frame[~dup]
    widest = int(frame["num_classes"].max())
    first = frame.iloc[0]
    row_bytes = sum(getattr(first[c], "nbytes", 0) for c in votes.ARRAY_COLUMNS if c in frame.columns)
    rows = max(
        1, min(MAX_CHUNK_ROWS, int(CHUNK_BYTES // (row_bytes + records_per_row * record_bytes(widest))))
    )
    return FramePlan([], aggregate.left_out(frame[KEY_COLUMNS]), widest, frame, rows)


def votes_location(run: RunDir) -> str:
    """``<output>/votes`` for an output folder, else the folder's own URL (a votes folder or one vote file)."""
    return run.votes if not run.url.endswith(".parquet") and run.exists(rundir.VOTES) else run.url


def source_files(run: RunDir) -> tuple[Any, list[str]]:
    """(pyarrow filesystem, vote files) of an output folder (its ``votes/``), a votes folder or one file."""
    source = votes_location(run)
    fs, files = votes.parquet_files(source, storage_options=run.storage_options)
    if not files:
        raise FileNotFoundError(f"no vote files (*.parquet) at {source}: pass a job's output folder")
    return fs, files


VoteSource = RunDir | str | pd.DataFrame
"""Where a results step reads vote rows from: an output folder, a votes folder or one vote file (local or
``s3://``), read file by file and chunk by chunk; or a ``load_votes`` DataFrame already in memory."""


def plan_source(source: VoteSource, records_per_row: int) -> VotePlan:
    """The first pass of :func:`fold` (:func:`plan_votes` or :func:`plan_frame`): keys only, never maps."""
    if isinstance(source, pd.DataFrame):
        return plan_frame(source, records_per_row)
    run = RunDir.of(source)
    fs, files = source_files(run)
    with run.io():
        return plan_votes(fs, files, records_per_row)


def source_chunks(
    source: VoteSource, vote_plan: VotePlan, records: Records, engine: str = "local"
) -> Iterator[pa.Table]:
    """The per-image records of every planned vote row, chunk by chunk (:func:`chunks` for files)."""
    if isinstance(vote_plan, FramePlan):
        frame = vote_plan.frame
        for start in range(0, len(frame), vote_plan.chunk_rows):
            yield records.from_records(votes.records_of(frame.iloc[start : start + vote_plan.chunk_rows]))
        return
    yield from chunks(RunDir.of(source), vote_plan, records, engine)


def fold(
    source: VoteSource,
    records: Records,
    *,
    pooling: str = "common",
    engine: str = "local",
    splits: Mapping[str, Callable[[pa.Table], pa.Array] | None] | None = None,
    each: Callable[[pa.Table], None] | None = None,
    vote_plan: VotePlan | None = None,
) -> tuple[dict[str, aggregate.Pool], VotePlan]:
    """The one chunked path from stored votes to dataset rows, which every results step takes (the reducer,
    ``recertify``, the curves, the threshold sweep, the plots, the report): the keys of every vote row first
    (:func:`plan_source`: duplicates, like-for-like left-outs), then the records of ``records`` chunk by chunk,
    each chunk passed to ``each`` (e.g. a file writer) and folded into one :class:`ray_certseg.results.aggregate.Pool`
    per split. Memory: one chunk, the keys and the pools' sums, never every vote row.

    ``splits``: name -> a mask of the chunk's records to pool there (None: all); default one split ``all``.
    ``vote_plan``: the first pass, when the caller made it already. Returns (the pools by split name, the plan)."""
    vote_plan = vote_plan if vote_plan is not None else plan_source(source, records.per_row)
    splits = splits if splits is not None else {"all": None}
    pools = {name: aggregate.Pool(pooling, vote_plan.left_out) for name in splits}
    for chunk in source_chunks(source, vote_plan, records, engine):
        if each is not None:
            each(chunk)
        for name, mask in splits.items():
            pools[name].add(chunk if mask is None else chunk.filter(mask(chunk)))
    return pools, vote_plan
