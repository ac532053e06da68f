"""Per-image pictures: the example strips (image, ground truth, clean prediction, certified map, one noisy sample
and its denoised version per vote row) and, for a hierarchical procedure, the map of the level each pixel was
certified at. Each reads one image's vote rows at a time."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ray_certseg import certify
from ray_certseg.certify import ABSTAIN, SEGCERTIFY, SegCertifyParams
from ray_certseg.config import JobConfig
from ray_certseg.job.rundir import RunDir
from ray_certseg.results import analysis
from ray_certseg.results.drawing import (
    ABSTAIN_RGB,
    DPI,
    IGNORE_RGB,
    class_colours,
    colourize,
    palette_of,
    save_figure,
)

log = logging.getLogger("ray_certseg")


MAX_SAMPLE_PIXELS = 256 * 256
"""Images up to this size get the noisy / denoised panels (the models run on the CPU, in the driver)."""


MAX_PANEL_SIDE = 256
"""Strip panels are subsampled (every s-th pixel) to at most this many pixels per side."""


EXAMPLE_COLUMNS = (
    "image",
    "ground truth",
    "clean prediction",
    "certified (abstain white)",
    "noisy sample",
    "denoised sample",
)


EXAMPLE_PANEL_INCHES = 1.6


# ------------------------------------------------------------------------------------------------- examples
Samples = Mapping[tuple[str, float], tuple[np.ndarray, np.ndarray | None]]


def segcertify_map(row: Any, tau: float, alpha: float, correction: str) -> Any:
    """SegCertify's certified map of one vote row (attributes c_hat, k, n, sigma) at one point, through the
    procedure interface that the reducer certifies with."""
    return SEGCERTIFY.certify(row, SegCertifyParams(tau=tau, alpha=alpha, correction=correction))


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
        cert = segcertify_map(SimpleNamespace(**row), tau, alpha, correction)
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


def write_examples(
    run: RunDir,
    cfg: JobConfig,
    ids: Sequence[str],
    names: Sequence[str],
    point: tuple[float, float, str],
    max_sample_pixels: int,
) -> list[str]:
    """Per image id the strip ``plots/examples/<image_id>.png`` (noisy / denoised panels only for images of
    at most ``max_sample_pixels`` pixels) and, for the run's first hierarchical entry at the pictures' point,
    ``<image_id>_levels.png``: one image's vote rows read at a time, once for both pictures."""
    tau, alpha, correction = point
    levels = levels_point(cfg, point)
    columns = analysis.CERTIFY_COLUMNS + (["margin", "c_hat_levels", "k_levels"] if levels else [])
    images = load_images(cfg, ids)
    sampler = ExampleSampler(cfg)
    written = []
    for image_id in ids:
        rows = analysis.load_votes(run, columns=columns, image_ids=[image_id])
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
        written.append(save_figure(fig, run, "examples", f"{image_id}.png"))
        if levels is not None:
            fig = plot_levels(rows, levels, palette=palette_of(cfg))
            written.append(save_figure(fig, run, "examples", f"{image_id}_levels.png"))
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
        seg = segcertify_map(row, point.tau, point.alpha, point.correction)
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
        ax_row[0].text(
            -0.05,
            0.5,
            f"{row.method}\nsigma={row.sigma:g}",
            transform=ax_row[0].transAxes,
            ha="right",
            va="center",
            fontsize="small",
        )
    legend = level_legend(cert.hierarchy.num_levels)
    fig.legend(handles=legend, loc="outside lower center", ncols=len(legend), fontsize="small", frameon=False)
    fig.suptitle(
        f"{rows.iloc[0]['image_id']}: thresholds {list(point.thresholds)}, tau={point.tau:g}, "
        f"alpha={point.alpha:g}, {point.correction}",
        fontsize="small",
    )
    return fig


def levels_point(cfg: JobConfig, point: tuple[float, float, str]) -> Any:
    """The ``HierarchicalParams`` the levels maps show: the run's first hierarchical entry at the pictures'
    (tau, alpha, correction); None without one (or when that entry fixes another tau or alpha)."""
    if cfg.dataset.hierarchy is None:
        return None
    tau, alpha, correction = point
    shared = {"taus": (tau,), "alphas": (alpha,), "corrections": (correction,)}
    entries = [
        e for e in cfg.certify.procedures if isinstance(e, Mapping) and e.get("procedure") == "hierarchical"
    ]
    found = [p for p in certify.points(entries[:1], shared) if (p.params.tau, p.params.alpha) == (tau, alpha)]
    return found[0].params if found else None
