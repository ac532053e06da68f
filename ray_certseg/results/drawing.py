"""What every picture of a run shares: class colours (a palette, or matplotlib's), class maps as RGB images with
abstain white and ignore black, and writing a figure into ``<output>/plots/``."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from ray_certseg.certify import ABSTAIN
from ray_certseg.config import JobConfig
from ray_certseg.job import rundir
from ray_certseg.job.rundir import RunDir

DPI = 110


ABSTAIN_RGB = (1.0, 1.0, 1.0)


IGNORE_RGB = (0.0, 0.0, 0.0)


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


def class_names(cfg: JobConfig | None, num_classes: int) -> list[str]:
    """The dataset's class names (``dataset.class_names``), else ``class 0``, ``class 1``, ..."""
    names = cfg.dataset.class_names if cfg is not None else None
    return list(names) if names else [f"class {i}" for i in range(num_classes)]


# -------------------------------------------------------------------------------------------------- writing
def save_figure(fig: Figure, run: RunDir, *name: str) -> str:
    """``fig`` as ``plots/<name>`` (PNG); its path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_file(run, buf.getvalue(), *name)


def write_file(run: RunDir, data: bytes, *name: str) -> str:
    run.write_bytes(data, rundir.PLOTS, *name)
    return run.path(rundir.PLOTS, *name)
