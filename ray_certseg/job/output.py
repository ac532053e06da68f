"""The run folder across runs: create it, resume into it (only when the recorded config would make the same rows),
set aside what a crash left half-written, overwrite only a run folder, and gather the per-image error records."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ray_certseg.config import ConfigError, DatasetConfig, JobConfig
from ray_certseg.job import rundir
from ray_certseg.job.rundir import ERRORS_SCHEMA, RunDir

log = logging.getLogger("ray_certseg")


def set_aside_partial_files(run: RunDir) -> list[str]:
    """A run killed while writing can leave a truncated vote file (no Parquet footer). Such files are moved to
    ``<output>/_partial/``: their rows are then missing, so the resumed run samples them again, once."""
    aside, moved = run.filesystem(rundir.PARTIAL)[1], []
    fs = run.filesystem()[0]
    for path in run.files(rundir.VOTES):
        try:
            with fs.open(path, "rb") as f:
                _ = pq.ParquetFile(f).metadata  # reads and checks the footer
        except Exception as exc:  # noqa: BLE001 - any unreadable footer
            target = f"{aside}/{path.rsplit('/', 1)[-1]}.partial"
            log.warning(
                "vote file %s is unreadable (%s): moved to %s, its rows will be sampled again",
                path,
                type(exc).__name__,
                target,
            )
            fs.makedirs(aside, exist_ok=True)
            fs.mv(path, target)
            moved.append(path)
    return moved


def completed_rows(run: RunDir) -> set[tuple[str, str, float]]:
    """Keys (image_id, method, sigma) of the vote rows already written."""
    fs, files = run.vote_files()
    keys: set[tuple[str, str, float]] = set()
    for path in files:
        t = pq.read_table(path, filesystem=fs, columns=["image_id", "method", "sigma"], partitioning=None)
        keys.update(
            zip(
                t.column("image_id").to_pylist(),
                t.column("method").to_pylist(),
                t.column("sigma").to_pylist(),
            )
        )
    return keys


def prepare_output(cfg: JobConfig, *, overwrite: bool) -> None:
    """Create the output folder, or check that an existing one was made by a compatible config and
    schema version (so resumed rows are comparable). ``overwrite`` removes what was there."""
    run = RunDir.of_config(cfg)
    if not run.is_local:
        run.check_bucket()  # never create a bucket by accident
    fs, root = run.filesystem()
    if fs.isfile(root):
        raise ConfigError(f"output: {cfg.output} is a file, not a folder: choose another --output")
    if overwrite and fs.exists(root):
        if not (run.exists(rundir.CONFIG) or run.exists(rundir.VOTES) or not fs.ls(root)):
            raise ConfigError(
                f"--overwrite: {cfg.output} is neither a run folder (no config.json, no votes/) nor empty, "
                "so nothing was removed; give --output a new or a run folder"
            )
        log.info("--overwrite: removing %s", cfg.output)
        fs.rm(root, recursive=True)
    if run.exists(rundir.VOTES):
        set_aside_partial_files(run)
        run.vote_schema_version()
        if run.exists(rundir.CONFIG):
            check_resumable(run.read_json(rundir.CONFIG), cfg.to_dict(redact=True))
    try:
        run.write_json(cfg.to_dict(redact=True), rundir.CONFIG)
    except OSError as exc:  # read-only place, a file in the path, no such device...
        raise ConfigError(
            f"output: cannot write to {cfg.output} ({type(exc).__name__}: {exc.strerror or exc}): "
            "choose a writable folder with --output"
        ) from None
    if run.exists(rundir.ERROR_PARTS):  # errored rows are retried by this run; stale records would mislead
        fs.rm(run.filesystem(rundir.ERROR_PARTS)[1], recursive=True)


# Per sampling key, whether rows sampled before and after a change stay comparable (tests/test_pipeline.py):
# - VOTE_KEYS change the votes: n0, n, seed (the noise), dtype (the arithmetic), device (the kernels), compile
#   and channels_last (fused or re-laid-out kernels round differently, in float32 too). Resuming is refused.
# - batch_size may change (e.g. after an out-of-memory): the per-draw seeding makes the noise independent of
#   it, and on the CPU in float32 the votes are bit-identical (tested); on a GPU, kernels picked per batch
#   shape can round differently, so resuming warns: every row is still a valid certificate of the same model.
# - sigmas (new rows only), store_counts (adds a column), keep_host_memory (memory only): free to change.
VOTE_KEYS = ("n0", "n", "seed", "dtype", "device", "compile", "channels_last")


WARN_KEYS = ("batch_size", "tile_pixels")  # tile_pixels: the denoiser's batch shapes, as batch_size


SELECTION_KEYS = ("limit", "subset")  # which images are in scope; the rows of each image stay comparable


PRESENTATION_KEYS = ("palette", "class_names")  # how results are drawn and named, not what is sampled


RECORDED_SECTIONS = ("dataset", "methods", "models")
"""The sections of a recorded config.json that resuming compares (sampling may be absent: its defaults)."""


def check_resumable(old: dict[str, Any], new: dict[str, Any]) -> None:
    """Votes already in an output folder may only be reused when the new config would produce the same
    rows: same dataset (up to ``limit``/``subset``), same models, the same VOTE_KEYS, and the same definition
    for every method in both. More images, methods or sigmas are fine: only the new rows are sampled. A
    changed batch_size is allowed with a warning (see VOTE_KEYS above)."""
    from ray_certseg.config import SamplingConfig

    missing = [k for k in RECORDED_SECTIONS if not isinstance(old, dict) or not isinstance(old.get(k), dict)]
    if missing:
        raise ValueError(
            f"output folder {new.get('output')!r} holds votes whose config.json lacks "
            f"{', '.join(missing)}: it was written by another tool or a version of ray_certseg too old to "
            "check that resumed rows are comparable. Use another --output, or --overwrite to start over."
        )
    old = {**old, "dataset": DatasetConfig.upgrade_recorded(old.get("dataset") or {})}
    problems = []
    same_items = lambda d: {
        k: v
        for k, v in {**DatasetConfig.DEFAULTS_ADDED_LATER, **(d or {})}.items()
        if k not in SELECTION_KEYS + PRESENTATION_KEYS
    }
    if same_items(old.get("dataset")) != same_items(new.get("dataset")):
        problems.append("dataset")
    sampling = lambda d, key: d.get("sampling", {}).get(key, SamplingConfig.model_fields[key].default)
    for key in VOTE_KEYS:
        if sampling(old, key) != sampling(new, key):
            problems.append(f"sampling.{key}")
    for key in WARN_KEYS:
        if sampling(old, key) != sampling(new, key):
            log.warning(
                "sampling.%s changed from %s to %s since these votes were written: the noise is the "
                "same (per-draw seeds) and CPU float32 votes are bit-identical, but on a GPU kernels "
                "chosen per batch shape may round differently, so old and new rows can differ in "
                "low-order bits; keep %s for bit-identical rows",
                key,
                sampling(old, key),
                sampling(new, key),
                key,
            )
    for name in set(old.get("methods", {})) & set(new.get("methods", {})):
        o, n = old["methods"][name], new["methods"][name]
        if o != n:
            problems.append(f"methods.{name}")
        for kind, key in (("segmenters", "segmenter"), ("denoisers", "denoiser")):
            if n.get(key) and old["models"][kind].get(o.get(key)) != new["models"][kind].get(n.get(key)):
                problems.append(f"models.{kind}.{n[key]}")
    if problems:
        raise ValueError(
            f"output folder {new.get('output')!r} holds votes made with a different config "
            f"({', '.join(sorted(set(problems)))} changed); resuming would mix incomparable rows. "
            "Use another --output, or --overwrite to start over."
        )


def gather_errors(cfg: JobConfig) -> pa.Table:
    """Collect the per-image error records of this run into ``<output>/errors.parquet``."""
    run = RunDir.of_config(cfg)
    tables = [run.read_table(run.relative(path)) for path in run.files(rundir.ERROR_PARTS)]
    table = pa.concat_tables(tables) if tables else ERRORS_SCHEMA.empty_table()
    table = table.sort_by([("image_id", "ascending"), ("method", "ascending"), ("sigma", "ascending")])
    run.write_table(table, rundir.ERRORS)
    return table
