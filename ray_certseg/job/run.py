"""``run_job(cfg)``: the driver's steps of one job, in order.

1. Plan on the driver, before Ray starts (:func:`ray_certseg.job.pipeline.prepare_run`): config, models, output
   folder, rows already written. A job-level fault fails here, in seconds.
2. Sample the pending rows on Ray (:func:`ray_certseg.job.pipeline.run_sampling`); a finished job skips this
   and never starts Ray.
3. Gather the per-image errors, reduce the votes at the config's grid, draw the plots; when metrics/ and plots/
   already match the votes and the config (:meth:`ray_certseg.job.rundir.RunDir.is_current`), skip both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from ray_certseg.config import JobConfig
from ray_certseg.job import output, pipeline, rundir, session
from ray_certseg.job.rundir import RunDir
from ray_certseg.results import reduce, tables

log = logging.getLogger("ray_certseg")


@dataclass
class JobResult:
    """What a run left: the run folder, its dataset metrics, the failed rows, and what this run did."""

    cfg: JobConfig
    run: RunDir
    metrics: pd.DataFrame
    errors: pa.Table
    up_to_date: bool  # nothing was sampled, certified or drawn: metrics/ and plots/ matched already
    plots_written: bool

    @property
    def exit_code(self) -> int:
        """0 when every row is done, 1 when some images failed (their rows are in errors.parquet)."""
        return 1 if self.errors.num_rows else 0

    def summary(self) -> str:
        """The headline table (method x sigma at the first grid point), the failed rows, where the rest is."""
        run, failed = self.run, self.errors.num_rows
        grid = reduce.grid_from_output(run, None, None, None)
        headline = tables.headline_markdown(self.metrics, grid, list(self.cfg.methods), failed)
        plots = f"plots:   {run.plots}/"
        if not self.up_to_date:
            plots += (
                f" (`ray-certseg report {run.url}` writes report.md)"
                if self.plots_written
                else " (not written)"
            )
        return (
            tables.with_errors(headline, self.errors)
            + f"\n\nfull table (every grid point, Dice, worst-case bounds, clean and majority-vote accuracy, "
            f"failed rows): {run.metrics()}/summary.md and metrics.csv\nvotes:   {run.votes}/\n"
            f"metrics: {run.metrics()}/ (metrics.csv, metrics.parquet, per_image.parquet, summary.md)\n"
            f"errors:  {run.path(rundir.ERRORS)} ({failed} failed rows)\n{plots}"
        )


def run_job(cfg: JobConfig, *, overwrite: bool = False, progress_interval: float | None = None) -> JobResult:
    """Sample, certify and draw one job (the module docstring lists the steps).

    Args:
        cfg: the validated job config.
        overwrite: remove the output folder first (only a run folder or an empty one).
        progress_interval: seconds between progress log lines; None: off at a terminal (Ray Data's bars
            show progress there), 30 otherwise.

    Returns:
        The :class:`JobResult`; its ``exit_code`` is the CLI's."""
    job_plan = pipeline.prepare_run(cfg, overwrite=overwrite)
    if job_plan.pending:
        session.init_ray(cfg.ray.address, cfg.ray.runtime_env)
        interactive = session.interactive_terminal()
        session.configure_ray_data(interactive)
        interval = progress_interval if progress_interval is not None else (0.0 if interactive else 30.0)
        log.info("%s", session.CORE_WORKER_NOTE)
        pipeline.run_sampling(cfg, progress_interval=interval, job_plan=job_plan)
    run = RunDir.of_config(cfg)
    errors = output.gather_errors(cfg)
    if not job_plan.pending and run.is_current(reduce.inputs_of(run)):
        log.info(
            "metrics/ and plots/ are up to date with votes/ and the config: not certified again "
            "(`ray-certseg reduce %s` does, `ray-certseg report %s --replot` redraws)",
            run.url,
            run.url,
        )
        metrics = run.read_table(rundir.METRICS, "metrics.parquet").to_pandas()
        return JobResult(cfg, run, metrics, errors, up_to_date=True, plots_written=True)
    metrics = reduce.reduce_output(run, errors=errors).metrics
    return JobResult(cfg, run, metrics, errors, up_to_date=False, plots_written=_write_plots(run, cfg))


def _write_plots(run: RunDir, cfg: JobConfig) -> bool:
    """Draw plots/; a failure is logged, never raised: the votes and metrics are complete without pictures."""
    from ray_certseg.results import plots

    try:
        plots.write_plots(run, config=cfg)
    except Exception as exc:  # noqa: BLE001 - pictures are a convenience
        log.warning(
            "plots not written (%s: %s); the votes and metrics are complete",
            type(exc).__name__,
            run.redact(str(exc)),
        )
        return False
    return True
