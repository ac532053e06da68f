"""The certification-procedure interface: what the reducer, recertify and the CLI iterate over.

A procedure turns one stored vote row into a certified map, without resampling:

* ``name``: how configs, tables and the CLI call it;
* ``params``: a pydantic model of one parameter point (strict, unknown keys refused), checked on the driver;
* ``certify(rec, params)``: a vote row (anything with the vote columns as attributes, e.g.
  :class:`ray_certseg.votes.VoteRecord`) -> a :class:`CertifiedMap` (labels with ``ABSTAIN``, radius);
* ``columns``: the vote columns it reads (beyond the scalar ones, which are always there);
* ``certifiable(rec, params)`` (optional): whether the point can certify any pixel of the row at all.

A configured procedure is an *entry*: ``"segcertify"``, or ``{procedure: NAME, params: {...}, grid: {...}}``.
Its points are the product over ``grid``'s lists, with ``params`` fixed; a parameter named ``tau``, ``alpha``
or ``correction`` that the entry leaves open takes the job's shared grid (``certify.taus``, ``alphas``,
``corrections``), so every binomial-test procedure is certified at the same points unless told otherwise.
``NAME`` is a registered name (:data:`PROCEDURES`, :func:`register`) or ``"package.module:ATTRIBUTE"`` naming
a :class:`Procedure`, imported on the driver and on the workers.

Numpy, scipy and pydantic only: no torch, no Ray.
"""

from __future__ import annotations

import importlib
import itertools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

ABSTAIN = -1
"""Label of a pixel that is not certified (SegCertify's abstain)."""


class Params(BaseModel):
    """Base of a procedure's parameter model: strict, frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


@dataclass(frozen=True, eq=False)
class CertifiedMap:
    """A procedure's answer for one vote row: ``labels`` (the certified class per pixel, ``ABSTAIN`` elsewhere)
    and ``radius``, the L2 radius of every certified pixel in [0, 1] pixel units. A hierarchical procedure
    also gives ``level`` (the level of each pixel's node; labels are then node ids of that level) and the
    ``hierarchy`` (:class:`ray_certseg.certify.class_tree.Hierarchy`) the nodes belong to; without them every label
    is a fine class (level 0)."""

    labels: np.ndarray
    radius: float
    level: np.ndarray | None = None
    hierarchy: Any = None

    @property
    def num_certified(self) -> int:
        return int(np.count_nonzero(self.labels != ABSTAIN))


@dataclass(frozen=True)
class Procedure:
    """One certification procedure (see the module docstring)."""

    name: str
    params: type[Params]
    certify: Callable[[Any, Any], Any]
    columns: tuple[str, ...] = ("c_hat", "k")
    certifiable: Callable[[Any, Any], bool] | None = None


@dataclass(frozen=True)
class Point:
    """One procedure at one parameter point: the unit the reducer certifies a vote row at."""

    procedure: Procedure
    params: Params

    @property
    def key(self) -> str:
        """The point's parameters as canonical JSON (sorted keys): the tables' ``params`` column."""
        return json.dumps(self.params.model_dump(mode="json"), sort_keys=True)

    def run(self, rec: Any) -> Any:
        return self.procedure.certify(rec, self.params)

    def can_certify(self, rec: Any) -> bool:
        check = self.procedure.certifiable
        return True if check is None else bool(check(rec, self.params))


PROCEDURES: dict[str, Procedure | str] = {
    "segcertify": "ray_certseg.certify.segcertify:SEGCERTIFY",
    "hierarchical": "ray_certseg.certify.hierarchical:HIERARCHICAL",
}
"""Registered procedures: name -> Procedure, or ``"module:ATTRIBUTE"`` imported on first use."""

SHARED = {"tau": "taus", "alpha": "alphas", "correction": "corrections"}
"""Parameters an entry leaves open that take the job's shared grid (``certify.<plural>``)."""


def register(procedure: Procedure) -> Procedure:
    """Add (or replace) a procedure under its name; returns it (usable as a decorator's last step)."""
    PROCEDURES[procedure.name] = procedure
    return procedure


def get(name: str) -> Procedure:
    """The registered procedure ``name``, or the Procedure a ``"module:ATTRIBUTE"`` name points at."""
    found = PROCEDURES.get(name, name if ":" in name else None)
    if found is None:
        raise ValueError(
            f"unknown certification procedure {name!r}; known: {sorted(PROCEDURES)}, or give "
            "'package.module:ATTRIBUTE' naming a ray_certseg.certify.Procedure"
        )
    if isinstance(found, str):
        module, _, attr = found.partition(":")
        try:
            found = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import certification procedure {name!r}: {exc}") from exc
        if not isinstance(found, Procedure):
            raise TypeError(f"{name!r} is a {type(found).__name__}, not a ray_certseg.certify.Procedure")
    return found


def points(
    entries: Iterable[str | Mapping[str, Any]],
    shared: Mapping[str, Sequence[Any]],
    path: str = "certify.procedures",
) -> tuple[Point, ...]:
    """Every point of every entry (see the module docstring), validated; duplicates kept once, in order.
    ``shared``: ``{"taus": [...], "alphas": [...], "corrections": [...]}``. Errors name ``path[i]``."""
    out: dict[tuple[str, str], Point] = {}
    for i, entry in enumerate(entries):
        where = f"{path}[{i}]"
        entry = {"procedure": entry} if isinstance(entry, str) else dict(entry)
        unknown = sorted(set(entry) - {"procedure", "params", "grid"})
        if unknown or "procedure" not in entry:
            raise ValueError(
                f"{where}: an entry is a procedure name or {{procedure: NAME, params: {{...}}, grid: {{...}}}}"
                + (f"; unknown keys {unknown}" if unknown else "; 'procedure' is missing")
            )
        try:
            procedure = get(str(entry["procedure"]))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}.procedure: {exc}") from None
        fixed, grid = dict(entry.get("params") or {}), dict(entry.get("grid") or {})
        for name, plural in SHARED.items():
            if name in procedure.params.model_fields and name not in fixed and name not in grid:
                grid[name] = list(shared[plural])
        for name, values in grid.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"{where}.grid.{name}: give a non-empty list of values, got {values!r}")
        names = list(grid)
        for combo in itertools.product(*(grid[n] for n in names)):
            try:
                params = procedure.params(**fixed, **dict(zip(names, combo)))
            except ValidationError as exc:
                error = exc.errors()[0]
                key = ".".join(str(p) for p in error["loc"])
                raise ValueError(
                    f"{where}: {procedure.name} parameter {key}: {error['msg'][0].lower()}{error['msg'][1:]}"
                    + (f", got {error['input']!r}" if error["type"] != "missing" else "")
                ) from None
            point = Point(procedure, params)
            out.setdefault((procedure.name, point.key), point)
    return tuple(out.values())


def columns(points_: Iterable[Point]) -> list[str]:
    """The vote array columns the points read, in first-use order."""
    return list(dict.fromkeys(c for p in points_ for c in p.procedure.columns))
