"""The pandas API of a job's output, importable as ``ray_certseg.analysis`` (the notebooks' and users' name).

The code lives in :mod:`ray_certseg.results.analysis` (loading, re-certification) and
:mod:`ray_certseg.results.curves` (certified accuracy against the radius, procedure curves, threshold sweeps).
"""

from ray_certseg.results.analysis import (
    load_config,
    load_metrics,
    load_votes,
    noisy_sample,
    recertify,
    records,
    votes_dir,
)
from ray_certseg.results.curves import (
    certified_accuracy_curve,
    envelope,
    procedure_curve,
    radius_grid,
    sweep_thresholds,
    tau_for_radius,
)

__all__ = [
    "certified_accuracy_curve",
    "envelope",
    "load_config",
    "load_metrics",
    "load_votes",
    "noisy_sample",
    "procedure_curve",
    "radius_grid",
    "recertify",
    "records",
    "sweep_thresholds",
    "tau_for_radius",
    "votes_dir",
]
