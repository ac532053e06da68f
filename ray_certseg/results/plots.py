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

import io
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ray_certseg.certify import ABSTAIN, certify, radius
from ray_certseg.config import JobConfig
from ray_certseg.job import rundir
from ray_certseg.job.rundir import RunDir
from ray_certseg.results import analysis, curves, reduce

log = logging.getLogger("ray_certseg")

DPI = 110
MAX_SAMPLE_PIXELS = 256 * 256
"""Images up to this size get the noisy / denoised panels (the models run on the CPU, in the driver)."""
MAX_PANEL_SIDE = 256
"""Strip panels are subsampled (every s-th pixel) to at most this many pixels per side."""
ABSTAIN_RGB = (1.0, 1.0, 1.0)
IGNORE_RGB = (0.0, 0.0, 0.0)
EXAMPLE_COLUMNS = (
    "image",
    "ground truth",
    "clean prediction",
    "certified (abstain white)",
    "noisy sample",
    "denoised sample",
)
EXAMPLE_PANEL_INCHES = 1.6


# ------------------------------------------------------------------------------------------------- colours
def class_colours(num_classes: int, palette: Sequence[str] | None = None) -> np.ndarray:
    """(num_classes, 3) RGB in [0, 1]: ``palette`` (matplotlib colours, one per class) when given, else
    matplotlib's tab10 / tab20, then evenly spaced hues."""
    from matplotlib import colormaps
    from matplotlib.colors import to_rgb

    if palette is not None:
        if len(palette) != num_classes:
            raise ValueError(f"palette has {len(palette)} colours for {num_classes} classes")
        return np.asarray([to_rgb(c) for c in palette])
    if num_classes <= 10:
        return np.asarray(colormaps["tab10"].colors[:num_classes])
    if num_classes <= 20:
        return np.asarray(colormaps["tab20"].colors[:num_classes])
    return colormaps["hsv"](np.linspace(0, 1, num_classes, endpoint=False))[:, :3]


def palette_of(cfg: JobConfig | None) -> tuple[str, ...] | None:
    """The colours classes are drawn in: ``dataset.palette``; else the class names themselves when every one
    is a named matplotlib colour (a class "red" is drawn red); else None (the default colours)."""
    if cfg is None:
        return None
    if cfg.dataset.palette is not None:
        return cfg.dataset.palette
    from matplotlib.colors import get_named_colors_mapping

    names = cfg.dataset.class_names
    named = get_named_colors_mapping()
    return tuple(names) if names and all(n in named for n in names) else None


def colourize(
    labels: np.ndarray, num_classes: int, ignore_index: int = 255, palette: Sequence[str] | None = None
) -> np.ndarray:
    """A class map (classes, ABSTAIN, ignore_index) as an RGB float image: class colours (``palette`` or the
    defaults of :func:`class_colours`), abstain white, ignore black."""
    labels = np.asarray(labels).astype(np.int64)
    colours = np.vstack([class_colours(num_classes, palette), ABSTAIN_RGB, IGNORE_RGB])
    index = np.where(
        labels == ABSTAIN, num_classes, np.where(labels == ignore_index, num_classes + 1, labels)
    )
    return colours[index]


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


def class_names(cfg: JobConfig | None, num_classes: int) -> list[str]:
    """The dataset's class names (``dataset.class_names``), else ``class 0``, ``class 1``, ..."""
    names = cfg.dataset.class_names if cfg is not None else None
    return list(names) if names else [f"class {i}" for i in range(num_classes)]


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


# ------------------------------------------------------------------------------------------------- examples
Samples = Mapping[tuple[str, float], tuple[np.ndarray, np.ndarray | None]]


def plot_example(
    rows: pd.DataFrame,
    image: np.ndarray | None,
    *,
    names: Sequence[str],
    tau: float,
    alpha: float,
    correction: str,
    samples: Samples | None = None,
    no_sample: str = "not drawn",
    palette: Sequence[str] | None = None,
) -> Figure:
    """One image's strip: a row per vote row (method, sigma) of ``rows`` (``load_votes`` rows of one image):
    image | ground truth | clean prediction | certified map at (tau, alpha, correction) | noisy sample |
    denoised sample. ``image``: uint8 (H, W, 3), or None when it cannot be read; ``samples[(method,
    sigma)]`` = (noisy, denoised or None) as (H, W, 3) float arrays; without one the last two panels show
    ``no_sample`` (denoised: "no denoiser" for a method without one). Drawn as one mosaic image in one axes
    (grey lines between panels), cheap to render; panels show every s-th pixel,
    s = ceil(max(H, W) / MAX_PANEL_SIDE)."""
    rows = rows.sort_values(["method", "sigma"])
    first = rows.iloc[0]
    C, ignore = int(first["num_classes"]), int(first["ignore_index"])
    step = -(-max(int(first["height"]), int(first["width"])) // MAX_PANEL_SIDE)
    h, w = -(-int(first["height"]) // step), -(-int(first["width"]) // step)
    pad = max(1, round(max(h, w) / 48))
    mosaic = np.full((len(rows) * (h + pad) + pad, len(EXAMPLE_COLUMNS) * (w + pad) + pad, 3), 0.6)
    row_labels, notes = [], []
    for r, row in enumerate(rows.to_dict("records")):
        cert = certify(
            row["c_hat"],
            row["k"],
            n=int(row["n"]),
            sigma=float(row["sigma"]),
            tau=tau,
            alpha=alpha,
            correction=correction,
        )
        noisy, denoised = (samples or {}).get((row["method"], float(row["sigma"])), (None, None))
        panels = [
            None if image is None else image / 255.0,
            colourize(row["label"], C, ignore, palette),
            colourize(row["clean_pred"], C, ignore, palette),
            colourize(cert.labels, C, ignore, palette),
            noisy,
            denoised,
        ]
        y = pad + r * (h + pad)
        for c, panel in enumerate(panels):
            x = pad + c * (w + pad)
            if panel is None:
                mosaic[y : y + h, x : x + w] = 0.95
                notes.append(
                    (
                        x + w / 2,
                        y + h / 2,
                        "no denoiser"
                        if c == 5 and noisy is not None
                        else "no image"
                        if c == 0
                        else no_sample,
                    )
                )
            else:
                mosaic[y : y + h, x : x + w] = np.clip(panel[::step, ::step], 0, 1)
        share = cert.num_certified / cert.labels.size
        label = f"{row['method']}\nsigma={row['sigma']:g}\nR={cert.radius:.3f}\n{share:.0%} certified"
        row_labels.append((y + h / 2, label))
    inch = EXAMPLE_PANEL_INCHES / (w + pad)  # inches per mosaic pixel
    legend = [
        Patch(facecolor=col, edgecolor="0.5", label=name)
        for col, name in zip(class_colours(C, palette), names)
    ]
    legend += [
        Patch(facecolor=ABSTAIN_RGB, edgecolor="0.5", label="abstain"),
        Patch(facecolor=IGNORE_RGB, edgecolor="0.5", label="ignore"),
    ]
    ncols = min(len(legend), 8)
    left, top, bottom = 1.1, 0.55, 0.3 + 0.26 * -(-len(legend) // ncols)
    width, height = mosaic.shape[1] * inch, mosaic.shape[0] * inch
    fig = Figure(figsize=(left + width + 0.15, top + height + bottom), dpi=DPI)
    W, H = fig.get_size_inches()
    ax = fig.add_axes((left / W, bottom / H, width / W, height / H))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    for c, title in enumerate(EXAMPLE_COLUMNS):
        ax.text(pad + c * (w + pad) + w / 2, 0, title, ha="center", va="bottom", fontsize="small")
    for y, label in row_labels:
        ax.text(-pad, y, label, ha="right", va="center", fontsize="small")
    for x, y, note in notes:
        ax.text(x, y, note, ha="center", va="center", fontsize="x-small", color="0.4")
    fig.legend(handles=legend, loc="lower center", ncols=ncols, fontsize="small", frameon=False)
    shown = f"; every {step}th pixel shown" if step > 1 else ""
    fig.suptitle(
        f"{first['image_id']}: tau={tau:g}, alpha={alpha:g}, {correction}; noisy sample = "
        f"estimation draw 0 (clipped for display){shown}",
        fontsize="small",
        y=1 - 0.08 / H,
        va="top",
    )
    return fig


class ExampleSampler:
    """Draws estimation sample 0 of a vote row in this process and denoises it: the job's models
    (``config.json``) on the CPU, each loaded once, on first use."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self._denoisers: dict[str, Any] = {}

    def denoiser(self, method: str) -> Any:
        from ray_certseg.models.registry import load_denoiser

        name = self.cfg.methods[method].denoiser
        if name and name not in self._denoisers:
            self._denoisers[name] = load_denoiser(self.cfg.models.denoisers[name], device="cpu")
        return self._denoisers.get(name) if name else None

    def __call__(
        self, image: np.ndarray, image_id: str, method: str, sigma: float
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(noisy, denoised or None) as (H, W, 3) float arrays in [0, 1] space (not clipped)."""
        import torch

        noisy = analysis.noisy_sample(image, sigma=sigma, seed=self.cfg.sampling.seed, image_id=image_id)
        den = self.denoiser(method)
        with torch.inference_mode():
            denoised = den(noisy[None], sigma)[0] if den is not None else None
        return _hwc(noisy), _hwc(denoised) if denoised is not None else None


def _hwc(image: Any) -> np.ndarray:
    """A (3, H, W) tensor as an (H, W, 3) float array."""
    return image.permute(1, 2, 0).float().numpy()


def example_ids(scalars: pd.DataFrame, count: int) -> list[str]:
    """The first ``count`` image ids, sorted."""
    return sorted(scalars["image_id"].unique())[:count]


def load_images(cfg: JobConfig, ids: Sequence[str]) -> dict[str, np.ndarray]:
    """The uint8 (H, W, 3) images of ``ids`` (those still in the dataset), read as the job reads them."""
    from ray_certseg.data import list_items, load_item

    refs = [r for r in list_items(cfg.dataset) if r["image_id"] in set(ids)]
    return {r["image_id"]: load_item(r, cfg.dataset)["image"] for r in refs}


# -------------------------------------------------------------------------------------------------- writing
def _save(fig: Figure, run: RunDir, *name: str) -> str:
    """``fig`` as ``plots/<name>`` (PNG); its path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return _write(run, buf.getvalue(), *name)


def _write(run: RunDir, data: bytes, *name: str) -> str:
    run.write_bytes(data, rundir.PLOTS, *name)
    return run.path(rundir.PLOTS, *name)


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
    per_sigma = curves.certified_accuracy_curve(
        run, radii, alpha=alpha, correction=correction, per_sigma=True, engine=engine
    )
    curve = curves.envelope(
        per_sigma, curves.check_radii(radii), scalars[["dataset", "method"]].drop_duplicates()
    )
    written.append(
        _write(run, per_sigma.to_csv(index=False, float_format="%.6g").encode(), "certified_accuracy.csv")
    )
    for name, fig in (
        ("certified_accuracy.png", plot_certified_accuracy(curve, alpha=alpha, correction=correction)),
        (
            "certified_accuracy_per_sigma.png",
            plot_certified_accuracy_per_sigma(per_sigma, alpha=alpha, correction=correction),
        ),
    ):
        written.append(_save(fig, run, name))
    if any(e != "segcertify" for e in cfg.certify.procedures):
        written += _write_procedure_curve(run, cfg, radii, alpha, correction)
    names = class_names(cfg, cfg.dataset.num_classes)
    written.append(
        _save(
            plot_iou_per_class(metrics, names, tau=tau, alpha=alpha, correction=correction),
            run,
            "iou_per_class.png",
        )
    )
    ids = example_ids(scalars, examples)
    written += _write_examples(run, cfg, ids, names, (tau, alpha, correction), max_sample_pixels)
    if cfg.dataset.hierarchy is not None:
        written += _write_levels(run, cfg, ids, (tau, alpha, correction))
    shown = {"tau": tau, "alpha": alpha, "correction": correction, "radii": [float(r) for r in radii]}
    written.append(_write(run, json.dumps(shown, indent=1).encode(), "plots.json"))
    reduce.record_plotted(run)  # last: plots/ now shows what metrics/ holds
    return written


def _write_procedure_curve(
    run: RunDir, cfg: JobConfig, radii: Sequence[float], alpha: float, correction: str
) -> list[str]:
    """``procedures_vs_radius.png`` and ``.csv`` from the votes (one chunked pass, every radius)."""
    curve = curves.procedure_curve(run, radii, cfg.certify.procedures, alpha=alpha, correction=correction)
    csv = _write(run, curve.to_csv(index=False, float_format="%.6g").encode(), "procedures_vs_radius.csv")
    fig = plot_procedures_vs_radius(curve, alpha=alpha, correction=correction)
    return [csv, _save(fig, run, "procedures_vs_radius.png")]


def _write_examples(
    run: RunDir,
    cfg: JobConfig,
    ids: Sequence[str],
    names: Sequence[str],
    point: tuple[float, float, str],
    max_sample_pixels: int,
) -> list[str]:
    """One strip per image id: ``plots/examples/<image_id>.png``; noisy / denoised panels only for images of
    at most ``max_sample_pixels`` pixels."""
    tau, alpha, correction = point
    images = load_images(cfg, ids)
    sampler = ExampleSampler(cfg)
    written = []
    for image_id in ids:  # one image's rows at a time: only what this strip draws
        rows = analysis.load_votes(run, columns=analysis.CERTIFY_COLUMNS, image_ids=[image_id])
        image = images.get(image_id)
        if image is None:
            log.warning(
                "plots: image %s is no longer in the dataset; its strip has no image or samples", image_id
            )
        small = image is not None and image.shape[0] * image.shape[1] <= max_sample_pixels
        samples = (
            {}
            if not small
            else {
                (m, float(s)): sampler(image, image_id, m, float(s))
                for m, s in rows[["method", "sigma"]].itertuples(index=False, name=None)
                if m in cfg.methods
            }
        )
        fig = plot_example(
            rows,
            image,
            names=names,
            tau=tau,
            alpha=alpha,
            correction=correction,
            samples=samples,
            no_sample=f"image > {max_sample_pixels} px",
            palette=palette_of(cfg),
        )
        written.append(_save(fig, run, "examples", f"{image_id}.png"))
    return written


LEVEL_RGB = (
    (0.10, 0.55, 0.25),
    (0.95, 0.60, 0.10),
    (0.55, 0.30, 0.70),
    (0.20, 0.45, 0.85),
    (0.60, 0.40, 0.20),
)
"""Colours of certified pixels by hierarchy level (0 = a fine class, then coarser), cycled past the fifth."""


def level_legend(num_levels: int) -> list[Patch]:
    """Legend entries of a levels map: one per level of the hierarchy (0 = a fine class), then abstain."""
    levels = [
        Patch(facecolor=LEVEL_RGB[lv % len(LEVEL_RGB)], edgecolor="0.5", label=f"level {lv}")
        for lv in range(num_levels)
    ]
    return levels + [Patch(facecolor=ABSTAIN_RGB, edgecolor="0.5", label="abstain")]


def plot_levels(rows: pd.DataFrame, point: Any, *, palette: Sequence[str] | None = None) -> Figure:
    """One image's hierarchical certificate: a row per vote row (method, sigma): ground truth | SegCertify's
    certified map at the point's tau, alpha, correction | the hierarchical map coloured by the level each
    certified pixel got (``LEVEL_RGB``; abstain white, ignore black). ``point``: a ``HierarchicalParams``;
    ``rows``: ``load_votes`` rows of one image with the hierarchy columns."""
    from ray_certseg.certify.hierarchical import certify_hierarchical

    rows = rows.sort_values(["method", "sigma"])
    fig = Figure(figsize=(3 * 2.0 + 1.2, 2.0 * len(rows) + 0.8), dpi=DPI, layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), 3))
    for ax_row, row in zip(axes, rows.itertuples(index=False)):
        C, ignore = int(row.num_classes), int(row.ignore_index)
        seg = certify(row.c_hat, row.k, n=row.n, sigma=row.sigma, tau=point.tau, alpha=point.alpha,
                      correction=point.correction)  # fmt: skip
        cert = certify_hierarchical(row, point)
        level_colours = np.array([LEVEL_RGB[lv % len(LEVEL_RGB)] for lv in range(int(cert.level.max()) + 1)])
        by_level = level_colours[cert.level.astype(np.intp)]
        by_level[cert.labels == ABSTAIN] = ABSTAIN_RGB
        by_level[np.asarray(row.label) == ignore] = IGNORE_RGB
        abstain = [float(np.mean(m == ABSTAIN)) for m in (seg.labels, cert.labels)]
        # every s-th pixel, s = ceil(max(H, W) / MAX_PANEL_SIDE), as the example strips: a 1024 x 2048
        # panel would be a 50 MB float image for a picture drawn a few hundred pixels wide
        s = slice(None, None, -(-max(row.label.shape) // MAX_PANEL_SIDE))
        panels = (
            (colourize(row.label[s, s], C, ignore, palette), "ground truth"),
            (colourize(seg.labels[s, s], C, ignore, palette), f"segcertify: {abstain[0]:.0%} abstain"),
            (by_level[s, s], f"hierarchical by level: {abstain[1]:.0%} abstain"),
        )
        for ax, (panel, title) in zip(ax_row, panels):
            ax.imshow(panel, interpolation="nearest")
            ax.set_title(title, fontsize="small")
            ax.set_axis_off()
        ax_row[0].text(-0.05, 0.5, f"{row.method}\nsigma={row.sigma:g}", transform=ax_row[0].transAxes,
                       ha="right", va="center", fontsize="small")  # fmt: skip
    legend = level_legend(cert.hierarchy.num_levels)
    fig.legend(handles=legend, loc="outside lower center", ncols=len(legend), fontsize="small", frameon=False)
    fig.suptitle(f"{rows.iloc[0]['image_id']}: thresholds {list(point.thresholds)}, tau={point.tau:g}, "
                 f"alpha={point.alpha:g}, {point.correction}", fontsize="small")  # fmt: skip
    return fig


def _write_levels(
    run: RunDir, cfg: JobConfig, ids: Sequence[str], point: tuple[float, float, str]
) -> list[str]:
    """``plots/examples/<image_id>_levels.png`` for the run's first hierarchical entry, at the pictures' point."""
    from ray_certseg import certify

    tau, alpha, correction = point
    shared = {"taus": (tau,), "alphas": (alpha,), "corrections": (correction,)}
    entries = [
        e for e in cfg.certify.procedures if isinstance(e, Mapping) and e.get("procedure") == "hierarchical"
    ]
    found = [p for p in certify.points(entries[:1], shared) if (p.params.tau, p.params.alpha) == (tau, alpha)]
    if not found:
        return []
    columns = analysis.CERTIFY_COLUMNS + ["margin", "c_hat_levels", "k_levels"]
    written = []
    for image_id in ids:  # one image's rows at a time
        rows = analysis.load_votes(run, columns=columns, image_ids=[image_id])
        fig = plot_levels(rows, found[0].params, palette=palette_of(cfg))
        written.append(_save(fig, run, "examples", f"{image_id}_levels.png"))
    return written
