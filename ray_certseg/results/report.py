"""``<output>/report.md``: what was run, the dataset table and the plots (relative image links), for a person
opening the output folder (``ray-certseg report OUTPUT``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from ray_certseg import storage
from ray_certseg.job import rundir
from ray_certseg.job.rundir import RunDir
from ray_certseg.results import aggregate, analysis, plots, tables

CURVE_NOTE = (
    "Certified accuracy at radius r: for each sigma, CERTIFY at tau = Phi(r / sigma) (the tau whose radius "
    "sigma * Phi^-1(tau) is exactly r; a larger tau certifies no more pixels), pooled over the images; one "
    "line per method is the maximum over sigma, as randomized-smoothing papers plot it. Each point holds at "
    "level alpha for its own (sigma, tau), not simultaneously for the whole curve. Abstentions count as "
    "wrong."
)


def _errors(run: RunDir) -> pa.Table | None:
    """``<output>/errors.parquet`` (the failed rows), None when absent."""
    return run.read_table(rundir.ERRORS) if run.exists(rundir.ERRORS) else None


def _plot_names(run: RunDir, *pattern: str) -> list[str]:
    """File names in ``<output>/plots/`` matching the pattern parts, sorted."""
    found = storage.glob(run.path(rundir.PLOTS, *pattern), run.storage_options)
    return sorted(p.rsplit("/", 1)[-1] for p in found)


def _image(title: str, path: str) -> str:
    return f"![{title}]({path})"


def render(output: RunDir | str, *, storage_options: Mapping[str, Any] | None = None) -> str:
    """The report's Markdown: run parameters, the summary table, the plots present in ``<output>/plots/``
    and the failed rows."""
    run = RunDir.of(output, storage_options)
    cfg = analysis.load_config(run)
    metrics = analysis.load_metrics(run)
    errors = _errors(run)
    keys = run.read_table(
        rundir.METRICS, "per_image.parquet", columns=["dataset", "sigma", "image_id", "method"]
    )
    left = aggregate.left_out(keys.to_pandas()) if keys.num_rows else None  # the ids only, not the records
    s = cfg.sampling
    methods = ", ".join(
        f"`{name}` ({m.segmenter}" + (f" + {m.denoiser})" if m.denoiser else ")")
        for name, m in cfg.methods.items()
    )
    images = int(metrics["images"].max()) if len(metrics) else 0
    lines = [
        f"# Certification report: {cfg.name}",
        "",
        f"- output: `{run.url}`",
        f"- dataset: `{cfg.dataset.name}` ({images} images certified, {cfg.dataset.num_classes} classes)",
        f"- methods: {methods}",
        f"- sampling: sigma in {list(s.sigmas)}, n0 = {s.n0}, n = {s.n}, seed = {s.seed}",
        "- certification grid (metrics/): "
        + (
            ", ".join(
                f"{k} in {sorted(metrics[k].unique().tolist())}" for k in ("tau", "alpha", "correction")
            )
            if len(metrics)
            else "none"
        ),
        "",
        "## Results",
        "",
        tables.summary_markdown(metrics, errors.num_rows if errors else 0, left),
        "",
    ]
    present = set(_plot_names(run, "*.png"))
    if "certified_accuracy.png" in present:
        lines += [
            "## Certified accuracy vs radius",
            "",
            CURVE_NOTE,
            "",
            _image("certified accuracy vs radius", "plots/certified_accuracy.png"),
            "",
        ]
        if "certified_accuracy_per_sigma.png" in present:
            lines += [
                _image("per sigma", "plots/certified_accuracy_per_sigma.png"),
                "",
                "Numbers: [plots/certified_accuracy.csv](plots/certified_accuracy.csv).",
                "",
            ]
    tau, alpha, correction = plots.grid_point(metrics, cfg)
    if "iou_per_class.png" in present:
        note = (
            f"Certified IoU per class at tau = {tau:g}, alpha = {alpha:g}, {correction} (an abstention "
            "is a false negative)."
        )
        lines += ["## Per-class IoU", "", note, "", _image("per-class IoU", "plots/iou_per_class.png"), ""]
    examples = _plot_names(run, "examples", "*.png")
    if examples:
        note = (
            f"image | ground truth | clean prediction | certified map at tau = {tau:g}, alpha = "
            f"{alpha:g}, {correction} (abstain white, ignore black) | one noisy sample (estimation draw "
            "0) | its denoised version."
        )
        lines += ["## Examples", "", note, ""]
        for name in examples:
            lines += [_image(name[:-4], f"plots/examples/{name}"), ""]
    if errors is not None and errors.num_rows:
        lines += ["## Failed rows", "", tables.errors_markdown(errors), ""]
    return "\n".join(lines)


def write_report(
    output: RunDir | str, *, storage_options: Mapping[str, Any] | None = None, replot: bool = False
) -> str:
    """Write ``<output>/report.md``; returns its path. The plots are (re)drawn first with ``replot``, when
    there are none, or when they show another grid point than ``metrics/`` now holds (after a
    ``ray-certseg reduce`` with another tau/alpha)."""
    run = RunDir.of(output, storage_options)
    metrics, shown, cfg = analysis.load_metrics(run), plots.plotted_grid_point(run), analysis.load_config(run)
    if replot or shown != plots.grid_point(metrics, cfg):
        plots.write_plots(run)
    run.write_bytes(render(run).encode(), rundir.REPORT)
    return run.path(rundir.REPORT)
