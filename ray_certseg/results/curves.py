"""Certified accuracy, CIG and abstain rate against the L2 radius, and the threshold sweep of hierarchical
certification, each folded from stored votes in one chunked pass.

Certified accuracy vs radius. SegCertify certifies every non-abstained pixel of a vote row sampled at sigma
within one radius R = sigma * Phi^-1(tau). For a radius r > 0 the tau that certifies exactly r is

    tau(r, sigma) = Phi(r / sigma)                    (0.5 < tau < 1; a sigma with tau(r, sigma) = 1 in
                                                       float64, r / sigma > 8.2, cannot certify r)

and it is the best one: a larger tau gives a larger radius but larger p-values P[Binom(n, tau) >= k_i], so
Holm and Bonferroni reject (certify) a subset of the pixels. Per (dataset, method, sigma) the curve is

    acc_sigma(r) = pooled certified accuracy of CERTIFY(c_hat, k; tau(r, sigma), alpha, correction),

non-increasing in r; per (dataset, method) the plotted curve is the envelope acc(r) = max_sigma acc_sigma(r),
0 where no sigma can certify r, as randomized-smoothing papers plot it (Cohen et al. 2019; Carlini et al.
2023). Every point holds at level alpha for its own (sigma, tau); the max picks sigma per radius on the test
votes, as those papers do, and is not a simultaneous guarantee over the curve.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from scipy.stats import norm

from ray_certseg import votes
from ray_certseg.certify import CORRECTIONS
from ray_certseg.results import aggregate, image_records, stream
from ray_certseg.results.analysis import load_votes, source_of

log = logging.getLogger("ray_certseg")

CURVE_COLUMNS = [
    "dataset",
    "method",
    "sigma",
    "radius",
    "tau",
    "certified_accuracy",
    "miou",
    "abstain_rate",
    "images",
]
ENVELOPE_COLUMNS = ["dataset", "method", "radius", "certified_accuracy", "sigma", "tau"]
RAY_MIN_EVALUATIONS = 2e8
"""``engine="auto"`` runs the curve on Ray (when initialised) above this many pixel x radius evaluations."""


@lru_cache(maxsize=4096)
def tau_for_radius(radius: float, sigma: float) -> float:
    """tau(r, sigma) = Phi(r / sigma): the threshold whose certificate radius sigma Phi^-1(tau) is r."""
    return float(norm.cdf(radius / sigma))


def radius_grid(
    sigmas: Iterable[float], n: int, alpha: float, num_pixels: int, points: int = 32
) -> np.ndarray:
    """``points`` evenly spaced radii in (0, r_max], r_max = max(sigma) * Phi^-1(tau_max) with
    tau_max = (alpha / N)^(1/n): the largest tau at which a pixel with all n votes (p = tau^n) can still be
    certified among N pixels (the first Holm step, Bonferroni). Beyond r_max the curve is 0. When
    tau_max <= 0.5 (n too small for alpha / N) nothing is certifiable; the grid then spans tau up to 0.75."""
    sigmas = [float(s) for s in sigmas]
    if not sigmas or min(sigmas) <= 0 or n < 1 or num_pixels < 1 or not 0 < alpha < 1 or points < 1:
        raise ValueError("radius_grid needs sigmas > 0, n >= 1, num_pixels >= 1, 0 < alpha < 1, points >= 1")
    tau_max = math.exp(math.log(alpha / num_pixels) / n)
    r_max = max(sigmas) * float(norm.ppf(max(tau_max, 0.75) if tau_max <= 0.5 else tau_max))
    return np.linspace(r_max / points, r_max, points)


def check_radii(radii: Sequence[float]) -> np.ndarray:
    """The radii sorted and unique as float64; each must be finite and > 0."""
    r = np.unique(np.asarray(radii, dtype=np.float64))
    if r.size == 0 or not np.all(np.isfinite(r)) or r[0] <= 0:
        raise ValueError(
            "radii must be finite numbers > 0 (tau = Phi(r / sigma) must exceed 0.5); radius 0 "
            "is the clean / majority-vote accuracy (columns clean_accuracy, vote_accuracy)"
        )
    return r


def _taus(radii: np.ndarray, sigma: float) -> tuple[float, ...]:
    """tau(r, sigma) for every radius that this sigma can certify (0.5 < tau < 1)."""
    taus = (tau_for_radius(float(r), sigma) for r in radii)
    return tuple(t for t in taus if 0.5 < t < 1.0)


class CurveRecords:
    """Vote rows -> their per-image records at every tau(r, sigma) = Phi(r / sigma), r in ``radii``, that the
    row's sigma can certify, for each procedure entry (its tau taken from that grid): the map of the curves on
    the one chunked path (:func:`ray_certseg.results.stream.fold`), every radius folded in the same pass."""

    def __init__(
        self, radii: np.ndarray, alpha: float, correction: str, procedures: Sequence[Any] = ("segcertify",)
    ):
        self.radii, self.alpha, self.correction = radii, alpha, correction
        self.procedures = tuple(procedures)
        self.per_row = max(1, len(radii)) * len(self.procedures)
        self.columns = image_records.record_columns(self._grid((0.75,)).points())

    def _grid(self, taus: tuple[float, ...]) -> image_records.Grid:
        return image_records.Grid(taus, (self.alpha,), (self.correction,), self.procedures)

    def from_records(self, recs: Iterable[votes.VoteRecord]) -> pa.Table:
        grids: dict[float, image_records.GridRecords] = {}
        tables = []
        for rec in recs:
            taus = _taus(self.radii, rec.sigma)
            if taus:
                grid = grids.setdefault(rec.sigma, image_records.GridRecords(self._grid(taus)))
                tables.append(grid.from_records([rec]))
        return pa.concat_tables(tables) if tables else aggregate.PER_IMAGE_SCHEMA.empty_table()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.from_records(votes.read_votes(batch, columns=self.columns))


def _pooled_curve(source: stream.VoteSource, records: CurveRecords, engine: str) -> pd.DataFrame:
    """The curve's dataset rows at every tau(r, sigma) from one chunked pass over the votes: file by file in
    this process or as a Ray Data stage (``auto``: Ray when it is initialised and the work is large)."""
    if engine == "auto":
        ray_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
        if ray_up and not isinstance(source, pd.DataFrame):
            sizes = load_votes(source, columns=[])
            work = float((sizes["height"] * sizes["width"]).sum()) * records.radii.size
        else:
            work = 0.0
        engine = "ray" if work > RAY_MIN_EVALUATIONS else "local"
    pools, _ = stream.fold(source, records, engine=engine)
    return pools["all"].metrics() if not pools["all"].empty else pd.DataFrame()


def _groups(source: stream.VoteSource) -> pd.DataFrame:
    """The (dataset, method, sigma) of the vote rows, from their scalars alone."""
    frame = source if isinstance(source, pd.DataFrame) else load_votes(source, columns=[])
    return frame[["dataset", "method", "sigma"]].drop_duplicates()


def certified_accuracy_curve(
    votes_source: stream.VoteSource,
    radii: Sequence[float],
    *,
    alpha: float = 0.001,
    correction: str = "holm",
    per_sigma: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    engine: str = "auto",
) -> pd.DataFrame:
    """Certified accuracy as a function of the radius (see the module docstring for what is plotted).

    Args:
        votes_source: a :func:`load_votes` DataFrame, or an output / votes folder (local or ``s3://``) read
            chunk by chunk, every radius in one pass (``engine``: ``local``; ``ray`` as a Ray Data stage;
            ``auto``: Ray when it is initialised and the work is large).
        radii: the radii r > 0 of the curve.
        per_sigma: one row per (dataset, method, sigma, radius) the sigma can certify, with columns
            :data:`CURVE_COLUMNS`; else the envelope over sigmas.

    Returns:
        With ``per_sigma``, :data:`CURVE_COLUMNS`; else one row per (dataset, method, radius), columns
        :data:`ENVELOPE_COLUMNS` (``sigma``/``tau``: the maximiser, NaN where no sigma can certify r and the
        accuracy is 0)."""
    r = check_radii(radii)
    if correction not in CORRECTIONS:
        raise ValueError(f"correction {correction!r} is not one of {CORRECTIONS}")
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise ValueError(f"alpha must be a family-wise error level in (0, 1), got {alpha!r}")
    source = source_of(votes_source, storage_options)
    curve = radius_curves(source, r, [], alpha=float(alpha), correction=correction, engine=engine)[0]
    return curve if per_sigma else envelope(curve, r, _groups(source))


def _accuracy_table(pooled: pd.DataFrame, radii: np.ndarray) -> pd.DataFrame:
    """The per-sigma curve from SegCertify's dataset rows at every tau(r, sigma)."""
    if not len(pooled):
        return pd.DataFrame(columns=CURVE_COLUMNS)
    pooled = pooled.rename(columns={"radius": "certified_radius"})
    lookup = pd.DataFrame(
        [
            (s, r, t)
            for s in pooled["sigma"].unique()
            for r in radii
            for t in [tau_for_radius(r, s)]
            if 0.5 < t < 1.0
        ],
        columns=["sigma", "radius", "tau"],
    )
    curve = pooled.merge(lookup, on=["sigma", "tau"], how="inner")
    return curve[CURVE_COLUMNS].sort_values(["dataset", "method", "sigma", "radius"]).reset_index(drop=True)


def envelope(
    curve: pd.DataFrame, radii: Sequence[float] | None = None, groups: pd.DataFrame | None = None
) -> pd.DataFrame:
    """acc(r) = max over sigma of a per-sigma curve, per (dataset, method); the maximising sigma and tau are
    kept. With ``radii`` (and the (dataset, method) ``groups`` to cover), radii that no sigma can certify
    get accuracy 0 and NaN sigma/tau."""
    if len(curve):
        best = curve.loc[
            curve.groupby(["dataset", "method", "radius"], sort=True)["certified_accuracy"].idxmax(),
            ENVELOPE_COLUMNS,
        ]
    else:
        best = pd.DataFrame(columns=ENVELOPE_COLUMNS)
    if radii is not None:
        keys = (groups if groups is not None else curve)[["dataset", "method"]].drop_duplicates()
        full = keys.merge(pd.DataFrame({"radius": np.asarray(radii, dtype=np.float64)}), how="cross")
        best = full.merge(best, on=["dataset", "method", "radius"], how="left")
        best["certified_accuracy"] = best["certified_accuracy"].astype(float).fillna(0.0)
        best = best[ENVELOPE_COLUMNS]
    return best.sort_values(["dataset", "method", "radius"]).reset_index(drop=True)


PROCEDURE_CURVE_COLUMNS = ["dataset", "method", "procedure", "radius", "cig", "abstain_rate", "sigma", "tau"]


def procedure_curve(
    votes_source: stream.VoteSource,
    radii: Sequence[float],
    procedures: Sequence[Any],
    *,
    alpha: float = 0.001,
    correction: str = "holm",
    storage_options: Mapping[str, Any] | None = None,
    engine: str = "auto",
) -> pd.DataFrame:
    """CIG and abstain rate against the radius for each procedure entry (e.g. SegCertify and hierarchical on
    the same votes): per radius r and sigma the procedure at tau(r, sigma) = Phi(r / sigma), then per
    (dataset, method, procedure, radius) the sigma with the largest CIG (its abstain rate, sigma and tau
    kept), as :func:`certified_accuracy_curve`'s envelope does for certified accuracy. Entries that fix tau
    are left out (their radius is fixed).

    Args:
        votes_source: a :func:`load_votes` DataFrame or a path, read chunk by chunk in one pass for every
            radius and procedure.

    Returns:
        Columns :data:`PROCEDURE_CURVE_COLUMNS`."""
    if not _open_tau(procedures):
        return pd.DataFrame(columns=PROCEDURE_CURVE_COLUMNS)
    return radius_curves(
        votes_source,
        radii,
        procedures,
        alpha=alpha,
        correction=correction,
        storage_options=storage_options,
        engine=engine,
    )[1]


def radius_curves(
    votes_source: stream.VoteSource,
    radii: Sequence[float],
    procedures: Sequence[Any],
    *,
    alpha: float = 0.001,
    correction: str = "holm",
    storage_options: Mapping[str, Any] | None = None,
    engine: str = "auto",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(``certified_accuracy_curve(..., per_sigma=True)``, ``procedure_curve(...)``) from one chunked pass
    over the votes: SegCertify's points and those of every entry, at every radius, folded together (what
    the plots draw). Each frame equals the one of its own function."""
    r = check_radii(radii)
    open_tau = _open_tau(procedures)
    records = CurveRecords(r, float(alpha), correction, ["segcertify", *open_tau])
    pooled = _pooled_curve(source_of(votes_source, storage_options), records, engine)
    if not len(pooled):
        return _accuracy_table(pooled, r), _procedure_table(pooled, r)
    taus = tuple(sorted({t for s in pooled["sigma"].unique() for t in _taus(r, s)}))

    def rows_of(entries: Sequence[Any]) -> pd.DataFrame:
        grid = image_records.Grid(taus, (float(alpha),), (correction,), tuple(entries))
        keys = pd.DataFrame(
            [(p.procedure.name, p.key) for p in grid.points()], columns=["procedure", "params"]
        )
        return pooled.merge(keys, on=["procedure", "params"], how="inner")

    accuracy = _accuracy_table(rows_of(["segcertify"]), r)
    if not open_tau:
        return accuracy, pd.DataFrame(columns=PROCEDURE_CURVE_COLUMNS)
    return accuracy, _procedure_table(rows_of(open_tau), r)


def _open_tau(procedures: Sequence[Any]) -> list[Any]:
    """The entries that leave tau open (an entry that fixes tau has one radius, no curve)."""
    return [e for e in procedures if not (isinstance(e, Mapping) and "tau" in (e.get("params") or {}))]


def _procedure_table(pooled: pd.DataFrame, radii: np.ndarray) -> pd.DataFrame:
    """Per (dataset, method, procedure, radius) the sigma with the largest CIG, from the dataset rows at every
    tau(r, sigma)."""
    if not len(pooled):
        return pd.DataFrame(columns=PROCEDURE_CURVE_COLUMNS)
    lookup = pd.DataFrame(
        [
            (s, x, tau_for_radius(x, s))
            for s in pooled["sigma"].unique()
            for x in radii
            if 0.5 < tau_for_radius(x, s) < 1
        ],
        columns=["sigma", "radius", "tau"],
    )
    curve = pooled.drop(columns=["radius"]).merge(lookup, on=["sigma", "tau"], how="inner")
    keys = ["dataset", "method", "procedure", "radius"]
    best = curve.loc[curve.groupby(keys, sort=True)["cig"].idxmax(), PROCEDURE_CURVE_COLUMNS]
    return best.sort_values(keys).reset_index(drop=True)


SWEEP_COLUMNS = ["thresholds", "images", "cig", "abstain_rate", "level_accuracy", "certified_error"]


def sweep_thresholds(
    votes_source: stream.VoteSource,
    candidates: Sequence[Sequence[float]],
    *,
    hierarchy: str,
    tau: float = 0.75,
    alpha: float = 0.001,
    correction: str = "holm",
    held_out: Iterable[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """The threshold search of hierarchical certification from stored votes, without sampling again: per
    (dataset, method, sigma) and candidate threshold function (t_0 >= ... >= t_L), the pooled CIG, abstain
    rate, certified accuracy at the chosen level and certified error, every candidate folded in one chunked
    pass over the votes (:func:`ray_certseg.results.stream.fold`).

    Choosing the thresholds on the images they are then reported on is optimistic (a selection on the test
    set; every single point is still a valid certificate at level alpha, the maximum over candidates is not
    an unbiased estimate): a warning is logged unless ``held_out`` names image ids kept apart. Then the
    candidates are scored on the other images (``split == "select"``) and reported on the held-out ones
    (``split == "held_out"``), so the candidate chosen on the first can be read on the second.

    Args:
        votes_source: a :func:`load_votes` DataFrame or a path (read chunk by chunk).
        candidates: threshold functions, one value per level.
        hierarchy: the hierarchy's name or file.

    Returns:
        Columns dataset, method, sigma, split and :data:`SWEEP_COLUMNS`."""
    held = None if held_out is None else sorted(set(held_out))
    if held is None:
        log.warning(
            "sweep_thresholds: choosing thresholds on the images they are evaluated on is optimistic; pass "
            "held_out= (image ids) to select on the others and report the choice on those"
        )
    entries = [
        {"procedure": "hierarchical", "params": {"hierarchy": hierarchy, "thresholds": list(map(float, c))}}
        for c in candidates
    ]
    grid = image_records.Grid((float(tau),), (float(alpha),), (correction,), tuple(entries))
    if held is None:
        splits = {"all": None}
    else:
        in_held = lambda chunk: pc.is_in(chunk.column("image_id"), value_set=pa.array(held, pa.string()))
        splits = {"select": lambda chunk: pc.invert(in_held(chunk)), "held_out": in_held}
    pools, _ = stream.fold(
        source_of(votes_source, storage_options), image_records.GridRecords(grid), splits=splits
    )
    out = []
    for split, acc in pools.items():
        if acc.empty:
            raise ValueError(f"sweep_thresholds: no vote rows in the {split!r} split")
        m = acc.metrics()
        m = m.assign(split=split, thresholds=[str(tuple(json.loads(p)["thresholds"])) for p in m["params"]])
        out.append(m[["dataset", "method", "sigma", "split"] + SWEEP_COLUMNS])
    return pd.concat(out, ignore_index=True)
