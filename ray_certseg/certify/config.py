"""The ``certify`` section of a job config: which procedures, at which points (:func:`.procedure.points`)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from ray_certseg.certify.procedure import points
from ray_certseg.certify.segcertify import CORRECTIONS
from ray_certseg.validation import Invalid, Section, list_of, rule

Tau = rule(float, "a number with 0.5 < tau < 1", gt=0.5, lt=1)
Alpha = rule(float, "a number with 0 < alpha < 1", gt=0, lt=1)
Correction = Annotated[Literal[CORRECTIONS], Field(description=f"one of {', '.join(CORRECTIONS)}")]


class CertifyConfig(Section):
    """What every vote row is certified at: each procedure of ``procedures`` (SegCertify by default) at each
    of its points, the parameters it leaves open (tau, alpha, correction) taken from the shared grid
    taus x alphas x corrections (:func:`ray_certseg.certify.points`)."""

    path: ClassVar[str] = "certify"
    taus: list_of(Tau) = (0.75,)
    alphas: list_of(Alpha) = (0.001,)
    corrections: list_of(Correction) = CORRECTIONS
    procedures: list_of(Any, "a non-empty list of procedures (e.g. [segcertify])", distinct=False) = (
        "segcertify",
    )

    @model_validator(mode="after")
    def _points(self) -> CertifyConfig:
        try:  # every entry names a procedure and gives it valid parameters, before anything starts
            points(self.procedures, dict(self), "certify.procedures")
        except ValueError as exc:
            raise Invalid("", str(exc), whole=True) from None
        return self
