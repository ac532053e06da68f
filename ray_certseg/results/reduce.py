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

import hashlib
import io
import json
import logging
import posixpath
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ray_certseg.job import rundir
from ray_certseg.job.rundir import RunDir
from ray_certseg.results import aggregate
from ray_certseg.results.aggregate import PER_IMAGE_SCHEMA
from ray_certseg.results.image_records import Grid, GridRecords
from ray_certseg.results.stream import ENGINES, fold, plan_run, record_bytes
from ray_certseg.results.tables import summary_markdown, with_errors

log = logging.getLogger("ray_certseg")


PER_IMAGE_GROUP_BYTES = 16 * 1024**2
"""About the size of a row group of per_image.parquet (a fixed number of records, from the widest record)."""


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
    """Certify ``<output>/votes`` at every point of the grid and write ``<output>/<into>/``.

    It streams (:func:`ray_certseg.results.stream.fold`): the key columns of every vote row first
    (duplicates, like-for-like left-outs), then the vote files chunk by chunk; each chunk's records go to
    per_image.parquet and into :class:`ray_certseg.results.aggregate.Pool`'s sums. Memory holds a chunk, the
    sums (groups x C^2) and the keys, never every record. Both engines write identical files.

    Args:
        output: the run folder (local or ``s3://``).
        taus, alphas, corrections, procedures: the grid (None: the run's config; ``procedures``: entries as
            in ``certify.procedures``).
        errors: the failed rows to list in the summary (default: the run's errors.parquet).
        engine: ``ray`` (a Ray Data stage), ``local`` (this process) or ``auto`` (Ray when initialised).
        into: the folder under the run (``metrics``, the run's own; ``reductions/<name>`` for another grid).
        pooling: ``common`` (like for like) or ``all``.

    Returns:
        The :class:`ReduceResult` (its ``per_image`` read back from the written file on first use)."""
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
    vote_plan = plan_run(run, records.per_row)
    group_rows = max(64, PER_IMAGE_GROUP_BYTES // record_bytes(vote_plan.widest))
    with run.io(into):
        writer = PerImageWriter(run, into, group_rows)
        try:
            pools, _ = fold(
                run, records, pooling=pooling, engine=engine, each=writer.write, vote_plan=vote_plan
            )
        finally:
            writer.close()
    acc = pools["all"]
    if errors is None and run.exists(rundir.ERRORS):
        errors = run.read_table(rundir.ERRORS)
    metrics = acc.metrics() if not acc.empty else pd.DataFrame(columns=aggregate.GROUP_KEY)
    left = vote_plan.left_out if pooling == "common" and not acc.empty else None
    summary = with_errors(
        summary_markdown(metrics, errors.num_rows if errors is not None else 0, left), errors
    )
    write_metrics(run, None, metrics, summary, into=into)
    run.write_json(inputs_of(run, grid, pooling), into, rundir.INPUTS)
    per_image = lambda: aggregate.canonical_order(run.read_table(into, "per_image.parquet").to_pandas())
    return ReduceResult(per_image, metrics, summary, left)


def reduce_table(
    table: pa.Table | pd.DataFrame, pooling: str = "common", errors: pa.Table | None = None
) -> ReduceResult:
    """Per-image records held in memory (:func:`certify_table`'s) -> deduplicated rows, dataset metrics, the
    like-for-like left-outs and the summary (with the failed rows of ``errors``, if any): the same
    :class:`ray_certseg.results.aggregate.Pool` as :func:`reduce_output`, for ``analysis.recertify``."""
    frame = table.to_pandas() if isinstance(table, pa.Table) else table
    per_image = aggregate.deduplicate(frame)
    metrics = (
        aggregate.pool_records(per_image, pooling)
        if len(per_image)
        else pd.DataFrame(columns=aggregate.GROUP_KEY)
    )
    left = aggregate.left_out(per_image) if len(per_image) and pooling == "common" else None
    n_errors = errors.num_rows if errors is not None else 0
    summary = with_errors(summary_markdown(metrics, n_errors, left), errors)
    return ReduceResult(per_image, metrics, summary, left)


def inputs_of(run: RunDir, grid: Grid | None = None, pooling: str = "common") -> dict[str, Any]:
    """What a reduction of ``run`` at ``grid`` (default: the config's) is a function of
    (:meth:`ray_certseg.job.rundir.RunDir.inputs`), as ``metrics/inputs.json`` records it.

    Args:
        run: the run folder.
        grid: the grid certified; None for the run's config's.
        pooling: ``common`` or ``all``.

    Returns:
        A JSON-ready dict; equal dicts mean equal metrics and plots."""
    grid = grid if grid is not None else grid_from_output(run, None, None, None)
    return run.inputs(grid_record(grid, pooling))


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


def run_hierarchy(output: RunDir | str) -> str:
    """The run's ``dataset.hierarchy`` (its config.json), for hierarchical certification without a hierarchy
    named."""
    run = RunDir.of(output)
    recorded = run.read_json(rundir.CONFIG) if run.exists(rundir.CONFIG) else {}
    tree = (recorded.get("dataset") or {}).get("hierarchy")
    if tree is None:
        raise ValueError(
            f"{output} was sampled without dataset.hierarchy: hierarchical certification needs it"
        )
    return tree


def hierarchical_entries(
    procedures: Sequence[Any], thresholds: Sequence[Sequence[float]], hierarchy: str
) -> list[Any]:
    """Entries with one ``hierarchical`` entry per threshold function in place of a bare ``"hierarchical"``
    (or of no entry at all), the other entries kept: ``reduce --procedure hierarchical --thresholds ...``."""
    return [
        {"procedure": "hierarchical", "params": {"hierarchy": hierarchy, "thresholds": list(t)}}
        for e in procedures or ["hierarchical"]
        if e == "hierarchical"
        for t in thresholds
    ] + [e for e in procedures if e != "hierarchical"]


def reduce_again(
    output: RunDir | str,
    *,
    taus: Sequence[float] | None = None,
    alphas: Sequence[float] | None = None,
    corrections: Sequence[str] | None = None,
    procedures: Sequence[Any] = (),
    thresholds: Sequence[Sequence[float]] | None = None,
    hierarchy: str | None = None,
    name: str | None = None,
    pooling: str = "common",
    replace_metrics: bool = False,
) -> tuple[ReduceResult, str]:
    """``ray-certseg reduce``: certify a run's votes again at another grid, into a folder of its own.

    Args:
        output: the run folder.
        taus, alphas, corrections, procedures: the parts of the grid to change (None or empty: the run's).
        thresholds: threshold functions for ``hierarchical`` (:func:`hierarchical_entries`), certified on
            ``hierarchy`` (default: the run's).
        name: the folder ``reductions/<name>/``; default :func:`reduction_name`.
        pooling: ``common`` or ``all``.
        replace_metrics: write the run's own metrics/ instead.

    Returns:
        The reduction and the folder it was written to, relative to the run (``metrics`` or
        ``reductions/<name>``): any change of the grid goes to reductions/, so the run's own rows stay."""
    run = RunDir.of(output)
    procedures = list(procedures)
    if thresholds:
        procedures = hierarchical_entries(procedures, thresholds, hierarchy or run_hierarchy(run))
    into = rundir.METRICS
    changed = taus or alphas or corrections or procedures or name or pooling != "common"
    if changed and not replace_metrics:
        grid = grid_from_output(run, taus, alphas, corrections, procedures)
        into = f"reductions/{name or reduction_name(grid, pooling)}"
    result = reduce_output(
        run,
        taus=taus,
        alphas=alphas,
        corrections=corrections,
        procedures=procedures or None,
        into=into,
        pooling=pooling,
    )
    return result, into


def where_written(output: RunDir | str, into: str) -> str:
    """The line that says where a reduction's files are (and that the run's own rows stayed)."""
    run = RunDir.of(output)
    stayed = "" if into == rundir.METRICS else f"; the run's own rows stay in {run.metrics()}/"
    return f"metrics: {run.metrics(into=into)}/ (metrics.csv, metrics.parquet, per_image.parquet, summary.md){stayed}"
