"""The Ray job: dataset references -> actor pool (denoiser + segmenter) -> vote-count Parquet -> reducer.

Data flows one way:

    list_items(dataset)            driver, cheap: one small reference row per image
      -> ray.data.from_items        (only rows with work left: resume)
      -> map_batches(VoteSampler)   actor pool; each actor loads every model once and runs two calls at
                                    once: one decodes its next image while the other samples (count_votes
                                    for each pending (method, sigma)) under the actor's device lock
      -> write_parquet(<out>/votes) zstd, one file per write task
    reduce(<out>)                   certify every vote row for the tau x alpha x correction grid, pool metrics

Per-image failures never fail the job: the actor catches them, writes a small record to
``<out>/_errors/`` and drops that row; the driver gathers them into ``<out>/errors.parquet``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_certseg import storage, votes
from ray_certseg.config import ConfigError, DatasetConfig, JobConfig
from ray_certseg.job import preflight, rundir
from ray_certseg.job.rowcount import RowCounter
from ray_certseg.job.rundir import RunDir

log = logging.getLogger("ray_certseg")

ERRORS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("method", pa.string()),
        ("sigma", pa.float64()),
        ("stage", pa.string()),
        ("error", pa.string()),
    ]
)


CALLS_PER_ACTOR = 2
"""Calls of one sampling actor that Ray runs at once, in threads: one samples, the other decodes its next image."""


def row_key(image_id: str, method: str, sigma: float) -> tuple[str, str, float]:
    """The identity of one vote row: (image, method, sigma)."""
    return (str(image_id), str(method), float(sigma))


# --------------------------------------------------------------------------------------------- sampling stage
class VoteSampler:
    """Ray Data actor UDF: loads every segmenter and denoiser the job's methods use once, in ``__init__``.

    Each call receives a batch of image references (``image_id``, paths, and ``todo``: the JSON list of
    pending ``[method, sigma]`` pairs for that image) and returns one Arrow row per (image, method, sigma)
    in the vote schema. Any exception while loading or sampling one image is recorded and that row is
    skipped, so one bad image costs nothing else.
    """

    def __init__(
        self, config: dict[str, Any], probe_size: tuple[int, int] | None = None, row_counter: Any = None
    ):
        import torch

        from ray_certseg.models.registry import load_denoiser, load_segmenter
        from ray_certseg.sampling import keep_freed_host_memory, prepare_model

        self.cfg = JobConfig.from_dict(config)
        s = self.cfg.sampling
        if s.keep_host_memory:
            keep_freed_host_memory()
        self.device = resolve_device(s.device)
        self.dtype = getattr(torch, s.dtype)
        self.autocast_dtype = None if s.dtype == "float32" else self.dtype
        used_seg = {m.segmenter for m in self.cfg.methods.values()}
        used_den = {m.denoiser for m in self.cfg.methods.values() if m.denoiser}
        # Weights stay float32; bf16/fp16 run under autocast (sampling.dtype), except where a loader
        # applies its own precision scheme (ADM's fp16 blocks on GPU).
        # A model that fails to load, or a segmenter for another class count, fails this constructor: Ray Data
        # then stops the job once (preflight.job_error) instead of every image failing the same way.
        prep = {"channels_last": s.channels_last, "compile": s.compile}
        self.segmenters = {}
        for name in sorted(used_seg):
            segmenter = preflight.load_model(
                "segmenters",
                name,
                lambda name=name: load_segmenter(self.cfg.models.segmenters[name], device=self.device),
            )
            preflight.check_segmenter(
                name, segmenter, self.cfg.dataset.num_classes, self.device, self.cfg.dataset.resize
            )
            self.segmenters[name] = prepare_model(segmenter, **prep)
        den_dtype = self.dtype if self.device.type == "cuda" else torch.float32
        self.denoisers = {}
        for name in sorted(used_den):
            denoiser = preflight.load_model(
                "denoisers",
                name,
                lambda name=name: load_denoiser(
                    self.cfg.models.denoisers[name], device=self.device, dtype=den_dtype
                ),
            )
            self._size_tile_batches(name, denoiser)
            self.denoisers[name] = prepare_model(denoiser, **prep)
        if probe_size is not None:
            for name, denoiser in self.denoisers.items():
                preflight.check_denoiser(name, denoiser, *probe_size)
        self.hierarchy = None
        if self.cfg.dataset.hierarchy is not None:  # per-level votes for hierarchical certification
            from ray_certseg.certify import class_tree as hierarchy
            from ray_certseg.sampling import level_index

            self.hierarchy = hierarchy.load(self.cfg.dataset.hierarchy)
            self.hierarchy_index = level_index(self.hierarchy.node[1:], self.device)
        self.run = RunDir.of_config(self.cfg)
        self.row_counter = row_counter  # a RowCounter actor handle (the driver's progress line), or None
        self._device = threading.Lock()  # one call samples at a time; the other reads and decodes meanwhile

    def _size_tile_batches(self, name: str, denoiser: Any) -> None:
        """Tiles per network call of a tile-mode denoiser (``sampling.tile_pixels``), set once per actor
        before any image (and before compiling), so every image of the actor runs the same batch shapes."""
        from ray_certseg.models.denoisers import DiffusionDenoiser

        s = self.cfg.sampling
        if not isinstance(denoiser, DiffusionDenoiser) or denoiser.resolution != "tile":
            return
        if s.tile_pixels != "auto":
            denoiser.tile_pixels = s.tile_pixels
        elif denoiser.fit_tile_pixels_to(self.device, self.autocast_dtype) is not None:
            log.info("denoiser %s: %d tiles per network call", name, denoiser.tiles_per_call(s.batch_size))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Vote rows of a batch of image references.

        Ray runs up to ``CALLS_PER_ACTOR`` calls of one actor at once, in threads. Reading and decoding an
        image happen outside the actor's device lock, sampling inside it: while one call samples, the other
        reads and decodes its next image (both release the GIL in their kernels and codecs), so the device
        waits for no decoding, across Ray batches too. A load error still costs only its own image."""
        from ray_certseg.data import load_item

        records: list[votes.VoteRecord] = []
        for i in range(len(batch["image_id"])):
            ref = {k: _scalar(v[i]) for k, v in batch.items() if k != "todo"}
            todo = json.loads(batch["todo"][i])
            try:
                item = load_item(ref, self.cfg.dataset)
            except storage.StorageError:
                raise  # the store itself fails: every image would, so the job stops (preflight.job_error)
            except Exception as exc:  # noqa: BLE001 - one bad image must not cost the others
                self._record_error(ref["image_id"], "", float("nan"), "load", exc)
                self._finished(len(todo))
                continue
            failed = []
            with self._device:
                for method, sigma in todo:
                    try:
                        records.append(self._sample(item, method, float(sigma)))
                    except Exception as exc:  # noqa: BLE001
                        failed.append((method, float(sigma), exc))
                    self._finished(1)
            for method, sigma, exc in failed:  # written outside the lock: the device goes on meanwhile
                self._record_error(ref["image_id"], method, sigma, "sample", exc)
        return votes.make_table(records)

    def _sample(self, item: dict[str, Any], method: str, sigma: float) -> votes.VoteRecord:
        from ray_certseg.sampling import count_votes

        m = self.cfg.methods[method]
        s = self.cfg.sampling
        segmenter = self.segmenters[m.segmenter]
        denoiser = self.denoisers[m.denoiser] if m.denoiser else None
        num_classes = self.cfg.dataset.num_classes
        v = count_votes(
            item["image"],
            segmenter,
            denoiser=denoiser,
            sigma=sigma,
            n0=s.n0,
            n=s.n,
            num_classes=num_classes,
            batch_size=s.batch_size,
            seed=s.seed,
            image_id=item["image_id"],
            device=self.device,
            autocast_dtype=self.autocast_dtype,
            channels_last=s.channels_last,
            return_counts=s.store_counts,
            hierarchy_index=None if self.hierarchy is None else self.hierarchy_index,
        )
        h, w = v.c_hat.shape
        return votes.VoteRecord(
            image_id=item["image_id"],
            dataset=item["dataset"],
            method=method,
            denoiser=getattr(denoiser, "name", "") if denoiser is not None else "",
            segmenter=getattr(segmenter, "name", m.segmenter),
            sigma=sigma,
            n0=s.n0,
            n=s.n,
            seed=s.seed,
            num_classes=num_classes,
            ignore_index=self.cfg.dataset.ignore_index,
            height=h,
            width=w,
            label=item["label"],
            c_hat=v.c_hat,
            k=v.k,
            clean_pred=v.clean_pred,
            sample_seconds=v.seconds,
            counts=v.counts if s.store_counts else None,
            hierarchy=None if self.hierarchy is None else self.hierarchy.digest,
            margin=v.margin,
            c_hat_levels=v.c_hat_levels,
            k_levels=v.k_levels,
        )

    def _finished(self, rows: int) -> None:
        """Tell the driver's progress line that ``rows`` more rows are done (sampled or failed); a call that
        waits for nothing, so the device never waits for it."""
        if self.row_counter is not None:
            self.row_counter.add.remote(rows)

    def _record_error(self, image_id: str, method: str, sigma: float, stage: str, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        log.warning(
            "image %s (%s%s): %s", image_id, stage, f", {method} sigma={sigma}" if method else "", message
        )
        log.debug("%s", "".join(traceback.format_exception(exc)))  # called after the except block too
        table = pa.Table.from_pylist(
            [
                {
                    "image_id": image_id,
                    "method": method,
                    "sigma": sigma,
                    "stage": stage,
                    "error": self.run.redact(message),
                }
            ],
            schema=ERRORS_SCHEMA,
        )
        tag = zlib.crc32(f"{image_id}:{method}:{sigma}:{stage}".encode())
        self.run.write_table(table, rundir.ERROR_PARTS, f"{image_id}-{tag:08x}.parquet")


def _scalar(x: Any) -> Any:
    return x.item() if isinstance(x, np.generic) else x


def resolve_device(name: str):
    """``auto`` -> the first CUDA device when there is one, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------------------------- driver
@dataclass
class Plan:
    """What a run has to do: the reference rows with their pending (method, sigma) pairs."""

    rows: list[dict[str, Any]]
    total: int  # (image, method, sigma) rows the config asks for
    done: int  # of those, already in <output>/votes
    pending: int = field(init=False)
    probe_size: tuple[int, int] | None = None  # (H, W) of the first image that loads, for the actors' checks

    def __post_init__(self) -> None:
        self.pending = self.total - self.done


def plan(cfg: JobConfig, refs: list[dict[str, Any]], done: set[tuple[str, str, float]]) -> Plan:
    """Attach to every image reference the (method, sigma) pairs not yet in the votes (resume)."""
    grid = [(m, float(s)) for m in cfg.methods for s in cfg.sampling.sigmas]
    rows, n_done = [], 0
    for ref in refs:
        todo = [[m, s] for m, s in grid if row_key(ref["image_id"], m, s) not in done]
        n_done += len(grid) - len(todo)
        if todo:
            rows.append({**{k: v for k, v in ref.items() if v is not None}, "todo": json.dumps(todo)})
    return Plan(rows=rows, total=len(refs) * len(grid), done=n_done)


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


class Progress:
    """A periodic log line for runs without progress bars (``ray job submit``): rows done / total, images per
    minute and time left, from the :class:`RowCounter` the actors report to."""

    def __init__(self, plan_: Plan, rows_per_image: int, interval: float, counter: Any):
        self.plan, self.counter = plan_, counter
        self.rows_per_image, self.interval = rows_per_image, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.monotonic()

    def __enter__(self) -> Progress:  # noqa: PYI034 - the class is final; Self needs Python 3.11
        if self.interval > 0 and self.plan.pending:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _count(self) -> int | None:
        """Rows finished in this run so far (None when the counter does not answer within the interval)."""
        import ray

        try:
            return min(
                self.plan.pending, ray.get(self.counter.total.remote(), timeout=max(1.0, self.interval))
            )
        except Exception:  # noqa: BLE001 - a progress line must never fail the job
            return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            new = self._count()
            if new is None:
                continue
            dt = time.monotonic() - self._t0
            rate = new / dt if dt > 0 else 0.0
            left = (self.plan.pending - new) / rate if rate > 0 else float("nan")
            log.info(
                "progress: %d/%d rows, %.1f images/min, about %s left",
                self.plan.done + new,
                self.plan.total,
                60 * rate / self.rows_per_image,
                _fmt_seconds(left),
            )


def _fmt_seconds(s: float) -> str:
    if math.isnan(s):
        return "?"
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def prepare_run(cfg: JobConfig, *, overwrite: bool = False) -> Plan:
    """Everything the driver checks and plans before Ray starts, so a job-level fault fails in seconds: the
    config's class counts, the output folder (:func:`prepare_output`), the listing, one probe image (whether
    the (n, tau, alpha) grid can certify anything at its size, :func:`preflight.check_feasible`) and the rows
    already written (resume)."""
    from ray_certseg.data import list_items

    preflight.check_class_counts(cfg)
    preflight.check_hierarchies(cfg)
    preflight.check_model_files(cfg)
    preflight.check_runtime_env(cfg)
    preflight.add_py_modules_to_path(cfg)
    preflight.check_model_builds(cfg)
    prepare_output(cfg, overwrite=overwrite)
    refs = list_items(cfg.dataset)
    probe = probe_size(refs, cfg)
    if probe is not None:
        preflight.check_feasible(cfg, *probe)
    done = completed_rows(RunDir.of_config(cfg))
    job_plan = plan(cfg, refs, done)
    job_plan.probe_size = probe
    log.info(
        "%d images x %d methods x %d sigmas = %d vote rows; %d already written, %d to sample",
        len(refs),
        len(cfg.methods),
        len(cfg.sampling.sigmas),
        job_plan.total,
        job_plan.done,
        job_plan.pending,
    )
    return job_plan


PROBE_TRIES = 3


def probe_size(refs: list[dict[str, Any]], cfg: JobConfig) -> tuple[int, int] | None:
    """(H, W) of the first of the first PROBE_TRIES images that loads (after ``resize`` and
    ``certify_at_scale``); None if none does: a bad image is the sampler's to record (with the others' rows kept), a failing store the
    sampler's to stop the job on (``preflight.job_error``), as without the probe."""
    from ray_certseg.data import load_item

    for ref in refs[:PROBE_TRIES]:
        try:
            return tuple(load_item(ref, cfg.dataset)["label"].shape)
        except storage.StorageError:
            return None
        except Exception:  # noqa: BLE001, S112 - a bad image: the next may load; the sampler records this one
            continue
    return None


def run_sampling(
    cfg: JobConfig, *, overwrite: bool = False, progress_interval: float = 30.0, job_plan: Plan | None = None
) -> Plan:
    """Sample votes for every (image, method, sigma) not yet in ``<output>/votes`` (all of them with
    ``overwrite``). ``job_plan``: from :func:`prepare_run` when the driver already made it. Returns the plan
    that was executed."""
    import ray

    run = RunDir.of_config(cfg)
    if job_plan is None:
        job_plan = prepare_run(cfg, overwrite=overwrite)
    if not job_plan.rows:
        return job_plan
    rows_per_image = len(cfg.methods) * len(cfg.sampling.sigmas)

    r = cfg.ray
    size = (
        {"size": r.actors}
        if isinstance(r.actors, int)
        else {"min_size": r.actors["min"], "max_size": r.actors["max"]}
    )
    compute = ray.data.ActorPoolStrategy(
        **size,
        max_tasks_in_flight_per_actor=r.max_tasks_in_flight_per_actor,
        max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
        enable_true_multi_threading=True,  # VoteSampler serialises sampling itself (its device lock)
    )
    per_batch = images_per_batch(cfg, len(job_plan.rows), job_plan.probe_size)
    per_file = rows_per_file(cfg, job_plan.probe_size, job_plan.pending)
    log.info("%d images per Ray batch, at least %d vote rows per file", per_batch, per_file)
    counter = ray.remote(num_cpus=0)(RowCounter).remote()  # its worker imports only ray_certseg.job.rowcount
    ds = ray.data.from_items(job_plan.rows, override_num_blocks=math.ceil(len(job_plan.rows) / per_batch))
    ds = ds.map_batches(
        VoteSampler,
        fn_constructor_kwargs={
            "config": cfg.to_dict(redact=False),
            "probe_size": job_plan.probe_size,
            "row_counter": counter,
        },
        compute=compute,
        batch_size=per_batch,
        batch_format="numpy",
        num_cpus=r.num_cpus_per_actor,
        num_gpus=r.num_gpus_per_actor,
    )
    pa_fs, pa_path = run.pyarrow_filesystem(rundir.VOTES)
    with Progress(job_plan, rows_per_image, progress_interval, counter):
        try:
            ds.write_parquet(
                pa_path,
                filesystem=pa_fs,
                min_rows_per_file=per_file,
                ray_remote_args={"num_cpus": WRITE_CPUS},
                **votes.PARQUET_ARGS,
            )
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            raise preflight.job_error(exc) from exc
    return job_plan


MAX_IMAGES_PER_BATCH = 64
MAX_ROWS_PER_FILE = 4096
FILES_PER_ACTOR = 4


def _max_actors(cfg: JobConfig) -> int:
    a = cfg.ray.actors
    return a if isinstance(a, int) else a["max"]


def images_per_batch(cfg: JobConfig, images: int, probe: tuple[int, int] | None) -> int:
    """Images per Ray batch: ``ray.batch_size``, or for ``auto`` as many as fit ``ray.batch_pixels`` pixels of
    the probe image, at most MAX_IMAGES_PER_BATCH and at most ceil(images / (2 actors)), so that every actor
    of the largest pool gets two batches (1 without a probe). The votes do not depend on it: every image has
    its own noise seeds, and a failing image still costs only its own rows."""
    r = cfg.ray
    if r.batch_size != "auto":
        return r.batch_size
    if probe is None:
        return 1
    fit = r.batch_pixels // (probe[0] * probe[1])
    return max(1, min(fit, MAX_IMAGES_PER_BATCH, math.ceil(images / (2 * _max_actors(cfg)))))


def rows_per_file(cfg: JobConfig, probe: tuple[int, int] | None, rows: int) -> int:
    """The least vote rows per file (Ray Data's ``min_rows_per_file``: blocks are bundled until they hold as
    many): ``ray.rows_per_file``, or for ``auto`` as many rows of the probe image's size as fit
    ``ray.file_bytes`` in memory (:func:`ray_certseg.votes.row_nbytes`), but no more than a
    1 / (FILES_PER_ACTOR x actors) share of the ``rows`` to sample, so that files (and progress) keep coming
    during a run and a crash loses at most about that share; between 1 and MAX_ROWS_PER_FILE (1 without a
    probe). Rows waiting for their file are lost by a crash and sampled again on resume, never written twice."""
    r = cfg.ray
    if r.rows_per_file != "auto":
        return r.rows_per_file
    if probe is None:
        return 1
    levels = 0
    if cfg.dataset.hierarchy is not None:
        from ray_certseg.certify import class_tree as hierarchy

        levels = hierarchy.load(cfg.dataset.hierarchy).num_levels - 1
    size = votes.row_nbytes(
        probe[0] * probe[1], cfg.dataset.num_classes, levels=levels, store_counts=cfg.sampling.store_counts
    )
    share = math.ceil(rows / (FILES_PER_ACTOR * _max_actors(cfg)))
    return max(1, min(r.file_bytes // size, share, MAX_ROWS_PER_FILE))


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


WRITE_CPUS = (
    0.25  # a Parquet write is I/O: a quarter CPU slot, so it schedules beside actors that fill a node
)
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
