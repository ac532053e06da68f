"""Typed, validated job configuration: YAML file + ``--set key.sub=value`` overrides -> :class:`JobConfig`.

Sections (the README's Configuration shows every key with its default; ``ray-certseg schema`` prints the JSON
Schema): ``name``, ``output`` (local or s3://, made absolute), ``storage_options`` (redacted in to_dict(), never
logged), ``dataset`` (:mod:`ray_certseg.data.config`), ``models`` (each spec checked against its kind's model,
:mod:`ray_certseg.models.specs`), ``methods``, ``sampling``, ``certify`` (:mod:`ray_certseg.certify.config`),
``ray``. Validation follows the method: sigma > 0, 0.5 < tau < 1, 0 < alpha < 1, n0 >= 1, 1 <= n < 65536 (k is
stored as uint16). Every error is one line naming its key path (:mod:`ray_certseg.validation`).

Relative paths (``dataset.root``, ``manifest``, ``hierarchy``, ``ray.runtime_env``'s ``py_modules`` and
``working_dir``, and the model-spec keys of :func:`ray_certseg.models.specs.is_path_key`) resolve against the
working directory if they exist there, else the config file's folder if they exist there, else stay as written
(a hub id, or a path that exists only on the workers). URLs are never changed.
"""

from __future__ import annotations

import copy
import functools
import operator
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ray_certseg import storage
from ray_certseg.certify.config import CertifyConfig
from ray_certseg.data.config import DatasetConfig, Subset
from ray_certseg.models import registry
from ray_certseg.models.specs import is_path_key
from ray_certseg.validation import (
    ConfigError,
    Count,
    Flag,
    Invalid,
    Name,
    NonNegFloat,
    Options,
    PosFloat,
    PosInt,
    Section,
    base_dir_of,
    check_name,
    first_error,
    hint,
    list_of,
    resolve_path,
    rule,
    show,
)

DTYPES = ("float32", "bfloat16", "float16")
__all__ = ["ConfigError", "DatasetConfig", "JobConfig", "Subset", "apply_overrides", "load_config"]


# ------------------------------------------------------------------------------------------- models, methods
def _specs_of(group: str) -> Any:
    """The shipped kinds of ``group`` as a union discriminated on ``kind`` (what the JSON Schema shows)."""
    return Annotated[
        functools.reduce(operator.or_, [k.spec for k in registry.KINDS[group].values()]),
        Field(discriminator="kind"),
    ]


SegmenterSpecs, DenoiserSpecs = _specs_of("segmenters"), _specs_of("denoisers")


class ModelsConfig(Section):
    """Named model specs, each checked against its kind's spec model (kinds registered later included) and
    kept as the mapping given, with relative paths resolved: the kind's builder reads it."""

    path: ClassVar[str] = "models"
    segmenters: dict[str, SegmenterSpecs] = Field(default_factory=dict)
    denoisers: dict[str, DenoiserSpecs] = Field(default_factory=dict)

    @field_validator("segmenters", "denoisers", mode="wrap")
    @classmethod
    def _specs(cls, value: Any, handler: Any, info: ValidationInfo) -> dict[str, dict[str, Any]]:
        group, base, out = info.field_name, base_dir_of(info), {}
        kinds = ", ".join(registry.KINDS[group])
        if not isinstance(value, Mapping):
            raise Invalid("", requirement="a mapping", value=value)
        for name, spec in value.items():
            check_name(name)
            if not isinstance(spec, Mapping):
                raise Invalid(name, requirement="a mapping", value=spec)
            if "kind" not in spec:
                raise Invalid(f"{name}.kind", f"required (one of {kinds})")
            if spec["kind"] not in registry.KINDS[group]:
                raise Invalid(f"{name}.kind", requirement=f"one of {kinds}", value=spec["kind"])
            try:
                registry.check_spec(group, f"models.{group}.{name}", spec)
            except ValueError as err:
                raise Invalid("", str(err), whole=True) from None
            out[name] = {k: resolve_path(v, base) if is_path_key(k) else v for k, v in spec.items()}
        return out


class MethodConfig(Section):
    """One certified pipeline: a segmenter, optionally behind a denoiser."""

    segmenter: str
    denoiser: str | None = None


# ------------------------------------------------------------------------------------ sampling, certify, ray
class SamplingConfig(Section):
    """Monte Carlo sampling: n0 selection and n estimation samples per (image, method, sigma).

    ``tile_pixels``: a tile-mode denoiser sends the tiles of all ``batch_size`` samples through its network
    ``tile_pixels // sample_size**2`` at a time; ``auto`` measures one tile's activation memory on the GPU
    and fills half the free memory (at most 32 tiles a call), and on the CPU keeps one tile position of every
    sample per call."""

    path: ClassVar[str] = "sampling"
    sigmas: list_of(PosFloat) = (0.25, 0.5)
    n0: PosInt = 10
    n: Count = 100
    batch_size: PosInt = 16
    seed: rule(int, f"an integer in [0, {2**63 - 1}]", ge=0, le=2**63 - 1) = 0
    device: rule(str, "auto, cpu, cuda or cuda:N", pattern=r"^(auto|cpu|cuda(:\d+)?)$") = "auto"
    dtype: Annotated[Literal[DTYPES], Field(description=f"one of {', '.join(DTYPES)}")] = "float32"
    channels_last: Flag = False
    compile: Flag = False
    store_counts: Flag = False
    keep_host_memory: Flag = True
    tile_pixels: Annotated[
        PosInt | Literal["auto"],
        Field(
            description='an integer >= 1 (denoiser input pixels per network call in tile mode) or "auto" '
            "(from free GPU memory; on the CPU one tile position of every sample per call)"
        ),
    ] = "auto"


class ActorRange(Section):
    min: PosInt = 1
    max: PosInt

    @model_validator(mode="after")
    def _ordered(self) -> ActorRange:
        if self.max < self.min:
            raise Invalid("max", requirement=f"an integer >= {self.min}", value=self.max)
        return self


def _local(value: str, info: ValidationInfo) -> str:
    """A local path resolved like model paths (the driver checks that it exists: Ray uploads it), or a URL."""
    return value if "://" in value else resolve_path(value, base_dir_of(info))


Upload = Annotated[
    rule(str, "a package folder, a .py file, a .whl or a URL", min_length=1), AfterValidator(_local)
]


class RuntimeEnv(Section):
    """Ray's runtime_env for the sampling actors, so user code and packages reach the workers the same way
    locally and on a cluster; URLs and pip names pass through."""

    py_modules: Annotated[list[Upload], Field(min_length=1, description="a non-empty list")] | None = None
    working_dir: Upload | None = None
    pip: list[str] | dict[str, Any] | str | None = None
    uv: list[str] | dict[str, Any] | str | None = None
    env_vars: dict[str, Annotated[str, BeforeValidator(str)]] | None = None
    excludes: list[str] | None = None
    config: dict[str, Any] | None = None


class RayConfig(Section):
    """Cluster resources: a fixed actor pool (``actors: N``) or an autoscaling one (``{min: a, max: b}``), and
    how work and vote rows are grouped. ``batch_size``: images per Ray batch; ``auto`` fits ``batch_pixels``
    pixels of the first image (at least 1, at most 64, and small enough that every actor gets two batches).
    ``rows_per_file``: the least vote rows per Parquet file; ``auto`` fills ``file_bytes`` of in-memory rows,
    at most 4096 and at most a quarter of each actor's share of the rows to sample. A crash loses at most the rows not yet in a file, so larger files mean fewer objects and
    more work redone after a crash (README, "Vote files"). Each actor runs two calls at once, one decoding while
    the other samples, when ``max_tasks_in_flight_per_actor`` >= 2 (the default)."""

    path: ClassVar[str] = "ray"
    address: rule(str, "a string", min_length=1) | None = None
    actors: Annotated[PosInt | dict[str, int], Field(description="an integer >= 1 or {min: a, max: b}")] = 1
    num_gpus_per_actor: NonNegFloat = 0.0
    num_cpus_per_actor: NonNegFloat = 1.0
    batch_size: Annotated[
        PosInt | Literal["auto"],
        Field(description='an integer >= 1 (images per Ray batch) or "auto" (from batch_pixels)'),
    ] = "auto"
    batch_pixels: PosInt = 1 << 20
    rows_per_file: Annotated[
        PosInt | Literal["auto"],
        Field(description='an integer >= 1 (vote rows per file, at least) or "auto" (from file_bytes)'),
    ] = "auto"
    file_bytes: PosInt = 64 << 20
    max_tasks_in_flight_per_actor: PosInt = 2
    runtime_env: RuntimeEnv | None = None

    @field_validator("actors", mode="before")
    @classmethod
    def _actors(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            try:
                return ActorRange.model_validate(value).model_dump()
            except ValidationError as err:
                raise Invalid("", first_error(err, ActorRange, "ray.actors"), whole=True) from None
        if type(value) is not int or value < 1:
            raise Invalid("", requirement="an integer >= 1 or {min: a, max: b}", value=value)
        return value

    @field_validator("batch_size", "rows_per_file", mode="before")
    @classmethod
    def _count_or_auto(cls, value: Any, info: ValidationInfo) -> Any:
        if value != "auto" and (type(value) is not int or value < 1):
            rule_ = cls.model_fields[info.field_name].description
            raise Invalid("", requirement=rule_, value=value)
        return value

    @field_validator("runtime_env")
    @classmethod
    def _given_keys(cls, env: RuntimeEnv | None) -> dict[str, Any] | None:
        return None if env is None else env.model_dump(exclude_unset=True)


# ------------------------------------------------------------------------------------------------------- job
SECTIONS = ("sampling", "certify", "ray", "models")


class JobConfig(Section):
    """The whole job: where to read, which models/methods, sampling and certification grids, resources."""

    name: Name = "job"
    output: rule(str, "a path or URL", min_length=1) = ""
    storage_options: Options = Field(default_factory=dict)
    dataset: Annotated[
        DatasetConfig, Field(description="a mapping with kind, root or manifest, num_classes, ...")
    ]
    models: ModelsConfig = ModelsConfig()
    methods: dict[str, MethodConfig] = Field(default_factory=dict)
    sampling: SamplingConfig = SamplingConfig()
    certify: CertifyConfig = CertifyConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """``output`` defaults to outputs/<name>; a null section is its defaults; the dataset's
        ``storage_options`` are the job's, overridden by its own."""
        if not isinstance(data, Mapping):
            return data
        d = {k: v for k, v in data.items() if not (k in SECTIONS and v is None)}
        if "output" not in d and isinstance(d.get("name", "job"), str):
            d["output"] = f"outputs/{d.get('name', 'job')}"
        options, dataset = d.get("storage_options") or {}, d.get("dataset")
        if isinstance(options, Mapping) and isinstance(dataset, Mapping):
            own = dataset.get("storage_options") or {}
            d["dataset"] = {
                **dataset,
                "storage_options": {**options, **own} if isinstance(own, Mapping) else own,
            }
        return d

    @field_validator("output")
    @classmethod
    def _output(cls, value: str) -> str:
        return storage.strip_protocol(value) if storage.is_local(value) else value

    @field_validator("methods", mode="before")
    @classmethod
    def _method_names(cls, value: Any) -> Any:
        for name in value if isinstance(value, Mapping) else ():
            check_name(name)
        return value

    @model_validator(mode="after")
    def _references(self) -> JobConfig:
        if not self.methods:
            raise Invalid(
                "methods", "at least one method {NAME: {segmenter: NAME, denoiser: NAME | null}} is required"
            )
        for name, method in self.methods.items():
            for key, ref in (("segmenter", method.segmenter), ("denoiser", method.denoiser)):
                group = getattr(self.models, f"{key}s")
                if ref is not None and ref not in group:
                    raise Invalid(
                        f"methods.{name}.{key}",
                        f"unknown {key} {show(ref)} (models.{key}s: {hint(str(ref), group, 'defined')})",
                    )
        return self

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """A plain mapping (lists, str keys) for recording in outputs; :meth:`from_dict` reads it back.
        With ``redact`` every secret in ``storage_options`` is replaced by ``***``."""
        secret = lambda options: storage.redact_options(options) if redact else dict(options)
        own = {k: v for k, v in self.dataset.storage_options.items() if self.storage_options.get(k) != v}
        keys = {"name", "output", "methods", "sampling", "certify", "ray"}
        return {
            **self.model_dump(mode="json", include=keys, warnings=False),  # runtime_env: kept as given
            "storage_options": secret(self.storage_options),
            "dataset": {**self.dataset.to_dict(redact=redact), "storage_options": secret(own)},
            "models": copy.deepcopy(
                {"segmenters": self.models.segmenters, "denoisers": self.models.denoisers}
            ),
        }


def json_schema() -> dict[str, Any]:
    """The job config's JSON Schema (draft 2020-12), model specs as a union discriminated on ``kind``."""
    schema = JobConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ray-certseg job config"
    return schema


# --------------------------------------------------------------------------------------------------- loading
def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``key.sub=value`` set; values are parsed as YAML (``0.5``, ``[0.25, 0.5]``,
    ``null``, ``true``...); missing or null intermediate mappings are created."""
    out = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set {item!r}: expected KEY.SUB=VALUE, e.g. sampling.n0=10")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
        node = out
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])!r} is not a mapping")
            node = node[part]
        node[parts[-1]] = value
    return out


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> JobConfig:
    """Read a YAML config, apply ``--set`` overrides, validate. Relative paths resolve against the working
    directory first, else the config file's directory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found (relative to {os.getcwd()})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return JobConfig.from_dict(apply_overrides(data, overrides), base_dir=path.parent)
