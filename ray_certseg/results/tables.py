"""The Markdown tables of a reduction: the summary (bounds, left-outs, infeasible rows), the headline table
at the end of a run, the failed rows."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import pandas as pd
import pyarrow as pa

from ray_certseg import certify
from ray_certseg.certify import max_tau, min_n
from ray_certseg.results.image_records import POINT_COLUMNS, Grid

#: the leading columns of every table of a reduction: the row, its point and its headline number
ROW_COLUMNS = ["dataset", "method", "sigma", "correction", "tau", "alpha", "radius", "certified_accuracy"]
SUMMARY_COLUMNS = [
    *ROW_COLUMNS,
    "certified_error",
    "miou",
    "abstain_rate",
    "cig",
    "clean_accuracy",
    "clean_miou",
    "images",
    "seconds_per_image",
]


ERRORS_SHOWN = 20


def errors_markdown(errors: pa.Table | None) -> str:
    """The failed rows (``errors.parquet``: image_id, method, sigma, stage, error) as a table, at most
    ERRORS_SHOWN of them; an empty string when nothing failed. A ``load`` row stands for all rows of its image."""
    if errors is None or not errors.num_rows:
        return ""
    rows = errors.to_pylist()
    cell = lambda v: "" if v is None or pd.isna(v) else str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| image_id | method | sigma | stage | error |", "|---|---|---|---|---|"]
    lines += [
        "| " + " | ".join(cell(r[k]) for k in ("image_id", "method", "sigma", "stage", "error")) + " |"
        for r in rows[:ERRORS_SHOWN]
    ]
    if len(rows) > ERRORS_SHOWN:
        lines.append(f"\n... and {len(rows) - ERRORS_SHOWN} more in errors.parquet.")
    return "\n".join(lines)


BOUNDS_COLUMNS = [
    *ROW_COLUMNS,
    "miou",
    "certified_dice",
    "worst_accuracy",
    "worst_miou",
    "worst_dice",
]


LEFT_OUT_SHOWN = 20


def bounds_markdown(metrics: pd.DataFrame) -> str:
    """Certified Dice and the worst-case lower bounds (metrics.DatasetMetrics), one row per dataset row."""
    if metrics.empty or "worst_miou" not in metrics:
        return ""
    t = _with_procedures(metrics, BOUNDS_COLUMNS)
    for c in BOUNDS_COLUMNS[6:]:
        t[c] = t[c].map(lambda x: f"{x:.3f}")
    lines = ["| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in t.itertuples(index=False)]
    return (
        "\n".join(lines) + "\n\ncertified_dice = mean over classes of 2 tp / (pos + res), an abstention "
        "a false negative (as in the IoU). worst_*: lower bounds over every perturbation within the radius, each "
        "abstained pixel counted as a false negative of its true class and a false positive of the class "
        "scored; they hold per image with probability >= 1 - alpha (all images at once: >= 1 - images * "
        "alpha). Definitions: docs/metrics.md."
    )


def left_out_markdown(left: pd.DataFrame | None, metrics: pd.DataFrame) -> str:
    """How the table pools: like for like (and which images that left out) or every row."""
    if "pooling" in metrics and len(metrics) and (metrics["pooling"] == "all").all():
        return (
            "\n\n**Every row pooled** (`--all-rows`): where a row failed, methods are averaged over "
            "different images."
        )
    if left is None or not len(left):
        return ""
    lines = [
        f"- {r.dataset}, sigma {r.sigma:g}: image `{r.image_id}` (has {r.has}; lacks {r.lacks})"
        for r in left.head(LEFT_OUT_SHOWN).itertuples(index=False)
    ]
    if len(left) > LEFT_OUT_SHOWN:
        lines.append(f"- ... and {len(left) - LEFT_OUT_SHOWN} more")
    return (
        "\n\n**Like for like**: per dataset and sigma, every method is pooled over the images that all "
        f"methods have; {len(left)} (image, sigma) pairs left out because a method's row is missing "
        "(`ray-certseg reduce OUT --all-rows` pools everything):\n" + "\n".join(lines)
    )


HEADLINE_COLUMNS = ["certified_accuracy", "certified_error", "miou", "worst_miou", "abstain_rate"]


def headline_markdown(metrics: pd.DataFrame, grid: Grid, methods: Sequence[str] = (), errors: int = 0) -> str:
    """The table printed at the end of a run: per method and sigma, at the grid's first point (its first
    procedure, first tau, alpha and correction), certified accuracy and error, mIoU, worst-case mIoU and
    abstain rate; then one line per other procedure comparing its mean abstain rate and CIG with the first's
    at the same tau, alpha and correction. ``methods``: the order to show them in (the config's)."""
    if metrics.empty:
        return "No vote rows to certify." + (f" {errors} rows failed: see errors.parquet." if errors else "")
    points = grid.points()
    first = points[0]
    base = _at_point(metrics, first)
    order = {m: i for i, m in enumerate(methods)}
    base = base.sort_values(
        ["dataset", "sigma", "method"], key=lambda c: c.map(order) if c.name == "method" and order else c
    )
    several = base["dataset"].nunique() > 1
    shared = {k: v for k, v in first.params.model_dump().items() if k in POINT_COLUMNS}
    where = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{v}" for k, v in shared.items())
    infeasible = base.get("infeasible_images", pd.Series(0, index=base.index))
    lines = [
        f"{first.procedure.name}{f' ({where})' if where else ''}, the first point of the grid:",
        "",
        "| " + " | ".join(["dataset"] * several + ["sigma", "radius", "method", *HEADLINE_COLUMNS]) + " |",
        "|" + "---|" * (several + 3 + len(HEADLINE_COLUMNS)),
    ]
    for (_, row), bad in zip(base.iterrows(), infeasible):
        cells = [row["dataset"]] * several + [f"{row['sigma']:g}", f"{row['radius']:.3f}", row["method"]]
        cells += [f"{row[c]:.3f}" for c in HEADLINE_COLUMNS]
        if bad:
            cells[-len(HEADLINE_COLUMNS)] += f" ({bad} of {row['images']} images infeasible)"
        lines.append("| " + " | ".join(cells) + " |")
    comparisons = [line for point in points[1:] if (line := _comparison(metrics, base, first, point))]
    lines += [""] + comparisons if comparisons else []
    if errors:
        lines.append(f"\n**{errors} (image, method, sigma) rows failed**: see errors.parquet.")
    return "\n".join(lines)


def _at_point(metrics: pd.DataFrame, point: certify.Point) -> pd.DataFrame:
    return metrics[(metrics["procedure"] == point.procedure.name) & (metrics["params"] == point.key)]


def _comparison(metrics: pd.DataFrame, base: pd.DataFrame, first: certify.Point, point: certify.Point) -> str:
    """One line: ``point``'s mean abstain rate and CIG against the first point's, over the (dataset, method,
    sigma) rows both have; empty for a point of the first procedure or with other shared parameters."""
    shared = lambda p: {k: v for k, v in p.params.model_dump().items() if k in POINT_COLUMNS}
    if point.procedure.name == first.procedure.name or shared(point) != shared(first):
        return ""
    keys = ["dataset", "method", "sigma"]
    both = base.merge(_at_point(metrics, point), on=keys, suffixes=("", "_other"))
    if both.empty:
        return ""
    a, b = both["abstain_rate"].mean(), both["abstain_rate_other"].mean()
    change = f" ({(b - a) / a:+.1%})" if a > 0 else ""
    return (
        f"- {point.procedure.name} {_shown_params(point.procedure.name, point.key)} vs {first.procedure.name}, "
        f"mean of {len(both)} method x sigma rows: abstain rate {a:.3f} -> {b:.3f}{change}, "
        f"CIG {both['cig'].mean():.3f} -> {both['cig_other'].mean():.3f}"
    )


def summary_markdown(metrics: pd.DataFrame, errors: int = 0, left: pd.DataFrame | None = None) -> str:
    """The dataset table a person reads first (also printed by the job); ``left``: :func:`left_out`."""
    if metrics.empty:
        return "No vote rows to certify." + (f" {errors} rows failed: see errors.parquet." if errors else "")
    t = _with_procedures(metrics, SUMMARY_COLUMNS, level_accuracy=True)
    for c in (
        "certified_accuracy",
        "certified_error",
        "miou",
        "abstain_rate",
        "cig",
        "clean_accuracy",
        "clean_miou",
        "level_accuracy",
    ):
        if c in t:
            t[c] = t[c].map(lambda x: f"{x:.3f}")
    infeasible = metrics.get("infeasible_images", pd.Series(0, index=metrics.index))
    t["certified_accuracy"] = [
        f"{a} (infeasible)" if bad == imgs else f"{a} ({bad} of {imgs} images infeasible)" if bad else a
        for a, bad, imgs in zip(t["certified_accuracy"], infeasible, metrics["images"])
    ]
    t["radius"] = t["radius"].map(lambda x: f"{x:.3f}")
    t["seconds_per_image"] = t["seconds_per_image"].map(lambda x: f"{x:.2f}")
    lines = ["| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in t.itertuples(index=False)]
    note = (
        "\n\nCertified accuracy counts abstentions as wrong; certified_error = certified pixels of the wrong "
        "class / labelled pixels; abstain_rate = mean over images of abstained / all pixels (SegCertify). "
        "radius = sigma * Phi^-1(tau), L2 in [0,1] pixel units. cig = certified information gain (Anani et "
        "al. 2024): over the correctly certified pixels, the sum of log C - log |classes under the certified "
        "node|, divided by labelled pixels x log C (for SegCertify it equals certified_accuracy)."
    )
    if "procedure" in metrics and (metrics["procedure"] != "segcertify").any():
        note += (
            " For a hierarchical row, certified_accuracy, miou and the confusion count fine-class certificates "
            "only (a coarser node counts as an abstention there); level_accuracy counts a pixel certified "
            "at its chosen level with a node that holds the true class; abstain_rate counts pixels certified "
            "at no level. Per level: metrics.parquet's *_per_level columns."
        )
    note += infeasible_note(metrics)
    note += left_out_markdown(left, metrics)
    bounds = bounds_markdown(metrics)
    if bounds:
        note += "\n\n" + bounds
    if errors:
        note += f"\n\n**{errors} (image, method, sigma) rows failed**: see errors.parquet."
    return "\n".join(lines) + note


def _with_procedures(
    metrics: pd.DataFrame, columns: list[str], *, level_accuracy: bool = False
) -> pd.DataFrame:
    """``metrics[columns]`` for a table; when a procedure other than SegCertify is there, with ``procedure``
    and (for the others) ``params`` after sigma, and ``-`` for the tau/alpha/correction a procedure lacks."""
    if "procedure" not in metrics or (metrics["procedure"] == "segcertify").all():
        return metrics[columns].copy()
    at = columns.index("sigma") + 1
    columns = columns[:at] + ["procedure", "params"] + columns[at:]
    if level_accuracy and "level_accuracy" in metrics:
        at = columns.index("certified_accuracy") + 1
        columns = columns[:at] + ["level_accuracy"] + columns[at:]
    t = metrics[columns].copy()
    t["params"] = [_shown_params(name, p) for name, p in zip(t["procedure"], t["params"])]
    for c in POINT_COLUMNS:
        t[c] = t[c].astype(object).where(t[c].notna(), "-")
    return t


def _shown_params(procedure: str, params: str) -> str:
    """The point's parameters without those that have their own column (SegCertify's: none left)."""
    if procedure == "segcertify":
        return ""
    rest = {k: v for k, v in json.loads(params).items() if k not in POINT_COLUMNS}
    return json.dumps(rest, sort_keys=True)


def infeasible_note(metrics: pd.DataFrame) -> str:
    """Why rows marked infeasible certify nothing, and what would (``certify.can_certify``): per (n, tau,
    alpha) with an image that cannot certify any pixel, the minimum n for that tau and the largest tau for n,
    at the largest image of the rows (N pixels in the family)."""
    if "infeasible_images" not in metrics or not (metrics["infeasible_images"] > 0).any():
        return ""
    bad = metrics[metrics["infeasible_images"] > 0]
    lines = []
    for (n, tau, alpha), g in bad.groupby(["n", "tau", "alpha"], sort=True):
        pixels = int(g["max_family_size"].max())
        lines.append(
            f"- n = {int(n)}, tau = {tau:g}, alpha = {alpha:g}, N = {pixels} pixels: no pixel can be "
            f"certified, whatever the model (tau^n > alpha / N). Needs n >= {min_n(tau, alpha, pixels)} "
            f"for this tau, or tau <= {math.floor(max_tau(int(n), alpha, pixels) * 1000) / 1000:.3f} for this n."
        )
    return (
        "\n\n**Infeasible rows** (certified accuracy 0 and abstain rate 1 there say nothing about the "
        "model):\n" + "\n".join(lines)
    )


def with_errors(summary: str, errors: pa.Table | None) -> str:
    """The summary followed by the failed rows (which images failed and why, next to the numbers they miss)."""
    return summary + "\n\n" + errors_markdown(errors) if errors is not None and errors.num_rows else summary
