"""The reducer: certify stored votes at every configured point (certification procedure x parameters; SegCertify
over the (tau, alpha, correction) grid by default), per image, then pool per dataset.

No resampling: a vote row (c_hat, k per pixel, plus n) is all CERTIFY needs, so the grid can be changed and the
reducer re-run at will (``ray-certseg reduce OUTPUT --tau 0.95``). Per vote row and grid point it keeps one small
record (the (C+1) x (C+1) confusion matrix with abstain, the pixel counts): ``metrics/per_image.parquet``. Pooled
per (dataset, method, sigma, tau, alpha, correction) as SegCertify pools: ``metrics/metrics.parquet``, ``.csv``
and ``summary.md``. Output is a deterministic function of the votes (rows sorted, no timestamps), so a re-run
over the same votes writes byte-identical files.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ray_certseg import certify, rundir, votes
from ray_certseg.certify import ABSTAIN, max_tau, min_n
from ray_certseg.metrics import dataset_metrics, image_stats, level_stats
from ray_certseg.rundir import RunDir

log = logging.getLogger("ray_certseg")

KEY = [
    "dataset",
    "method",
    "denoiser",
    "segmenter",
    "sigma",
    "procedure",
    "params",
    "tau",
    "alpha",
    "correction",
    "n0",
    "n",
]
ID = ["image_id", "method", "sigma", "procedure", "params", "tau", "alpha", "correction"]
POINT_COLUMNS = ("tau", "alpha", "correction")
"""Parameters copied from a point into their own columns (null where the procedure has no such parameter), so
SegCertify rows read as they always did."""
SUMMARY_COLUMNS = [
    "dataset",
    "method",
    "sigma",
    "correction",
    "tau",
    "alpha",
    "radius",
    "certified_accuracy",
    "certified_error",
    "miou",
    "abstain_rate",
    "cig",
    "clean_accuracy",
    "clean_miou",
    "images",
    "seconds_per_image",
]


@dataclass(frozen=True)
class Grid:
    """What the reducer certifies each vote row at: the shared (tau, alpha, correction) grid and the
    certification procedures (entries of ``certify.procedures``; SegCertify alone by default), each expanded
    to its points by :func:`ray_certseg.certify.points`."""

    taus: tuple[float, ...]
    alphas: tuple[float, ...]
    corrections: tuple[str, ...]
    procedures: tuple[Any, ...] = ("segcertify",)

    def points(self) -> tuple[certify.Point, ...]:
        shared = {"taus": self.taus, "alphas": self.alphas, "corrections": self.corrections}
        return certify.points(self.procedures, shared)

    def __iter__(self):
        return iter(self.points())


def image_rows(rec: votes.VoteRecord, grid: Grid | Sequence[certify.Point]) -> list[dict[str, Any]]:
    """One record per point for one vote row: the point's certified map and the confusion matrices of the
    certified map, of the clean prediction and of the majority vote c_hat."""
    C, ignore = rec.num_classes, rec.ignore_index
    clean = image_stats(rec.label, rec.clean_pred, C, ignore)
    vote = image_stats(rec.label, rec.c_hat, C, ignore)
    rows = []
    flat = (np.arange(C)[None], np.ones((1, C), dtype=np.int64))
    for point in grid:
        cert = point.run(rec)
        level = getattr(cert, "level", None)
        tree = getattr(cert, "hierarchy", None)
        fine = cert.labels if level is None else np.where(level == 0, cert.labels, ABSTAIN)
        st = image_stats(rec.label, fine, C, ignore)  # a coarse certificate is no fine one: abstain here
        lv = level_stats(rec.label, cert.labels, level, *(flat if tree is None else tree.tables), ignore)
        params = point.params.model_dump()
        rows.append(
            {
                "image_id": rec.image_id,
                "dataset": rec.dataset,
                "method": rec.method,
                "denoiser": rec.denoiser,
                "segmenter": rec.segmenter,
                "sigma": rec.sigma,
                "procedure": point.procedure.name,
                "params": point.key,
                **{name: params.get(name) for name in POINT_COLUMNS},
                "n0": rec.n0,
                "n": rec.n,
                "num_classes": C,
                "radius": float(cert.radius),
                "num_certified": int(cert.num_certified),
                "family_size": rec.c_hat.size,
                "certifiable": point.can_certify(rec),
                "num_pixels": st.num_pixels,
                "num_abstained": int(np.count_nonzero(cert.labels == ABSTAIN)),
                "num_labelled": lv.num_labelled,
                "num_correct": lv.num_correct,
                "info_gain": lv.info_gain,
                "level_pixels": lv.pixels,
                "level_certified": lv.certified,
                "level_wrong": lv.wrong,
                "confusion": st.confusion.reshape(-1),
                "clean_confusion": clean.confusion.reshape(-1),
                "vote_confusion": vote.confusion.reshape(-1),
                "sample_seconds": rec.sample_seconds,
            }
        )
    return rows


PER_IMAGE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("dataset", pa.string()),
        ("method", pa.string()),
        ("denoiser", pa.string()),
        ("segmenter", pa.string()),
        ("sigma", pa.float64()),
        ("procedure", pa.string()),
        ("params", pa.string()),
        ("tau", pa.float64()),
        ("alpha", pa.float64()),
        ("correction", pa.string()),
        ("n0", pa.int32()),
        ("n", pa.int32()),
        ("num_classes", pa.int32()),
        ("radius", pa.float64()),
        ("num_certified", pa.int64()),
        ("family_size", pa.int64()),
        ("certifiable", pa.bool_()),
        ("num_pixels", pa.int64()),
        ("num_abstained", pa.int64()),
        ("num_labelled", pa.int64()),
        ("num_correct", pa.int64()),
        ("info_gain", pa.float64()),
        ("level_pixels", pa.large_list(pa.int64())),
        ("level_certified", pa.large_list(pa.int64())),
        ("level_wrong", pa.large_list(pa.int64())),
        ("confusion", pa.large_list(pa.int64())),
        ("clean_confusion", pa.large_list(pa.int64())),
        ("vote_confusion", pa.large_list(pa.int64())),
        ("sample_seconds", pa.float64()),
    ]
)


def certify_table(table: pa.Table, grid: Grid | Sequence[certify.Point]) -> pa.Table:
    """Vote rows (Arrow) -> per-image records (Arrow). The unit of work of the reducer, in or out of Ray."""
    points = tuple(grid)
    wanted = list(dict.fromkeys(["label", "c_hat", "clean_pred", *certify.columns(points)]))
    rows = [r for rec in votes.read_votes(table, columns=wanted) for r in image_rows(rec, points)]
    return pa.Table.from_pylist(rows, schema=PER_IMAGE_SCHEMA)


class CertifyBatch:
    """Ray Data UDF of the reducer stage (a class so the grid is bound once per worker)."""

    def __init__(self, grid: Grid):
        self.points = tuple(grid)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return certify_table(batch, self.points)


def per_image_local(run: RunDir, grid: Grid) -> pa.Table:
    """The reducer's map, in this process, one vote file at a time."""
    fs, files = run.vote_files()
    points = tuple(grid)
    parts = [certify_table(pq.read_table(path, filesystem=fs, partitioning=None), points) for path in files]
    return pa.concat_tables(parts) if parts else PER_IMAGE_SCHEMA.empty_table()


def per_image_ray(run: RunDir, grid: Grid) -> pa.Table:
    """The reducer's map as a Ray Data stage: read_parquet(votes) -> map_batches(CertifyBatch) -> small rows."""
    import ray

    if not run.vote_files()[1]:
        return PER_IMAGE_SCHEMA.empty_table()  # every row failed, or nothing was sampled yet
    pa_fs, pa_path = run.pyarrow_filesystem(rundir.VOTES)
    ds = ray.data.read_parquet(pa_path, filesystem=pa_fs, file_extensions=["parquet"])
    ds = ds.map_batches(
        CertifyBatch,
        fn_constructor_args=(grid,),
        batch_format="pyarrow",
        batch_size=8,
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=max(1, int(ray.cluster_resources().get("CPU", 1)))
        ),
        num_cpus=0.5,
    )
    tables = [ray.get(ref) for ref in ds.to_arrow_refs()]
    return (
        pa.concat_tables([t.cast(PER_IMAGE_SCHEMA) for t in tables if t.num_rows])
        if tables
        else PER_IMAGE_SCHEMA.empty_table()
    )


def deduplicate(per_image: pd.DataFrame) -> pd.DataFrame:
    """Sort into a canonical order; a vote row present twice (a defect upstream) is counted once, loudly."""
    per_image = per_image.sort_values(ID, kind="stable").reset_index(drop=True)
    dup = per_image.duplicated(ID)
    if dup.any():
        log.warning(
            "%d duplicated per-image rows (same image, method, sigma, grid point) ignored", int(dup.sum())
        )
        per_image = per_image[~dup].reset_index(drop=True)
    return per_image


POOLINGS = ("common", "all")


def _left_out_of(skipped: pd.DataFrame, row: dict[str, Any]) -> int:
    """How many of this row's method's images like-for-like pooling left out at its (dataset, sigma)."""
    here = (skipped["dataset"] == row["dataset"]) & (skipped["sigma"] == row["sigma"])
    return int((here & skipped["has"].str.split(", ").map(lambda h: row["method"] in h)).sum())


COMMON = ["dataset", "sigma"]  # like for like: within a (dataset, sigma), every method over the same images


def left_out(per_image: pd.DataFrame) -> pd.DataFrame:
    """The images that like-for-like pooling leaves out: per (dataset, sigma), each image that some method
    there has and another lacks (its row failed). Columns dataset, sigma, image_id, has, lacks (method names
    joined by ", ")."""
    ids = per_image[COMMON + ["image_id", "method"]].drop_duplicates()
    methods = ids.groupby(COMMON, sort=True)["method"].agg(lambda m: sorted(set(m)))
    rows = []
    for (dataset, sigma, image_id), g in ids.groupby(COMMON + ["image_id"], sort=True):
        every = methods.loc[(dataset, sigma)]
        has = sorted(set(g["method"]))
        if has != every:
            rows.append(
                {
                    "dataset": dataset,
                    "sigma": sigma,
                    "image_id": image_id,
                    "has": ", ".join(has),
                    "lacks": ", ".join(m for m in every if m not in has),
                }
            )
    return pd.DataFrame(rows, columns=COMMON + ["image_id", "has", "lacks"])


def pool(per_image: pd.DataFrame, pooling: str = "common") -> pd.DataFrame:
    """Dataset rows: per KEY group, the summed confusion matrices -> metrics (certified, clean, majority
    vote; metrics.DatasetMetrics).

    ``pooling="common"`` (the default) compares like with like: per (dataset, sigma) only the images that
    every method there has enter the pool (:func:`left_out` lists the others; ``images_left_out`` counts them
    per row). ``"all"`` pools every row each method has, so methods may cover different images."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    skipped = left_out(per_image)
    if pooling == "common" and len(skipped):
        drop = set(zip(skipped["dataset"], skipped["sigma"], skipped["image_id"]))
        keep = [k not in drop for k in zip(per_image["dataset"], per_image["sigma"], per_image["image_id"])]
        counted = per_image[keep]
    else:
        counted = per_image
    out = []
    for key, g in counted.groupby(KEY, sort=True, dropna=False):
        C = int(g["num_classes"].iloc[0])
        side = C + 1
        conf = np.stack(g["confusion"].to_numpy()).reshape(-1, side, side)
        fractions = (g["num_abstained"] / g["num_pixels"]).to_numpy()
        cert = dataset_metrics(conf, fractions)
        clean = dataset_metrics(
            np.stack(g["clean_confusion"].to_numpy()).reshape(-1, side, side).sum(0), np.zeros(len(g))
        )
        vote = dataset_metrics(
            np.stack(g["vote_confusion"].to_numpy()).reshape(-1, side, side).sum(0), np.zeros(len(g))
        )
        row = dict(zip(KEY, key))
        labelled = int(g["num_labelled"].sum())
        level_pixels = np.stack(g["level_pixels"].to_numpy()).sum(0)
        level_cert = np.stack(g["level_certified"].to_numpy()).sum(0)
        level_wrong = np.stack(g["level_wrong"].to_numpy()).sum(0)
        denominator = np.maximum(1, level_pixels)
        row.update(
            cig=float(g["info_gain"].sum()) / (labelled * math.log(C)) if labelled and C > 1 else 0.0,
            level_accuracy=int(g["num_correct"].sum()) / labelled if labelled else 0.0,
            level_share_per_level=(level_pixels / max(1, labelled)).tolist(),
            certified_rate_per_level=(level_cert / denominator).tolist(),
            abstain_rate_per_level=((level_pixels - level_cert) / denominator).tolist(),
            wrong_rate_per_level=(level_wrong / denominator).tolist(),
        )
        row.update(
            radius=float(g["radius"].iloc[0]),
            certified_accuracy=cert.accuracy,
            certified_error=cert.error_rate,
            miou=cert.miou,
            miou_present=cert.miou_present,
            classes_present=cert.num_present_classes,
            abstain_rate=cert.abstain_rate,
            abstain_rate_pooled=cert.abstain_rate_pooled,
            clean_accuracy=clean.accuracy,
            clean_miou=clean.miou,
            vote_accuracy=vote.accuracy,
            vote_miou=vote.miou,
            images=len(g),
            infeasible_images=int((~g["certifiable"]).sum()),
            max_family_size=int(g["family_size"].max()),
            pixels=cert.num_pixels,
            seconds_per_image=float(g["sample_seconds"].mean()),
            certified_dice=cert.mdice,
            dice_present=cert.mdice_present,
            worst_accuracy=cert.worst_accuracy,
            worst_miou=cert.worst_miou,
            worst_dice=cert.worst_mdice,
            pooling=pooling,
            images_left_out=_left_out_of(skipped, row) if pooling == "common" else 0,
            iou_per_class=cert.iou.tolist(),
            abstain_rate_per_class=np.nan_to_num(cert.abstain_rate_per_class, nan=-1.0).tolist(),
            dice_per_class=cert.dice.tolist(),
            worst_iou_per_class=cert.worst_iou.tolist(),
            worst_dice_per_class=cert.worst_dice.tolist(),
        )
        out.append(row)
    return pd.DataFrame(out)


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
    "dataset",
    "method",
    "sigma",
    "correction",
    "tau",
    "alpha",
    "radius",
    "certified_accuracy",
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


@dataclass
class ReduceResult:
    per_image: pd.DataFrame
    metrics: pd.DataFrame
    summary_markdown: str
    left_out: pd.DataFrame | None = None  # images like-for-like pooling left out (left_out), None for "all"


def reduction_name(grid: Grid) -> str:
    """A folder name for a re-reduction: ``tau0.6-0.75_alpha0.001_holm-bonferroni``, followed by the
    procedures' names when they are not SegCertify alone (``..._segcertify-threshold``)."""
    join = lambda values: "-".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    name = f"tau{join(grid.taus)}_alpha{join(grid.alphas)}_{join(grid.corrections)}"
    procedures = list(dict.fromkeys(p.procedure.name for p in grid.points()))
    return name if procedures == ["segcertify"] else f"{name}_{join(procedures)}"


def grid_from_output(run: RunDir | str, taus, alphas, corrections, procedures=None) -> Grid:
    """The run's grid (``config.json``'s certify section), each part replaced by the one given."""
    run = RunDir.of(run)
    cfg = run.read_json(rundir.CONFIG).get("certify", {}) if run.exists(rundir.CONFIG) else {}
    taus = taus or cfg.get("taus")
    alphas = alphas or cfg.get("alphas")
    corrections = corrections or cfg.get("corrections") or ["holm"]
    procedures = procedures or cfg.get("procedures") or ["segcertify"]
    if not taus or not alphas:
        raise ValueError(f"{run.url}: no config.json with certify.taus/alphas; pass --tau and --alpha")
    grid = Grid(
        tuple(float(t) for t in taus), tuple(float(a) for a in alphas), tuple(corrections), tuple(procedures)
    )
    grid.points()  # every entry valid, before anything is read
    return grid


def reduce_output(
    output: RunDir | str,
    *,
    storage_options: dict | None = None,
    taus: Sequence[float] | None = None,
    alphas: Sequence[float] | None = None,
    corrections: Iterable[str] | None = None,
    procedures: Sequence[Any] | None = None,
    errors: pa.Table | None = None,
    engine: str = "auto",
    into: str = rundir.METRICS,
    pooling: str = "common",
) -> ReduceResult:
    """Certify ``<output>/votes`` at every point of the grid (defaults: the run's config; ``procedures``:
    entries as in ``certify.procedures``) and write ``<output>/<into>/`` (default ``metrics/``, the run's own;
    ``ray-certseg reduce`` with another grid writes ``reductions/<name>/`` so the run's rows stay).

    ``engine``: ``ray`` runs the map as a Ray Data stage (the job, a cluster), ``local`` in this process;
    ``auto`` picks ``ray`` when Ray is initialised. Both give identical files. ``pooling``: see
    :func:`pool`."""
    run = RunDir.of(output, storage_options)
    grid = grid_from_output(run, taus, alphas, corrections, procedures)
    if engine == "auto":
        import sys

        engine = "ray" if "ray" in sys.modules and sys.modules["ray"].is_initialized() else "local"
    table = (per_image_ray if engine == "ray" else per_image_local)(run, grid)
    if errors is None and run.exists(rundir.ERRORS):
        errors = run.read_table(rundir.ERRORS)
    result = reduce_table(table, pooling, errors)
    write_metrics(run, result.per_image, result.metrics, result.summary_markdown, into=into)
    return result


def reduce_table(
    table: pa.Table | pd.DataFrame, pooling: str = "common", errors: pa.Table | None = None
) -> ReduceResult:
    """Per-image records (:func:`certify_table`'s) -> deduplicated rows, dataset metrics, the like-for-like
    left-outs and the summary (with the failed rows of ``errors``, if any): the one pooling path of the
    reducer and of ``analysis.recertify``."""
    frame = table.to_pandas() if isinstance(table, pa.Table) else table
    per_image = deduplicate(frame)
    metrics = pool(per_image, pooling) if len(per_image) else pd.DataFrame(columns=KEY)
    left = left_out(per_image) if len(per_image) and pooling == "common" else None
    n_errors = errors.num_rows if errors is not None else 0
    summary = summary_markdown(metrics, n_errors, left)
    if n_errors:  # which images failed and why, next to the numbers they are missing from
        summary += "\n\n" + errors_markdown(errors)
    return ReduceResult(per_image, metrics, summary, left)


def inputs_of(run: RunDir, config: dict[str, Any]) -> dict[str, Any]:
    """What a run's metrics and plots are a function of: this package's version, the job config (without its
    ``ray`` resources, which change no result), and the vote files and errors.parquet by path and size (one
    listing). A vote file is written once and never changed, so equal listings mean equal votes."""
    from ray_certseg import __version__

    return {
        "version": __version__,
        "config": {k: v for k, v in config.items() if k not in ("ray", "output", "storage_options")},
        "vote_files": run.sizes(rundir.VOTES),
        "errors": run.size(rundir.ERRORS),
    }


def is_current(run: RunDir, inputs: dict[str, Any]) -> bool:
    """Whether metrics/ and plots/ exist and were made from exactly ``inputs`` (:func:`record_inputs`)."""
    wanted = ((rundir.METRICS, rundir.INPUTS), (rundir.METRICS, "summary.md"), (rundir.PLOTS,))
    if not all(run.exists(*parts) for parts in wanted):
        return False
    return run.read_json(rundir.METRICS, rundir.INPUTS) == json.loads(json.dumps(inputs))


def record_inputs(run: RunDir, inputs: dict[str, Any]) -> None:
    """Note that metrics/ and plots/ now reflect ``inputs``; written last, after both."""
    run.write_json(inputs, rundir.METRICS, rundir.INPUTS)


def write_metrics(
    run: RunDir, per_image: pd.DataFrame, metrics: pd.DataFrame, summary: str, *, into: str = rundir.METRICS
) -> None:
    """``<into>/``: per_image.parquet, metrics.parquet (zstd), metrics.csv (scalars), summary.md."""
    for name, df, schema in (
        ("per_image.parquet", per_image, PER_IMAGE_SCHEMA),
        ("metrics.parquet", metrics, None),
    ):
        table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
        table = table.replace_schema_metadata(
            {k: v for k, v in (table.schema.metadata or {}).items() if k != b"pandas"}
        )
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        run.write_bytes(buf.getvalue(), into, name)
    csv = metrics.drop(columns=[c for c in metrics.columns if c.endswith(("_per_class", "_per_level"))])
    run.write_bytes(csv.to_csv(index=False, float_format="%.6g").encode(), into, "metrics.csv")
    run.write_bytes((summary + "\n").encode(), into, "summary.md")
