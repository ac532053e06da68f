"""One registry of model kinds: each spec ``kind`` maps to its spec model (``models.specs``) and its builder.

The driver validates every spec against its kind's model before Ray starts (:func:`check_spec`); the sampling
actor builds it (:func:`load_segmenter`, :func:`load_denoiser`). Builders are named as ``"module:function"``
and imported on first use, so the registry, like the specs, costs no torch import on the driver. Adding a
kind is one spec model and one line here, or, from outside the package, one :func:`register` call.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ray_certseg.models import specs

GROUPS = ("segmenters", "denoisers")


@dataclass(frozen=True)
class Kind:
    """A model kind: its spec model and its builder, ``builder(spec, device=, dtype=)`` (or its name)."""

    spec: type[specs.Spec]
    builder: str | Callable[..., Any]
    #: optional ``check(spec)``: what the builder would refuse, found without loading weights (driver side)
    check: str | Callable[..., Any] | None = None

    @property
    def keys(self) -> list[str]:
        return sorted(self.spec.model_fields)

    def build(self, spec: Mapping[str, Any], **options: Any) -> Any:
        return _resolve(self.builder)(spec, **options)

    def preflight(self, spec: Mapping[str, Any]) -> None:
        if self.check is not None:
            _resolve(self.check)(spec)


def _resolve(function: str | Callable[..., Any]) -> Callable[..., Any]:
    """A callable, or the one a ``"module:function"`` name points at (imported now)."""
    if callable(function):
        return function
    module, _, attr = function.partition(":")
    return getattr(importlib.import_module(module), attr)


KINDS: dict[str, dict[str, Kind]] = {
    "segmenters": {
        "module": Kind(
            specs.ModuleSegmenterSpec,
            "ray_certseg.models.segmenters:build_module",
            "ray_certseg.models.segmenters:check_module",
        ),
        "torchscript": Kind(
            specs.TorchscriptSegmenterSpec, "ray_certseg.models.segmenters:build_torchscript"
        ),
        "torchvision": Kind(
            specs.TorchvisionSegmenterSpec, "ray_certseg.models.segmenters:build_torchvision"
        ),
        "transformers": Kind(
            specs.TransformersSegmenterSpec,
            "ray_certseg.models.hf_segmenters:build_transformers",
            "ray_certseg.models.hf_segmenters:check_transformers",
        ),
        "segformer": Kind(
            specs.SegformerSegmenterSpec,
            "ray_certseg.models.hf_segmenters:build_transformers",
            "ray_certseg.models.hf_segmenters:check_transformers",
        ),
    },
    "denoisers": {
        "identity": Kind(specs.IdentityDenoiserSpec, "ray_certseg.models.loading:build_identity"),
        "diffusers": Kind(
            specs.DiffusersDenoiserSpec,
            "ray_certseg.models.loading:build_diffusers",
            "ray_certseg.models.loading:check_diffusers",
        ),
        "adm": Kind(
            specs.ADMDenoiserSpec,
            "ray_certseg.models.loading:build_adm",
            "ray_certseg.models.loading:check_adm",
        ),
    },
}


def register(group: str, kind: str, spec: type[specs.Spec], builder: str | Callable[..., Any]) -> None:
    """Add (or replace) a model kind of ``group`` ("segmenters" or "denoisers"). A segmenter builder returns
    ``(net, num_classes, (mean, std))``; a denoiser builder returns ``denoiser(noisy, sigma) -> denoised``."""
    if group not in KINDS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    KINDS[group][kind] = Kind(spec, builder)


def kind_of(group: str, spec: Any) -> Kind:
    """The registered kind of ``spec``; TypeError for a non-mapping, ValueError for an unknown kind."""
    noun = group[:-1]
    if not isinstance(spec, Mapping):
        raise TypeError(f"{noun} spec must be a dict with a 'kind' key, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind not in KINDS[group]:
        raise ValueError(f"unknown {noun} kind {kind!r}; use one of {sorted(KINDS[group])}")
    return KINDS[group][kind]


def check_keys(group: str, spec: Mapping[str, Any]) -> Kind:
    """The kind of ``spec``, after refusing keys its spec model does not have."""
    kind = kind_of(group, spec)
    unknown = set(spec) - set(kind.keys)
    if unknown:
        raise ValueError(
            f"unknown keys {sorted(unknown)} in a {spec['kind']!r} {group[:-1]} spec; allowed: {kind.keys}"
        )
    return kind


def check_spec(group: str, path: str, spec: Mapping[str, Any]) -> specs.Spec:
    """Validate ``spec`` against its kind's model; ValueError naming ``path.<key>``: what was expected, what
    was given, and for an unknown key the closest allowed one."""
    kind = kind_of(group, spec)
    try:
        return kind.spec.model_validate(dict(spec))
    except ValidationError as err:
        raise ValueError(_first_error(err, path, kind.keys)) from None


def _first_error(err: ValidationError, path: str, allowed: list[str]) -> str:
    first = err.errors()[0]
    where = ".".join([path, *(str(part) for part in first["loc"])])
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(first["loc"][-1]), allowed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}"
        return f"unknown key {where!r} ({hint})"
    if first["type"] == "missing":
        return f"{where}: required"
    given = first["input"]
    return f"{where}: {first['msg'][0].lower()}{first['msg'][1:]}, got {given!r}"


def load_segmenter(spec: Mapping[str, Any], *, device: Any = "cpu", dtype: Any = "float32") -> Any:
    """A ``Segmenter`` from its spec, on ``device`` in ``dtype``, eval mode, no gradients (see
    ``models.segmenters`` for the kinds)."""
    from ray_certseg.models.segmenters import assemble

    kind = check_keys("segmenters", spec)
    return assemble(spec, kind.build(spec), device=device, dtype=dtype)


def load_denoiser(spec: Mapping[str, Any] | None, *, device: Any = "cpu", dtype: Any = "float32") -> Any:
    """A denoiser from its spec; None -> None (no denoising). Kinds: see ``models.loading``."""
    if spec is None:
        return None
    return check_keys("denoisers", spec).build(spec, device=device, dtype=dtype)
