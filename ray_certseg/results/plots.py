"""Pictures of a job's output, written into ``<output>/plots/`` (PNG, matplotlib's Agg canvas, no pyplot):

- ``certified_accuracy.png``: certified accuracy vs L2 radius, one line per method (the envelope over sigma,
  :mod:`ray_certseg.results.analysis`), at the alpha and correction of :func:`grid_point`;
  ``certified_accuracy_per_sigma.png`` the per-sigma curves it is the maximum of;
  ``certified_accuracy.csv`` the numbers behind both; ``plots.json`` the grid point and radii shown;
- ``procedures_vs_radius.png`` (when ``certify.procedures`` has more than SegCertify, e.g. hierarchical): CIG
  and abstain rate vs L2 radius, one line per (method, procedure), the sigma with the largest CIG per radius
  (:func:`ray_certseg.results.curves.procedure_curve`), numbers in ``procedures_vs_radius.csv``;
- ``iou_per_class.png``: certified IoU per class, one bar per method, one panel per sigma, at
  :func:`grid_point` (the run's first tau, alpha, correction);
- ``examples/<image_id>_levels.png`` (a run with a hierarchical procedure): ground truth, SegCertify's
  certified map and the hierarchical one coloured by the level each pixel was certified at;
- ``examples/<image_id>.png``: for the first few images, one row per (method, sigma): image | ground truth |
  clean prediction | certified map (abstain white, ignore label black) | one noisy sample | its denoised
  version. The noisy sample is estimation draw 0 of the job (same seed rule,
  :func:`ray_certseg.results.analysis.noisy_sample`), re-drawn here on the CPU with the run's models, for images of
  at most ``MAX_SAMPLE_PIXELS`` pixels (larger ones would make the driver run the models on the CPU).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ray_certseg.certify import radius
from ray_certseg.config import JobConfig
from ray_certseg.job import rundir
from ray_certseg.job.rundir import RunDir
from ray_certseg.results import analysis, curves
from ray_certseg.results.drawing import DPI, class_names, save_figure, write_file
from ray_certseg.results.examples import MAX_SAMPLE_PIXELS, example_ids, write_examples

log = logging.getLogger("ray_certseg")


def _method_colours(methods: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(sorted(methods))}


def grid_point(metrics: pd.DataFrame, cfg: JobConfig) -> tuple[float, float, str]:
    """The (tau, alpha, correction) the pictures show: the run's first; when ``ray-certseg reduce`` has since
    certified another grid, the point of ``metrics.parquet`` closest to it (same correction first, then same
    alpha, then the smallest tau)."""
    c = cfg.certify
    wanted = (c.taus[0], c.alphas[0], c.corrections[0])
    if "procedure" in metrics:  # the pictures are SegCertify's; other procedures are in the tables
        metrics = metrics[metrics["procedure"] == "segcertify"]
    listed = {
        (float(t), float(a), str(k))
        for t, a, k in metrics[["tau", "alpha", "correction"]].itertuples(index=False, name=None)
    }
    if not listed:
        return wanted
    return min(listed, key=lambda p: (p[2] != wanted[2], p[1] != wanted[1], p[0] != wanted[0], p))


def plotted_grid_point(
    output: RunDir | str, *, storage_options: Mapping[str, Any] | None = None
) -> tuple[float, float, str] | None:
    """The (tau, alpha, correction) that ``<output>/plots/`` shows (``plots.json``), None without plots."""
    run = RunDir.of(output, storage_options)
    if not run.exists(rundir.PLOTS, "plots.json"):
        return None
    shown = run.read_json(rundir.PLOTS, "plots.json")
    return float(shown["tau"]), float(shown["alpha"]), str(shown["correction"])


# --------------------------------------------------------------------------------------------------- curves
def plot_certified_accuracy(curve: pd.DataFrame, *, alpha: float, correction: str) -> Figure:
    """The envelope curve (``curves.certified_accuracy_curve``), one line per method, one panel per
    dataset."""
    datasets = sorted(curve["dataset"].unique()) or [""]
    fig = Figure(figsize=(5.2 * len(datasets), 3.8), dpi=DPI, layout="constrained")
    colours = _method_colours(curve["method"].unique())
    for ax, dataset in zip(np.atleast_1d(fig.subplots(1, len(datasets))), datasets):
        for method, g in curve[curve["dataset"] == dataset].groupby("method", sort=True):
            ax.plot(g["radius"], g["certified_accuracy"], marker=".", color=colours[method], label=method)
        ax.set(
            xlabel="L2 radius r ([0, 1] pixel units)",
            ylabel="certified pixel accuracy",
            ylim=(0, 1),
            title=f"{dataset}: max over sigma, alpha={alpha:g}, {correction}",
        )
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def plot_certified_accuracy_per_sigma(curve: pd.DataFrame, *, alpha: float, correction: str) -> Figure:
    """Per-sigma curves (``per_sigma=True``), one panel per (dataset, method), one line per sigma."""
    panels = sorted(curve[["dataset", "method"]].drop_duplicates().itertuples(index=False, name=None)) or [
        ("", "")
    ]
    fig = Figure(figsize=(4.2 * len(panels), 3.6), dpi=DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    for ax, (dataset, method) in zip(axes, panels):
        g = curve[(curve["dataset"] == dataset) & (curve["method"] == method)]
        for sigma, s in g.groupby("sigma", sort=True):
            ax.plot(s["radius"], s["certified_accuracy"], marker=".", label=f"sigma={sigma:g}")
        ax.set(xlabel="L2 radius r", title=f"{dataset} / {method}", ylim=(0, 1))
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_ylabel(f"certified accuracy (alpha={alpha:g}, {correction})")
    return fig


def plot_procedures_vs_radius(curve: pd.DataFrame, *, alpha: float, correction: str) -> Figure:
    """``curves.procedure_curve``: CIG (left) and abstain rate (right) vs radius, one line per (method,
    procedure): solid SegCertify, dashed the others; one row of panels per dataset."""
    datasets = sorted(curve["dataset"].unique()) or [""]
    fig = Figure(figsize=(10.4, 3.6 * len(datasets)), dpi=DPI, layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(datasets), 2))
    colours = _method_colours(curve["method"].unique())
    for row, dataset in zip(axes, datasets):
        for (method, procedure), g in curve[curve["dataset"] == dataset].groupby(["method", "procedure"]):
            style = {
                "color": colours[method],
                "marker": ".",
                "ls": "-" if procedure == "segcertify" else "--",
            }
            for ax, column in zip(row, ("cig", "abstain_rate")):
                ax.plot(g["radius"], g[column], label=f"{method} / {procedure}", **style)
        for ax, label in zip(row, ("certified information gain", "abstain rate")):
            ax.set(xlabel="L2 radius r ([0, 1] pixel units)", ylabel=label, ylim=(0, 1))
            ax.set_title(f"{dataset}: max CIG over sigma, alpha={alpha:g}, {correction}", fontsize="small")
            ax.set_xlim(left=0)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize="small")
    return fig


def plot_iou_per_class(
    metrics: pd.DataFrame, names: Sequence[str], *, tau: float, alpha: float, correction: str
) -> Figure:
    """Certified IoU per class from ``metrics.parquet`` rows at one grid point: one panel per
    (dataset, sigma), one bar per method (its certified mIoU in the legend)."""
    rows = metrics[
        np.isclose(metrics["tau"], tau)
        & np.isclose(metrics["alpha"], alpha)
        & (metrics["correction"] == correction)
    ]
    panels = sorted(rows[["dataset", "sigma"]].drop_duplicates().itertuples(index=False, name=None))
    fig = Figure(
        figsize=(min(24.0, max(5.0, 0.9 * len(names) + 2)), 2.8 * max(1, len(panels))),
        dpi=DPI,
        layout="constrained",
    )
    axes = np.atleast_1d(fig.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0])
    colours = _method_colours(rows["method"].unique())
    x = np.arange(len(names))
    for ax, (dataset, sigma) in zip(axes, panels):
        g = rows[(rows["dataset"] == dataset) & (rows["sigma"] == sigma)].sort_values("method")
        width = 0.8 / max(1, len(g))
        for i, row in enumerate(g.itertuples(index=False)):
            ax.bar(
                x + (i - (len(g) - 1) / 2) * width,
                row.iou_per_class,
                width,
                color=colours[row.method],
                label=f"{row.method} (mIoU {row.miou:.3f})",
            )
        ax.set(
            ylabel="certified IoU",
            ylim=(0, 1),
            title=f"{dataset}, sigma={sigma:g}, tau={tau:g} "
            f"(R={radius(sigma, tau):.3f}), "
            f"alpha={alpha:g}, {correction}",
        )
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize="small")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def write_plots(
    output: RunDir | str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    config: JobConfig | None = None,
    examples: int = 3,
    radii: Sequence[float] | None = None,
    max_sample_pixels: int = MAX_SAMPLE_PIXELS,
    engine: str = "auto",
) -> list[str]:
    """Write the plots of the module docstring into ``<output>/plots/`` and return their paths. Curves use the
    alpha and correction of :func:`grid_point`, bars and strips also its tau; ``radii`` default to
    :func:`ray_certseg.results.curves.radius_grid`. ``config``: the run's configuration (the job passes its own,
    with the secrets that ``config.json`` redacts), by default read from ``<output>/config.json``. An output
    without votes gets no plots."""
    run = RunDir.of(output, storage_options)
    cfg = config or analysis.load_config(run)
    try:
        scalars = analysis.load_votes(run, columns=[])
    except FileNotFoundError:
        log.warning("no votes in %s: no plots", run.url)
        return []
    metrics = analysis.load_metrics(run)
    tau, alpha, correction = grid_point(metrics, cfg)
    written = []
    if radii is None:
        radii = curves.radius_grid(
            scalars["sigma"].unique(),
            int(scalars["n"].max()),
            alpha,
            int((scalars["height"] * scalars["width"]).min()),
        )
    hierarchical = any(e != "segcertify" for e in cfg.certify.procedures)
    per_sigma, by_procedure = curves.radius_curves(  # one pass over the votes for both
        run,
        radii,
        cfg.certify.procedures if hierarchical else [],
        alpha=alpha,
        correction=correction,
        engine=engine,
    )
    curve = curves.envelope(
        per_sigma, curves.check_radii(radii), scalars[["dataset", "method"]].drop_duplicates()
    )
    written.append(
        write_file(run, per_sigma.to_csv(index=False, float_format="%.6g").encode(), "certified_accuracy.csv")
    )
    for name, fig in (
        ("certified_accuracy.png", plot_certified_accuracy(curve, alpha=alpha, correction=correction)),
        (
            "certified_accuracy_per_sigma.png",
            plot_certified_accuracy_per_sigma(per_sigma, alpha=alpha, correction=correction),
        ),
    ):
        written.append(save_figure(fig, run, name))
    if hierarchical:
        written += _write_procedure_curve(run, by_procedure, alpha, correction)
    names = class_names(cfg, cfg.dataset.num_classes)
    written.append(
        save_figure(
            plot_iou_per_class(metrics, names, tau=tau, alpha=alpha, correction=correction),
            run,
            "iou_per_class.png",
        )
    )
    ids = example_ids(scalars, examples)
    written += write_examples(run, cfg, ids, names, (tau, alpha, correction), max_sample_pixels)
    shown = {"tau": tau, "alpha": alpha, "correction": correction, "radii": [float(r) for r in radii]}
    written.append(write_file(run, json.dumps(shown, indent=1).encode(), "plots.json"))
    run.record_plotted()  # last: plots/ now shows what metrics/ holds
    return written


def _write_procedure_curve(run: RunDir, curve: pd.DataFrame, alpha: float, correction: str) -> list[str]:
    """``procedures_vs_radius.png`` and ``.csv`` (``curves.procedure_curve``'s frame)."""
    csv = write_file(run, curve.to_csv(index=False, float_format="%.6g").encode(), "procedures_vs_radius.csv")
    fig = plot_procedures_vs_radius(curve, alpha=alpha, correction=correction)
    return [csv, save_figure(fig, run, "procedures_vs_radius.png")]
