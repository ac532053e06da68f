"""The reducer: certify stored votes at every configured point (certification procedure x parameters; SegCertify
over the (tau, alpha, correction) grid by default), per image, then pool per dataset.

No resampling: a vote row (c_hat, k per pixel, plus n) is all CERTIFY needs, so the grid can be changed and the
reducer re-run at will (``ray-certseg reduce OUTPUT --tau 0.95``). Per vote row and grid point it makes one small
record (the (C+1) x (C+1) confusion matrix with abstain, the pixel counts): ``metrics/per_image.parquet``. Pooled
per (dataset, method, sigma, tau, alpha, correction) as SegCertify pools: ``metrics/metrics.parquet``, ``.csv``
and ``summary.md``.

It streams (:func:`reduce_output`): the key columns of every vote row first (duplicates, like-for-like
left-outs), then the vote files chunk by chunk, in this process or as a Ray Data stage; each chunk's records
go to per_image.parquet and into :class:`ray_certseg.results.aggregate.Pool`'s sums, so the driver holds a chunk, the
sums (O(groups x C^2)) and the row keys, never every record. Output is a deterministic function of the vote
files (file order, exact sums, fixed row groups, no timestamps): a re-run over the same votes, in either
engine, writes byte-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import posixpath
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ray_certseg import certify, votes
from ray_certseg.certify import ABSTAIN, max_tau, min_n
from ray_certseg.job import rundir
from ray_certseg.job.rundir import RunDir
from ray_certseg.results import aggregate
from ray_certseg.results.aggregate import PER_IMAGE_SCHEMA
from ray_certseg.results.metrics import ImageStats, flat_level_stats, image_stats, level_stats

log = logging.getLogger("ray_certseg")

POINT_COLUMNS = ("tau", "alpha", "correction")
"""Parameters copied from a point into their own columns (null where the procedure has no such parameter), so
SegCertify rows read as they always did."""
SUMMARY_COLUMNS = [
    "dataset",
    "method",
    "sigma",
    "correction",
    "tau",
    "alpha",
    "radius",
    "certified_accuracy",
    "certified_error",
    "miou",
    "abstain_rate",
    "cig",
    "clean_accuracy",
    "clean_miou",
    "images",
    "seconds_per_image",
]


@dataclass(frozen=True)
class Grid:
    """What the reducer certifies each vote row at: the shared (tau, alpha, correction) grid and the
    certification procedures (entries of ``certify.procedures``; SegCertify alone by default), each expanded
    to its points by :func:`ray_certseg.certify.points`."""

    taus: tuple[float, ...]
    alphas: tuple[float, ...]
    corrections: tuple[str, ...]
    procedures: tuple[Any, ...] = ("segcertify",)

    def points(self) -> tuple[certify.Point, ...]:
        shared = {"taus": self.taus, "alphas": self.alphas, "corrections": self.corrections}
        return certify.points(self.procedures, shared)

    def __iter__(self):
        return iter(self.points())


class SegCertifyCounts:
    """One vote row's labelled pixels counted by (true class g, c_hat, k), H[g, c, j], and every pixel by k,
    h[j]. SegCertify certifies a pixel by its k alone (``certify.reject_by_votes``: reject[j] from h), so at
    any (tau, alpha, correction) the confusion matrix of its certified map is

        M[g, c] = sum_j H[g, c, j] reject[j]   (c < C),      M[g, C] = sum_{c, j} H[g, c, j] (1 - reject[j]),

    with (C+1) x (C+1) sums and no pass over the pixels per point: a grid or a curve of many taus costs one
    pass per row. Equal, integer for integer, to :func:`image_stats` of ``certify()``'s map (tested)."""

    def __init__(self, rec: votes.VoteRecord):
        C, n = rec.num_classes, rec.n
        label, c_hat, k = (np.asarray(a).reshape(-1) for a in (rec.label, rec.c_hat, rec.k))
        certify.check_votes(c_hat, k, n=n, num_classes=C)
        self.n, self.num_pixels, self.num_classes = n, k.size, C
        keep = label != rec.ignore_index
        index = (label[keep].astype(np.int64) * C + c_hat[keep]) * (n + 1) + k[keep]
        self.counts = np.bincount(index, minlength=C * C * (n + 1)).reshape(C, C, n + 1)
        self.histogram = certify.vote_histogram(k, n)

    def vote_stats(self) -> ImageStats:
        """:func:`image_stats` of c_hat itself (the majority vote)."""
        return self._stats(self.counts.sum(axis=2), np.zeros(self.num_classes, dtype=np.int64), 0)

    def stats(self, params: certify.SegCertifyParams) -> tuple[ImageStats, int]:
        """(:func:`image_stats` of the certified map, its certified pixel count) at ``params``."""
        p = params
        reject = certify.reject_by_votes(
            self.histogram, n=self.n, tau=p.tau, alpha=p.alpha, correction=p.correction
        )
        certified = self.counts @ reject.astype(np.int64)
        abstained = (self.counts @ (~reject).astype(np.int64)).sum(axis=1)
        num_certified = int(self.histogram[reject].sum())
        return self._stats(certified, abstained, self.num_pixels - num_certified), num_certified

    def _stats(self, certified: np.ndarray, abstained: np.ndarray, num_abstained: int) -> ImageStats:
        C = self.num_classes
        confusion = np.zeros((C + 1, C + 1), dtype=np.int64)
        confusion[:C, :C], confusion[:C, C] = certified, abstained
        return ImageStats(confusion=confusion, num_pixels=self.num_pixels, num_abstained=num_abstained)


def image_rows(rec: votes.VoteRecord, grid: Grid | Sequence[certify.Point]) -> list[dict[str, Any]]:
    """One record per point for one vote row: the point's certified map and the confusion matrices of the
    certified map, of the clean prediction and of the majority vote c_hat. SegCertify's points are counted
    from :class:`SegCertifyCounts` (one pass over the row for all of them), the others from their map."""
    C, ignore = rec.num_classes, rec.ignore_index
    points = tuple(grid)
    clean = image_stats(rec.label, rec.clean_pred, C, ignore)  # checks the labels first
    counted = SegCertifyCounts(rec) if any(p.procedure is certify.SEGCERTIFY for p in points) else None
    vote = counted.vote_stats() if counted is not None else image_stats(rec.label, rec.c_hat, C, ignore)
    rows = []
    flat = (np.arange(C)[None], np.ones((1, C), dtype=np.int64))
    for point in points:
        if point.procedure is certify.SEGCERTIFY:
            st, num_certified = counted.stats(point.params)
            radius = certify.radius(rec.sigma, point.params.tau)
            lv, num_abstained = flat_level_stats(st.confusion), st.num_abstained
        else:
            cert = point.run(rec)
            radius, num_certified = cert.radius, cert.num_certified
            level = getattr(cert, "level", None)
            tree = getattr(cert, "hierarchy", None)
            fine = cert.labels if level is None else np.where(level == 0, cert.labels, ABSTAIN)
            st = image_stats(rec.label, fine, C, ignore)  # a coarse certificate is no fine one: abstain here
            if level is None and tree is None:  # flat: every level figure follows from the confusion matrix
                lv = flat_level_stats(st.confusion)
            else:
                lv = level_stats(
                    rec.label, cert.labels, level, *(flat if tree is None else tree.tables), ignore
                )
            num_abstained = int(np.count_nonzero(cert.labels == ABSTAIN))
        params = point.params.model_dump()
        rows.append(
            {
                "image_id": rec.image_id,
                "dataset": rec.dataset,
                "method": rec.method,
                "denoiser": rec.denoiser,
                "segmenter": rec.segmenter,
                "sigma": rec.sigma,
                "procedure": point.procedure.name,
                "params": point.key,
                **{name: params.get(name) for name in POINT_COLUMNS},
                "n0": rec.n0,
                "n": rec.n,
                "num_classes": C,
                "radius": float(radius),
                "num_certified": int(num_certified),
                "family_size": rec.c_hat.size,
                "certifiable": point.can_certify(rec),
                "num_pixels": st.num_pixels,
                "num_abstained": num_abstained,
                "num_labelled": lv.num_labelled,
                "num_correct": lv.num_correct,
                "info_gain": lv.info_gain,
                "level_pixels": lv.pixels,
                "level_certified": lv.certified,
                "level_wrong": lv.wrong,
                "confusion": st.confusion.reshape(-1),
                "clean_confusion": clean.confusion.reshape(-1),
                "vote_confusion": vote.confusion.reshape(-1),
                "sample_seconds": rec.sample_seconds,
            }
        )
    return rows


def record_columns(points: Sequence[certify.Point]) -> list[str]:
    """The vote array columns :func:`image_rows` reads for ``points``: the label, c_hat, the clean
    prediction, and whatever the points' procedures read."""
    return list(dict.fromkeys(["label", "c_hat", "clean_pred", *certify.columns(points)]))


def certify_table(table: pa.Table, grid: Grid | Sequence[certify.Point]) -> pa.Table:
    """Vote rows (Arrow) -> per-image records (Arrow): :class:`GridRecords` of the grid on one table."""
    return GridRecords(grid)(table)


CHUNK_BYTES = 64 * 1024**2
"""About how much one chunk of the reducer holds: the vote rows it reads plus the records it makes of them."""
MAX_CHUNK_ROWS = 1024
PER_IMAGE_GROUP_BYTES = 16 * 1024**2
"""About the size of a row group of per_image.parquet (a fixed number of records, from the widest record)."""
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
    dup = keys.duplicated(aggregate.ROW).to_numpy()
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


class Records(Protocol):
    """A map from vote rows to per-image records (:class:`GridRecords`, ``curves.CurveRecords``): the map of
    the one chunked path (:func:`fold`)."""

    columns: list[str]  # the vote array columns it reads
    per_row: int  # records per vote row, for the chunk size

    def from_records(self, recs: Iterable[votes.VoteRecord]) -> pa.Table: ...

    def __call__(self, table: pa.Table) -> pa.Table: ...


class GridRecords:
    """Vote rows -> their per-image records at every point of a grid (:func:`image_rows`); the vote columns
    it reads in ``columns``. The map of the reducer, of ``recertify`` and of the threshold sweep."""

    def __init__(self, grid: Grid | Sequence[certify.Point]):
        self.points = tuple(grid)
        self.columns = record_columns(self.points)
        self.per_row = len(self.points)

    def from_records(self, recs: Iterable[votes.VoteRecord]) -> pa.Table:
        rows = [r for rec in recs for r in image_rows(_require_maps(rec, self.columns), self.points)]
        return pa.Table.from_pylist(rows, schema=PER_IMAGE_SCHEMA)

    def __call__(self, table: pa.Table) -> pa.Table:
        return self.from_records(votes.read_votes(table, columns=self.columns))


def _require_maps(rec: votes.VoteRecord, columns: Sequence[str]) -> votes.VoteRecord:
    absent = [c for c in columns if c in ("label", "c_hat", "k", "clean_pred") and getattr(rec, c) is None]
    if absent:
        raise ValueError(
            f"vote row {rec.image_id}/{rec.method}/sigma={rec.sigma} has no {absent}: load the votes with "
            f"columns including {[c for c in columns if c in votes.ARRAY_COLUMNS]}"
        )
    return rec


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


def chunks(run: RunDir, plan_: VotePlan, records: Records, engine: str = "local") -> Iterator[pa.Table]:
    """The per-image records of every planned vote file, chunk by chunk, in file order: in this process
    (``local``) or as a Ray Data stage (``ray``: an actor pool over the files, streamed to the driver in the
    same order with ``preserve_order``; Ray Data may cut the records into other blocks, which neither the
    pool's exact sums nor per_image.parquet's fixed row groups depend on)."""
    if engine == "local":
        fs = run.pyarrow_filesystem()[0]
        for item in plan_.files:
            yield from certify_file(fs, item, records)
        return
    if engine != "ray":
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    import ray

    if not plan_.files:
        return
    items = [{"item": json.dumps(dataclasses.asdict(f))} for f in plan_.files]
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
    dup = frame.duplicated(aggregate.ROW).to_numpy()
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
    source: VoteSource, plan_: VotePlan, records: Records, engine: str = "local"
) -> Iterator[pa.Table]:
    """The per-image records of every planned vote row, chunk by chunk (:func:`chunks` for files)."""
    if isinstance(plan_, FramePlan):
        frame = plan_.frame
        for start in range(0, len(frame), plan_.chunk_rows):
            yield records.from_records(votes.records_of(frame.iloc[start : start + plan_.chunk_rows]))
        return
    yield from chunks(RunDir.of(source), plan_, records, engine)


def fold(
    source: VoteSource,
    records: Records,
    *,
    pooling: str = "common",
    engine: str = "local",
    splits: Mapping[str, Callable[[pa.Table], pa.Array] | None] | None = None,
    each: Callable[[pa.Table], None] | None = None,
    plan_: VotePlan | None = None,
) -> tuple[dict[str, aggregate.Pool], VotePlan]:
    """The one chunked path from stored votes to dataset rows, which every results step takes (the reducer,
    ``recertify``, the curves, the threshold sweep, the plots, the report): the keys of every vote row first
    (:func:`plan_source`: duplicates, like-for-like left-outs), then the records of ``records`` chunk by chunk,
    each chunk passed to ``each`` (e.g. a file writer) and folded into one :class:`ray_certseg.results.aggregate.Pool`
    per split. Memory: one chunk, the keys and the pools' sums, never every vote row.

    ``splits``: name -> a mask of the chunk's records to pool there (None: all); default one split ``all``.
    ``plan_``: the first pass, when the caller made it already. Returns (the pools by split name, the plan)."""
    plan_ = plan_ if plan_ is not None else plan_source(source, records.per_row)
    splits = splits if splits is not None else {"all": None}
    pools = {name: aggregate.Pool(pooling, plan_.left_out) for name in splits}
    for chunk in source_chunks(source, plan_, records, engine):
        if each is not None:
            each(chunk)
        for name, mask in splits.items():
            pools[name].add(chunk if mask is None else chunk.filter(mask(chunk)))
    return pools, plan_


class PerImageWriter:
    """``<into>/per_image.parquet`` written while the records stream by, in row groups of a fixed number of
    records (so the file is the same however the records were chunked)."""

    def __init__(self, run: RunDir, into: str, rows_per_group: int):
        fs, self.path = run.filesystem(into, "per_image.parquet")
        if run.is_local:
            fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        self.run, self.into, self.rows = run, into, rows_per_group
        self.sink = fs.open(self.path, "wb")
        self.writer = pq.ParquetWriter(self.sink, PER_IMAGE_SCHEMA, compression="zstd")
        self.pending: list[pa.Table] = []
        self.buffered = 0

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.buffered += table.num_rows
        if self.buffered >= self.rows:
            rest = pa.concat_tables(self.pending)
            while rest.num_rows >= self.rows:
                self.writer.write_table(rest.slice(0, self.rows))
                rest = rest.slice(self.rows)
            self.pending, self.buffered = [rest], rest.num_rows

    def close(self) -> None:
        if self.buffered:
            self.writer.write_table(pa.concat_tables(self.pending))
        self.writer.close()
        self.sink.close()


ERRORS_SHOWN = 20


def errors_markdown(errors: pa.Table | None) -> str:
    """The failed rows (``errors.parquet``: image_id, method, sigma, stage, error) as a table, at most
    ERRORS_SHOWN of them; an empty string when nothing failed. A ``load`` row stands for all rows of its image."""
    if errors is None or not errors.num_rows:
        return ""
    rows = errors.to_pylist()
    cell = lambda v: "" if v is None or pd.isna(v) else str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| image_id | method | sigma | stage | error |", "|---|---|---|---|---|"]
    lines += [
        "| " + " | ".join(cell(r[k]) for k in ("image_id", "method", "sigma", "stage", "error")) + " |"
        for r in rows[:ERRORS_SHOWN]
    ]
    if len(rows) > ERRORS_SHOWN:
        lines.append(f"\n... and {len(rows) - ERRORS_SHOWN} more in errors.parquet.")
    return "\n".join(lines)


BOUNDS_COLUMNS = [
    "dataset",
    "method",
    "sigma",
    "correction",
    "tau",
    "alpha",
    "radius",
    "certified_accuracy",
    "miou",
    "certified_dice",
    "worst_accuracy",
    "worst_miou",
    "worst_dice",
]
LEFT_OUT_SHOWN = 20


def bounds_markdown(metrics: pd.DataFrame) -> str:
    """Certified Dice and the worst-case lower bounds (metrics.DatasetMetrics), one row per dataset row."""
    if metrics.empty or "worst_miou" not in metrics:
        return ""
    t = _with_procedures(metrics, BOUNDS_COLUMNS)
    for c in BOUNDS_COLUMNS[6:]:
        t[c] = t[c].map(lambda x: f"{x:.3f}")
    lines = ["| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in t.itertuples(index=False)]
    return (
        "\n".join(lines) + "\n\ncertified_dice = mean over classes of 2 tp / (pos + res), an abstention "
        "a false negative (as in the IoU). worst_*: lower bounds over every perturbation within the radius, each "
        "abstained pixel counted as a false negative of its true class and a false positive of the class "
        "scored; they hold per image with probability >= 1 - alpha (all images at once: >= 1 - images * "
        "alpha). Definitions: docs/metrics.md."
    )


def left_out_markdown(left: pd.DataFrame | None, metrics: pd.DataFrame) -> str:
    """How the table pools: like for like (and which images that left out) or every row."""
    if "pooling" in metrics and len(metrics) and (metrics["pooling"] == "all").all():
        return (
            "\n\n**Every row pooled** (`--all-rows`): where a row failed, methods are averaged over "
            "different images."
        )
    if left is None or not len(left):
        return ""
    lines = [
        f"- {r.dataset}, sigma {r.sigma:g}: image `{r.image_id}` (has {r.has}; lacks {r.lacks})"
        for r in left.head(LEFT_OUT_SHOWN).itertuples(index=False)
    ]
    if len(left) > LEFT_OUT_SHOWN:
        lines.append(f"- ... and {len(left) - LEFT_OUT_SHOWN} more")
    return (
        "\n\n**Like for like**: per dataset and sigma, every method is pooled over the images that all "
        f"methods have; {len(left)} (image, sigma) pairs left out because a method's row is missing "
        "(`ray-certseg reduce OUT --all-rows` pools everything):\n" + "\n".join(lines)
    )


HEADLINE_COLUMNS = ["certified_accuracy", "certified_error", "miou", "worst_miou", "abstain_rate"]


def headline_markdown(metrics: pd.DataFrame, grid: Grid, methods: Sequence[str] = (), errors: int = 0) -> str:
    """The table printed at the end of a run: per method and sigma, at the grid's first point (its first
    procedure, first tau, alpha and correction), certified accuracy and error, mIoU, worst-case mIoU and
    abstain rate; then one line per other procedure comparing its mean abstain rate and CIG with the first's
    at the same tau, alpha and correction. ``methods``: the order to show them in (the config's)."""
    if metrics.empty:
        return "No vote rows to certify." + (f" {errors} rows failed: see errors.parquet." if errors else "")
    points = grid.points()
    first = points[0]
    base = _at_point(metrics, first)
    order = {m: i for i, m in enumerate(methods)}
    base = base.sort_values(
        ["dataset", "sigma", "method"], key=lambda c: c.map(order) if c.name == "method" and order else c
    )
    several = base["dataset"].nunique() > 1
    shared = {k: v for k, v in first.params.model_dump().items() if k in POINT_COLUMNS}
    where = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{v}" for k, v in shared.items())
    infeasible = base.get("infeasible_images", pd.Series(0, index=base.index))
    lines = [
        f"{first.procedure.name}{f' ({where})' if where else ''}, the first point of the grid:",
        "",
        "| " + " | ".join(["dataset"] * several + ["sigma", "radius", "method", *HEADLINE_COLUMNS]) + " |",
        "|" + "---|" * (several + 3 + len(HEADLINE_COLUMNS)),
    ]
    for (_, row), bad in zip(base.iterrows(), infeasible):
        cells = [row["dataset"]] * several + [f"{row['sigma']:g}", f"{row['radius']:.3f}", row["method"]]
        cells += [f"{row[c]:.3f}" for c in HEADLINE_COLUMNS]
        if bad:
            cells[-len(HEADLINE_COLUMNS)] += f" ({bad} of {row['images']} images infeasible)"
        lines.append("| " + " | ".join(cells) + " |")
    comparisons = [line for point in points[1:] if (line := _comparison(metrics, base, first, point))]
    lines += [""] + comparisons if comparisons else []
    if errors:
        lines.append(f"\n**{errors} (image, method, sigma) rows failed**: see errors.parquet.")
    return "\n".join(lines)


def _at_point(metrics: pd.DataFrame, point: certify.Point) -> pd.DataFrame:
    return metrics[(metrics["procedure"] == point.procedure.name) & (metrics["params"] == point.key)]


def _comparison(metrics: pd.DataFrame, base: pd.DataFrame, first: certify.Point, point: certify.Point) -> str:
    """One line: ``point``'s mean abstain rate and CIG against the first point's, over the (dataset, method,
    sigma) rows both have; empty for a point of the first procedure or with other shared parameters."""
    shared = lambda p: {k: v for k, v in p.params.model_dump().items() if k in POINT_COLUMNS}
    if point.procedure.name == first.procedure.name or shared(point) != shared(first):
        return ""
    keys = ["dataset", "method", "sigma"]
    both = base.merge(_at_point(metrics, point), on=keys, suffixes=("", "_other"))
    if both.empty:
        return ""
    a, b = both["abstain_rate"].mean(), both["abstain_rate_other"].mean()
    change = f" ({(b - a) / a:+.1%})" if a > 0 else ""
    return (
        f"- {point.procedure.name} {_shown_params(point.procedure.name, point.key)} vs {first.procedure.name}, "
        f"mean of {len(both)} method x sigma rows: abstain rate {a:.3f} -> {b:.3f}{change}, "
        f"CIG {both['cig'].mean():.3f} -> {both['cig_other'].mean():.3f}"
    )


def summary_markdown(metrics: pd.DataFrame, errors: int = 0, left: pd.DataFrame | None = None) -> str:
    """The dataset table a person reads first (also printed by the job); ``left``: :func:`left_out`."""
    if metrics.empty:
        return "No vote rows to certify." + (f" {errors} rows failed: see errors.parquet." if errors else "")
    t = _with_procedures(metrics, SUMMARY_COLUMNS, level_accuracy=True)
    for c in (
        "certified_accuracy",
        "certified_error",
        "miou",
        "abstain_rate",
        "cig",
        "clean_accuracy",
        "clean_miou",
        "level_accuracy",
    ):
        if c in t:
            t[c] = t[c].map(lambda x: f"{x:.3f}")
    infeasible = metrics.get("infeasible_images", pd.Series(0, index=metrics.index))
    t["certified_accuracy"] = [
        f"{a} (infeasible)" if bad == imgs else f"{a} ({bad} of {imgs} images infeasible)" if bad else a
        for a, bad, imgs in zip(t["certified_accuracy"], infeasible, metrics["images"])
    ]
    t["radius"] = t["radius"].map(lambda x: f"{x:.3f}")
    t["seconds_per_image"] = t["seconds_per_image"].map(lambda x: f"{x:.2f}")
    lines = ["| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in t.itertuples(index=False)]
    note = (
        "\n\nCertified accuracy counts abstentions as wrong; certified_error = certified pixels of the wrong "
        "class / labelled pixels; abstain_rate = mean over images of abstained / all pixels (SegCertify). "
        "radius = sigma * Phi^-1(tau), L2 in [0,1] pixel units. cig = certified information gain (Anani et "
        "al. 2024): over the correctly certified pixels, the sum of log C - log |classes under the certified "
        "node|, divided by labelled pixels x log C (for SegCertify it equals certified_accuracy)."
    )
    if "procedure" in metrics and (metrics["procedure"] != "segcertify").any():
        note += (
            " For a hierarchical row, certified_accuracy, miou and the confusion count fine-class certificates "
            "only (a coarser node counts as an abstention there); level_accuracy counts a pixel certified "
            "at its chosen level with a node that holds the true class; abstain_rate counts pixels certified "
            "at no level. Per level: metrics.parquet's *_per_level columns."
        )
    note += infeasible_note(metrics)
    note += left_out_markdown(left, metrics)
    bounds = bounds_markdown(metrics)
    if bounds:
        note += "\n\n" + bounds
    if errors:
        note += f"\n\n**{errors} (image, method, sigma) rows failed**: see errors.parquet."
    return "\n".join(lines) + note


def _with_procedures(
    metrics: pd.DataFrame, columns: list[str], *, level_accuracy: bool = False
) -> pd.DataFrame:
    """``metrics[columns]`` for a table; when a procedure other than SegCertify is there, with ``procedure``
    and (for the others) ``params`` after sigma, and ``-`` for the tau/alpha/correction a procedure lacks."""
    if "procedure" not in metrics or (metrics["procedure"] == "segcertify").all():
        return metrics[columns].copy()
    at = columns.index("sigma") + 1
    columns = columns[:at] + ["procedure", "params"] + columns[at:]
    if level_accuracy and "level_accuracy" in metrics:
        at = columns.index("certified_accuracy") + 1
        columns = columns[:at] + ["level_accuracy"] + columns[at:]
    t = metrics[columns].copy()
    t["params"] = [_shown_params(name, p) for name, p in zip(t["procedure"], t["params"])]
    for c in POINT_COLUMNS:
        t[c] = t[c].astype(object).where(t[c].notna(), "-")
    return t


def _shown_params(procedure: str, params: str) -> str:
    """The point's parameters without those that have their own column (SegCertify's: none left)."""
    if procedure == "segcertify":
        return ""
    rest = {k: v for k, v in json.loads(params).items() if k not in POINT_COLUMNS}
    return json.dumps(rest, sort_keys=True)


def infeasible_note(metrics: pd.DataFrame) -> str:
    """Why rows marked infeasible certify nothing, and what would (``certify.can_certify``): per (n, tau,
    alpha) with an image that cannot certify any pixel, the minimum n for that tau and the largest tau for n,
    at the largest image of the rows (N pixels in the family)."""
    if "infeasible_images" not in metrics or not (metrics["infeasible_images"] > 0).any():
        return ""
    bad = metrics[metrics["infeasible_images"] > 0]
    lines = []
    for (n, tau, alpha), g in bad.groupby(["n", "tau", "alpha"], sort=True):
        pixels = int(g["max_family_size"].max())
        lines.append(
            f"- n = {int(n)}, tau = {tau:g}, alpha = {alpha:g}, N = {pixels} pixels: no pixel can be "
            f"certified, whatever the model (tau^n > alpha / N). Needs n >= {min_n(tau, alpha, pixels)} "
            f"for this tau, or tau <= {math.floor(max_tau(int(n), alpha, pixels) * 1000) / 1000:.3f} for this n."
        )
    return (
        "\n\n**Infeasible rows** (certified accuracy 0 and abstain rate 1 there say nothing about the "
        "model):\n" + "\n".join(lines)
    )


class ReduceResult:
    """What a reduction made: the dataset rows (``metrics``), the summary, the images like-for-like pooling
    left out (None for ``pooling="all"``) and the per-image records, in canonical order
    (:func:`ray_certseg.results.aggregate.canonical_order`). A streamed reduction (:func:`reduce_output`) never held
    the records: ``per_image`` reads them back from the file it wrote, on first use."""

    def __init__(
        self,
        per_image: pd.DataFrame | Callable[[], pd.DataFrame],
        metrics: pd.DataFrame,
        summary_markdown: str,
        left_out: pd.DataFrame | None = None,
    ):
        self._per_image = per_image
        self.metrics, self.summary_markdown, self.left_out = metrics, summary_markdown, left_out

    @property
    def per_image(self) -> pd.DataFrame:
        if callable(self._per_image):
            self._per_image = self._per_image()
        return self._per_image


def grid_record(grid: Grid, pooling: str = "common") -> dict[str, Any]:
    """What a reduction certified: every point (procedure name and canonical params) and the pooling; two
    reductions with equal records have equal rows."""
    return {"points": [[p.procedure.name, p.key] for p in grid.points()], "pooling": pooling}


def reduction_name(grid: Grid, pooling: str = "common") -> str:
    """A folder name for a re-reduction, readable and unique per grid: ``tau0.6-0.75_alpha0.001_holm-bonferroni``,
    followed by the procedures' names when they are not SegCertify alone (``..._segcertify-hierarchical``),
    ``_all-rows`` for ``pooling="all"``, and the first 8 hex digits of the sha256 of :func:`grid_record`
    (so thresholds or other procedure parameters that the readable part omits still give another folder)."""
    join = lambda values: "-".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    name = f"tau{join(grid.taus)}_alpha{join(grid.alphas)}_{join(grid.corrections)}"
    procedures = list(dict.fromkeys(p.procedure.name for p in grid.points()))
    if procedures != ["segcertify"]:
        name += f"_{join(procedures)}"
    if pooling == "all":
        name += "_all-rows"
    digest = hashlib.sha256(json.dumps(grid_record(grid, pooling), sort_keys=True).encode()).hexdigest()
    return f"{name}_{digest[:8]}"


def check_reduction_folder(run: RunDir, into: str, record: dict[str, Any]) -> None:
    """Refuse to reduce into ``<into>/`` (a re-reduction's folder, never the run's own metrics/) when it
    holds a reduction of another grid, or files without a record of their grid: the new rows would replace
    rows that were not theirs."""
    if into == rundir.METRICS or not run.files(into, suffix=""):
        return
    found = run.read_json(into, rundir.INPUTS).get("grid") if run.exists(into, rundir.INPUTS) else None
    if found != json.loads(json.dumps(record)):
        what = "another grid" if found is not None else "files without a record of their grid"
        raise ValueError(
            f"{run.path(into)} holds {what}; reducing there would replace its rows. Pass --name NAME "
            "to write this reduction to reductions/NAME, or remove that folder"
        )


def grid_from_output(run: RunDir | str, taus, alphas, corrections, procedures=None) -> Grid:
    """The run's grid (``config.json``'s certify section), each part replaced by the one given."""
    run = RunDir.of(run)
    cfg = run.read_json(rundir.CONFIG).get("certify", {}) if run.exists(rundir.CONFIG) else {}
    taus = taus or cfg.get("taus")
    alphas = alphas or cfg.get("alphas")
    corrections = corrections or cfg.get("corrections") or ["holm"]
    procedures = procedures or cfg.get("procedures") or ["segcertify"]
    if not taus or not alphas:
        raise ValueError(f"{run.url}: no config.json with certify.taus/alphas; pass --tau and --alpha")
    grid = Grid(
        tuple(float(t) for t in taus), tuple(float(a) for a in alphas), tuple(corrections), tuple(procedures)
    )
    grid.points()  # every entry valid, before anything is read
    return grid


def reduce_output(
    output: RunDir | str,
    *,
    storage_options: dict | None = None,
    taus: Sequence[float] | None = None,
    alphas: Sequence[float] | None = None,
    corrections: Iterable[str] | None = None,
    procedures: Sequence[Any] | None = None,
    errors: pa.Table | None = None,
    engine: str = "auto",
    into: str = rundir.METRICS,
    pooling: str = "common",
) -> ReduceResult:
    """Certify ``<output>/votes`` at every point of the grid (defaults: the run's config; ``procedures``:
    entries as in ``certify.procedures``) and write ``<output>/<into>/`` (default ``metrics/``, the run's own;
    ``ray-certseg reduce`` with another grid writes ``reductions/<name>/`` so the run's rows stay).

    It streams: a first pass reads the key columns of every vote row (:func:`plan_votes`: duplicates, the
    like-for-like left-outs), then the vote files are certified chunk by chunk; each chunk's records are
    written to per_image.parquet and folded into :class:`ray_certseg.results.aggregate.Pool`'s sums, so memory holds
    a chunk, the sums (groups x C^2) and the keys, never every record.

    ``engine``: ``ray`` runs the map as a Ray Data stage (the job, a cluster), ``local`` in this process;
    ``auto`` picks ``ray`` when Ray is initialised. Both give identical files. ``pooling``: see
    :func:`ray_certseg.results.aggregate.pool`."""
    run = RunDir.of(output, storage_options)
    grid = grid_from_output(run, taus, alphas, corrections, procedures)
    if pooling not in aggregate.POOLINGS:
        raise ValueError(f"pooling must be one of {aggregate.POOLINGS}, got {pooling!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "auto":
        import sys

        engine = "ray" if "ray" in sys.modules and sys.modules["ray"].is_initialized() else "local"
    record = grid_record(grid, pooling)
    check_reduction_folder(run, into, record)
    if run.exists(into, rundir.INPUTS):  # what is about to change no longer holds until rewritten below
        run.remove(into, rundir.INPUTS)
    records = GridRecords(grid)
    plan_ = plan_run(run, records.per_row)
    group_rows = max(64, PER_IMAGE_GROUP_BYTES // record_bytes(plan_.widest))
    with run.io(into):
        writer = PerImageWriter(run, into, group_rows)
        try:
            pools, _ = fold(run, records, pooling=pooling, engine=engine, each=writer.write, plan_=plan_)
        finally:
            writer.close()
    acc = pools["all"]
    if errors is None and run.exists(rundir.ERRORS):
        errors = run.read_table(rundir.ERRORS)
    metrics = acc.metrics() if not acc.empty else pd.DataFrame(columns=aggregate.KEY)
    left = plan_.left_out if pooling == "common" and not acc.empty else None
    summary = with_errors(
        summary_markdown(metrics, errors.num_rows if errors is not None else 0, left), errors
    )
    write_metrics(run, None, metrics, summary, into=into)
    run.write_json(inputs_of(run, grid, pooling), into, rundir.INPUTS)
    per_image = lambda: aggregate.canonical_order(run.read_table(into, "per_image.parquet").to_pandas())
    return ReduceResult(per_image, metrics, summary, left)


def with_errors(summary: str, errors: pa.Table | None) -> str:
    """The summary followed by the failed rows (which images failed and why, next to the numbers they miss)."""
    return summary + "\n\n" + errors_markdown(errors) if errors is not None and errors.num_rows else summary


def reduce_table(
    table: pa.Table | pd.DataFrame, pooling: str = "common", errors: pa.Table | None = None
) -> ReduceResult:
    """Per-image records held in memory (:func:`certify_table`'s) -> deduplicated rows, dataset metrics, the
    like-for-like left-outs and the summary (with the failed rows of ``errors``, if any): the same
    :class:`ray_certseg.results.aggregate.Pool` as :func:`reduce_output`, for ``analysis.recertify``."""
    frame = table.to_pandas() if isinstance(table, pa.Table) else table
    per_image = aggregate.deduplicate(frame)
    metrics = aggregate.pool(per_image, pooling) if len(per_image) else pd.DataFrame(columns=aggregate.KEY)
    left = aggregate.left_out(per_image) if len(per_image) and pooling == "common" else None
    n_errors = errors.num_rows if errors is not None else 0
    summary = with_errors(summary_markdown(metrics, n_errors, left), errors)
    return ReduceResult(per_image, metrics, summary, left)


def inputs_of(run: RunDir, grid: Grid | None = None, pooling: str = "common") -> dict[str, Any]:
    """What a reduction of the run (and the plots drawn from it) is a function of: this package's version,
    the recorded job config (``config.json``, without its ``ray`` resources, which change no result), the
    grid certified (:func:`grid_record`; default: the config's), and the vote files and errors.parquet by path
    and size (one listing). A vote file is written once and never changed, so equal listings mean equal votes."""
    from ray_certseg import __version__

    config = run.read_json(rundir.CONFIG) if run.exists(rundir.CONFIG) else {}
    grid = grid if grid is not None else grid_from_output(run, None, None, None)
    return json.loads(
        json.dumps(
            {
                "version": __version__,
                "config": {k: v for k, v in config.items() if k not in ("ray", "output", "storage_options")},
                "grid": grid_record(grid, pooling),
                "vote_files": run.sizes(rundir.VOTES),
                "errors": run.size(rundir.ERRORS),
            }
        )
    )


def is_current(run: RunDir, inputs: dict[str, Any]) -> bool:
    """Whether metrics/ (its summary too) and plots/ were both made from exactly ``inputs``: reduce_output
    records what metrics/ was made from in ``metrics/inputs.json``, and the plots copy that record to
    ``plots/inputs.json`` once drawn (:func:`record_plotted`). A ``reduce --replace-metrics`` with another
    grid, new votes, or plots that failed leave the two unequal to the config's inputs."""
    wanted = ((rundir.METRICS, rundir.INPUTS), (rundir.METRICS, "summary.md"), (rundir.PLOTS, rundir.INPUTS))
    if not all(run.exists(*parts) for parts in wanted):
        return False
    return all(run.read_json(part, rundir.INPUTS) == inputs for part in (rundir.METRICS, rundir.PLOTS))


def record_plotted(run: RunDir) -> None:
    """Note that plots/ now shows what metrics/ holds (its ``inputs.json``, copied); written last."""
    if run.exists(rundir.METRICS, rundir.INPUTS):
        run.write_json(run.read_json(rundir.METRICS, rundir.INPUTS), rundir.PLOTS, rundir.INPUTS)


def write_metrics(
    run: RunDir,
    per_image: pd.DataFrame | None,
    metrics: pd.DataFrame,
    summary: str,
    *,
    into: str = rundir.METRICS,
) -> None:
    """``<into>/``: per_image.parquet (unless None: :func:`reduce_output` has streamed it there), metrics.parquet
    (zstd), metrics.csv (scalars), summary.md."""
    tables = [("per_image.parquet", per_image, PER_IMAGE_SCHEMA)] if per_image is not None else []
    for name, df, schema in [*tables, ("metrics.parquet", metrics, None)]:
        table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
        table = table.replace_schema_metadata(
            {k: v for k, v in (table.schema.metadata or {}).items() if k != b"pandas"}
        )
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        run.write_bytes(buf.getvalue(), into, name)
    csv = metrics.drop(columns=[c for c in metrics.columns if c.endswith(("_per_class", "_per_level"))])
    run.write_bytes(csv.to_csv(index=False, float_format="%.6g").encode(), into, "metrics.csv")
    run.write_bytes((summary + "\n").encode(), into, "summary.md")
