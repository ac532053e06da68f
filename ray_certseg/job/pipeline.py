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
from dataclasses import dataclass, field
from typing import Any

from ray_certseg import storage, votes
from ray_certseg.config import JobConfig
from ray_certseg.job import preflight, rundir
from ray_certseg.job.output import completed_rows, prepare_output
from ray_certseg.job.progress import Progress
from ray_certseg.job.rowcount import RowCounter
from ray_certseg.job.rundir import RunDir
from ray_certseg.job.sampler import CALLS_PER_ACTOR, VoteSampler, row_key

log = logging.getLogger("ray_certseg")


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


def plan_rows(cfg: JobConfig, refs: list[dict[str, Any]], done: set[tuple[str, str, float]]) -> Plan:
    """Attach to every image reference the (method, sigma) pairs not yet in the votes (resume)."""
    grid = [(m, float(s)) for m in cfg.methods for s in cfg.sampling.sigmas]
    rows, n_done = [], 0
    for ref in refs:
        todo = [[m, s] for m, s in grid if row_key(ref["image_id"], m, s) not in done]
        n_done += len(grid) - len(todo)
        if todo:
            rows.append({**{k: v for k, v in ref.items() if v is not None}, "todo": json.dumps(todo)})
    return Plan(rows=rows, total=len(refs) * len(grid), done=n_done)


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
    preflight.check_noise_levels(cfg)
    prepare_output(cfg, overwrite=overwrite)
    refs = list_items(cfg.dataset)
    probe = probe_size(refs, cfg)
    if probe is not None:
        preflight.check_feasible(cfg, *probe)
    done = completed_rows(RunDir.of_config(cfg))
    job_plan = plan_rows(cfg, refs, done)
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
        from ray_certseg.certify import class_tree

        levels = class_tree.load(cfg.dataset.hierarchy).num_levels - 1
    size = votes.row_nbytes(
        probe[0] * probe[1], cfg.dataset.num_classes, levels=levels, store_counts=cfg.sampling.store_counts
    )
    share = math.ceil(rows / (FILES_PER_ACTOR * _max_actors(cfg)))
    return max(1, min(r.file_bytes // size, share, MAX_ROWS_PER_FILE))


WRITE_CPUS = 0.25
"""A Parquet write is I/O: a quarter CPU slot, so it schedules beside actors that fill a node."""
