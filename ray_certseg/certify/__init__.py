"""Certification procedures behind one interface (:mod:`.procedure`); numpy/scipy only, no torch, no Ray.

:mod:`.segcertify` is SegCertify's per-pixel binomial test with Holm or Bonferroni over the image (its
functions are re-exported here: ``from ray_certseg.certify import certify``).
"""

from ray_certseg.certify.procedure import (
    ABSTAIN,
    PROCEDURES,
    CertifiedMap,
    Params,
    Point,
    Procedure,
    columns,
    get,
    points,
    register,
)
from ray_certseg.certify.segcertify import (
    CORRECTIONS,
    SEGCERTIFY,
    Certificate,
    SegCertifyParams,
    can_certify,
    certify,
    check_votes,
    max_tau,
    min_n,
    pvalues,
    radius,
    reject_by_votes,
    select,
    vote_histogram,
)

__all__ = [
    "ABSTAIN",
    "CORRECTIONS",
    "PROCEDURES",
    "SEGCERTIFY",
    "Certificate",
    "CertifiedMap",
    "Params",
    "Point",
    "Procedure",
    "SegCertifyParams",
    "can_certify",
    "certify",
    "check_votes",
    "columns",
    "get",
    "max_tau",
    "min_n",
    "points",
    "pvalues",
    "radius",
    "register",
    "reject_by_votes",
    "select",
    "vote_histogram",
]
