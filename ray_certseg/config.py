"""Typed, validated job configuration: YAML file + ``--set key.sub=value`` overrides -> :class:`JobConfig`.

Shape (defaults shown; ``dataset``, ``models`` and ``methods`` have no defaults)::

    name: job
    output: outputs/<name>               # local or s3://
    storage_options: {}                  # fsspec options (object stores); redacted in to_dict(), never logged
    dataset: {kind: manifest|cityscapes|pascal_context, root: PATH, manifest: PATH, split: val, name: <kind>,
              limit: null, subset: null | {count: N} | {every: m}, certify_at_scale: 1.0,
              resize: null | [H, W],
              num_classes: (19 cityscapes, 59 pascal_context, required for manifest), ignore_index: 255,
              class_names: null | [...], label_map: null | {value: class or ignore_index},
              palette: null | [colour per class], duplicate_ids: error | rename}
    models:
      segmenters: {NAME: {kind: module|torchscript|torchvision|segformer, ...}}
      denoisers:  {NAME: {kind: identity|diffusers|adm, ...}}
    methods: {NAME: {segmenter: NAME, denoiser: NAME | null}}
    sampling: {sigmas: [0.25, 0.5], n0: 10, n: 100, batch_size: 16, seed: 0, device: auto, dtype: float32,
               channels_last: false, compile: false, store_counts: false, keep_host_memory: true}
    certify: {taus: [0.75], alphas: [0.001], corrections: [holm, bonferroni],
              procedures: [segcertify]}   # entries: NAME | {procedure: NAME, params: {...}, grid: {...}}
    ray: {address: null, actors: 1 | {min: 1, max: 4}, num_gpus_per_actor: 0, num_cpus_per_actor: 1,
          batch_size: 1, max_tasks_in_flight_per_actor: 2}

Validation follows the method: sigma > 0, 0.5 < tau < 1, 0 < alpha < 1, n0 >= 1, 1 <= n < 65536 (the vote
count k is stored as uint16). Every error names its key path, e.g. ``sampling.n0: must be an integer >= 1,
got -3`` or ``unknown key 'sampling.batchsize' (did you mean 'batch_size'?)``.

Relative paths (``dataset.root``, ``dataset.manifest``, and in model specs the keys ``path``, ``weights``,
``checkpoint``, ``unet``, ``scheduler`` and any key ending in ``_path``, ``_file`` or ``_dir``) are resolved
against the current working directory if they exist there, else against the config file's directory if they
exist there, else left as written (so a hub id or a path that only exists on the workers passes through).
``output`` is made absolute against the current working directory. URLs (``s3://...``) are never changed.
Model specs are otherwise free-form (the model loaders validate them), but their ``kind`` must be known.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ray_certseg import storage
from ray_certseg.constants import CORRECTIONS, MAX_UINT16, UINT8_LABEL_CLASSES
from ray_certseg.models import registry

DATASET_KINDS = ("manifest", "cityscapes", "pascal_context")
DEFAULT_NUM_CLASSES = {"cityscapes": 19, "pascal_context": 59}
DTYPES = ("float32", "bfloat16", "float16")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
SPLIT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MODEL_PATH_KEYS = ("path", "weights", "checkpoint", "unet", "scheduler")
MODEL_PATH_SUFFIXES = ("_path", "_file", "_dir")
RUNTIME_ENV_KEYS = ("py_modules", "working_dir", "pip", "uv", "env_vars", "excludes", "config")


class ConfigError(ValueError):
    """An invalid job configuration; the message starts with the offending key path."""


# ---------------------------------------------------------------------------------------------------- checks
def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _fail(path: str, requirement: str, value: Any) -> ConfigError:
    return ConfigError(f"{path}: must be {requirement}, got {_show(value)}")


def _mapping(value: Any, path: str, allowed: Iterable[str] | None = None) -> dict[str, Any]:
    """``value`` as a dict (``None`` -> ``{}``); keys outside ``allowed`` are errors with a suggestion."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(path, "a mapping", value)
    if allowed is not None:
        allowed = list(allowed)
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}"
                raise ConfigError(f"unknown key {_join(path, key)!r} ({hint})")
    return dict(value)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _integer(value: Any, path: str, lo: int | None = None, hi: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and (lo is None or value >= lo) and (hi is None or value <= hi):
        return int(value)
    if lo is not None and hi is not None:
        raise _fail(path, f"an integer in [{lo}, {hi}]", value)
    raise _fail(path, f"an integer >= {lo}" if lo is not None else "an integer", value)


def _number(
    value: Any, path: str, ok: Callable[[float], bool] = lambda x: True, requirement: str = "a number"
) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and ok(float(value)):
        return float(value)
    raise _fail(path, requirement, value)


def _boolean(value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    raise _fail(path, "true or false", value)


def _string(
    value: Any, path: str, pattern: re.Pattern[str] | None = None, requirement: str = "a string"
) -> str:
    if isinstance(value, str) and value and (pattern is None or pattern.fullmatch(value)):
        return value
    raise _fail(path, requirement, value)


def _choice(value: Any, path: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if isinstance(value, str) and value in choices:
        return value
    raise _fail(path, f"one of {', '.join(choices)}", value)


def _name(value: Any, path: str) -> str:
    return _string(value, path, NAME_PATTERN, "a name of letters, digits, '_' and '-'")


def _list(value: Any, path: str, item: Callable[[Any, str], Any]) -> tuple[Any, ...]:
    """A non-empty list of distinct items, each checked by ``item``; a scalar counts as a list of one."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise _fail(path, "a non-empty list", value)
    out = tuple(item(v, f"{path}[{i}]") for i, v in enumerate(items))
    for i, v in enumerate(out):
        if v in out[:i]:
            raise ConfigError(f"{path}[{i}]: duplicate value {_show(v)}")
    return out


def _resolve(value: str, base_dir: Path | None) -> str:
    """A relative local path -> absolute against the working directory if it exists there, else against
    ``base_dir`` if it exists there, else unchanged."""
    if not storage.is_local(value):
        return value
    if os.path.isabs(os.path.expanduser(value)):
        return os.path.expanduser(value)
    for root in (Path.cwd(), base_dir):
        if root is not None and (root / value).exists():
            return str((root / value).resolve())
    return value


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively (to_dict output is JSON/YAML-stable)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class Subset:
    """SegCertify's evaluation subset: ``count`` N -> stride m = floor(len / N), the first N of items
    0, m, 2m, ...; or ``every`` m -> items 0, m, 2m, ..."""

    count: int | None = None
    every: int | None = None

    @classmethod
    def from_dict(cls, data: Any, path: str) -> Subset | None:
        if data is None:
            return None
        d = _mapping(data, path, ("count", "every"))
        if len(d) != 1:
            raise _fail(path, "null, {count: N} or {every: m}", data)
        key, value = next(iter(d.items()))
        return cls(**{key: _integer(value, _join(path, key), 1)})

    def to_dict(self) -> dict[str, int]:
        return {"count": self.count} if self.count is not None else {"every": self.every}


@dataclass(frozen=True)
class DatasetConfig:
    """Where the images and labels are and how to read them (see :mod:`ray_certseg.data`).

    ``label_map`` is applied after the layout's built-in map (Cityscapes labelIds -> trainIds, Pascal-Context
    shift); values it does not list are kept. ``storage_options`` are the job's merged with the dataset's own.
    """

    kind: str
    num_classes: int
    root: str | None = None
    manifest: str | None = None
    split: str = "val"
    name: str = ""
    limit: int | None = None
    subset: Subset | None = None
    certify_at_scale: float = 1.0
    resize: tuple[int, int] | None = None
    ignore_index: int = 255
    class_names: tuple[str, ...] | None = None
    label_map: dict[int, int] | None = None
    palette: tuple[str, ...] | None = None
    duplicate_ids: str = "error"
    hierarchy: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    KEYS = (
        "kind",
        "root",
        "manifest",
        "split",
        "name",
        "limit",
        "subset",
        "certify_at_scale",
        "scale",  # renamed: refused unless 1.0 (see from_dict)
        "resize",
        "num_classes",
        "ignore_index",
        "class_names",
        "label_map",
        "palette",
        "duplicate_ids",
        "hierarchy",
        "storage_options",
    )
    # absent from older config.json files
    DEFAULTS_ADDED_LATER: ClassVar[dict[str, Any]] = {
        "palette": None,
        "duplicate_ids": "error",
        "certify_at_scale": 1.0,
        "hierarchy": None,
    }
    SCALE_RENAMED = (
        "{path}.scale was renamed, because it did not do what SegCertify's scale does. It resized the image "
        "and label before the noise, so the certificate, its radius and every metric are stated at the "
        "reduced resolution; for that, write {path}.certify_at_scale: {value}. For SegCertify's scales (noise, "
        "certificate and scoring at full resolution; the segmenter sees the noisy image resized and its "
        "logits are upsampled back), give the segmenter spec input_scale: {value} instead (docs/paper.md)"
    )

    @staticmethod
    def upgrade_recorded(data: Mapping[str, Any]) -> dict[str, Any]:
        """A dataset mapping as recorded in an older run's config.json, in today's keys: ``scale`` did then
        what ``certify_at_scale`` does now, so a record is translated (a user's config is refused instead)."""
        d = dict(data)
        if "scale" in d:
            d.setdefault("certify_at_scale", d.pop("scale"))
            d.pop("scale", None)
        return d

    @property
    def label_dtype(self) -> type:
        """uint8 when num_classes <= 254 (room for the ignore label), else uint16."""
        import numpy as np

        return np.uint8 if self.num_classes <= UINT8_LABEL_CLASSES else np.uint16

    @classmethod
    def from_dict(
        cls,
        data: Any,
        path: str = "dataset",
        *,
        base_dir: Path | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> DatasetConfig:
        """Validate a dataset mapping. ``storage_options`` (the job's) are merged under the dataset's own."""
        d = _mapping(data, path, cls.KEYS)
        p = lambda key: _join(path, key)
        kind = _choice(d.get("kind"), p("kind"), DATASET_KINDS)
        num_classes = d.get("num_classes", DEFAULT_NUM_CLASSES.get(kind))
        if num_classes is None:
            raise ConfigError(f"{p('num_classes')}: required for kind {kind!r} (an integer >= 1)")
        num_classes = _integer(num_classes, p("num_classes"), 1, MAX_UINT16)
        ignore = _ignore_index(d.get("ignore_index", 255), p("ignore_index"), num_classes)
        limit, resize, class_names = d.get("limit"), d.get("resize"), d.get("class_names")
        # scale: 1.0 alone did nothing then and does nothing now; anything else is refused with both fixes
        if "scale" in d and (d["scale"] != 1.0 or "certify_at_scale" in d):
            raise ConfigError(cls.SCALE_RENAMED.format(path=path, value=d["scale"]))
        return cls(
            kind=kind,
            num_classes=num_classes,
            **_dataset_paths(d, kind, path, base_dir),
            split=_string(
                d.get("split", "val"),
                p("split"),
                SPLIT_PATTERN,
                "a split name of letters, digits, '.', '_' and '-'",
            ),
            name=_name(d.get("name") or kind, p("name")),
            limit=None if limit is None else _integer(limit, p("limit"), 1),
            subset=Subset.from_dict(d.get("subset"), p("subset")),
            certify_at_scale=_number(
                d.get("certify_at_scale", 1.0), p("certify_at_scale"), lambda x: x > 0, "a number > 0"
            ),
            resize=None if resize is None else _pair(resize, p("resize")),
            ignore_index=ignore,
            class_names=None if class_names is None else _names(class_names, p("class_names"), num_classes),
            label_map=_label_map(d.get("label_map"), p("label_map"), num_classes, ignore),
            palette=None if d.get("palette") is None else _palette(d["palette"], p("palette"), num_classes),
            duplicate_ids=_choice(d.get("duplicate_ids", "error"), p("duplicate_ids"), ("error", "rename")),
            hierarchy=_hierarchy(d.get("hierarchy"), p("hierarchy"), num_classes, class_names, base_dir),
            storage_options={
                **dict(storage_options or {}),
                **_mapping(d.get("storage_options"), p("storage_options")),
            },
        )

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """A plain mapping that :meth:`from_dict` reads back; label_map keys become strings (JSON-stable)."""
        skip = ("subset", "label_map", "storage_options", "scale")
        d = {k: getattr(self, k) for k in self.KEYS if k not in skip}
        d["subset"] = self.subset.to_dict() if self.subset else None
        d["label_map"] = (
            {str(k): v for k, v in self.label_map.items()} if self.label_map is not None else None
        )
        d["storage_options"] = (
            storage.redact_options(self.storage_options) if redact else dict(self.storage_options)
        )
        return _plain(d)


def _hierarchy(
    value: Any, path: str, num_classes: int, class_names: Any, base_dir: Path | None
) -> str | None:
    """A shipped hierarchy's name or a file (resolved like a model path), loaded and checked against the
    dataset's classes (:mod:`ray_certseg.hierarchy`)."""
    from ray_certseg import hierarchy

    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _fail(
            path, f"a shipped hierarchy {list(hierarchy.SHIPPED)} or the path of a hierarchy file", value
        )
    source = value if value in hierarchy.SHIPPED else _resolve(value, base_dir)
    try:
        tree = hierarchy.load(source)
        hierarchy.check_classes(tree, num_classes, class_names)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return source


def _ignore_index(value: Any, path: str, num_classes: int) -> int:
    """Not a class id, and representable in the label dtype (uint8 up to 254 classes, else uint16)."""
    top = 255 if num_classes <= UINT8_LABEL_CLASSES else MAX_UINT16
    ok = isinstance(value, int) and not isinstance(value, bool) and num_classes <= value <= top
    if not ok:
        dtype = "uint8" if top == 255 else "uint16"
        raise _fail(
            path,
            f"an integer in [{num_classes}, {top}] (not a class id; labels are {dtype} for "
            f"{num_classes} classes)",
            value,
        )
    return int(value)


def _dataset_paths(
    d: Mapping[str, Any], kind: str, path: str, base_dir: Path | None
) -> dict[str, str | None]:
    """``manifest`` for kind manifest, ``root`` for the folder layouts; the other one must be absent."""
    used, unused = ("manifest", "root") if kind == "manifest" else ("root", "manifest")
    requirement = (
        "a path to a CSV or Parquet file with columns image_path,label_path[,image_id]"
        if kind == "manifest"
        else "a path to the dataset folder"
    )
    if d.get(unused) is not None:
        reason = " (paths in the manifest are relative to its folder)" if kind == "manifest" else ""
        raise ConfigError(f"{_join(path, unused)}: not used by kind {kind!r}{reason}; remove it")
    return {
        used: _resolve(_string(d.get(used), _join(path, used), requirement=requirement), base_dir),
        unused: None,
    }


def _pair(value: Any, path: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _fail(path, "null or [height, width]", value)
    return _integer(value[0], f"{path}[0]", 1), _integer(value[1], f"{path}[1]", 1)


def _names(value: Any, path: str, num_classes: int) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != num_classes:
        raise _fail(path, f"null or a list of {num_classes} names", value)
    return tuple(_string(v, f"{path}[{i}]") for i, v in enumerate(value))


def _palette(value: Any, path: str, num_classes: int) -> tuple[str, ...]:
    """One matplotlib colour per class: a name ('red', 'tab:blue'), '#rrggbb', or [r, g, b] in [0, 255]."""
    if not isinstance(value, (list, tuple)) or len(value) != num_classes:
        raise _fail(path, f"null or a list of {num_classes} colours (names, '#rrggbb' or [r, g, b])", value)
    out = []
    for i, colour in enumerate(value):
        if isinstance(colour, (list, tuple)):
            rgb = [_integer(c, f"{path}[{i}][{j}]", 0, 255) for j, c in enumerate(colour)]
            if len(rgb) != 3:
                raise _fail(f"{path}[{i}]", "[r, g, b] with 3 values in [0, 255]", colour)
            colour = "#{:02x}{:02x}{:02x}".format(*rgb)
        colour = _string(colour, f"{path}[{i}]", requirement="a colour name, '#rrggbb' or [r, g, b]")
        from matplotlib.colors import is_color_like

        if not is_color_like(colour):
            raise _fail(f"{path}[{i}]", "a matplotlib colour (e.g. 'red', 'tab:blue', '#ff8800')", colour)
        out.append(colour)
    return tuple(out)


def _label_map(value: Any, path: str, num_classes: int, ignore: int) -> dict[int, int] | None:
    """{stored value: class id or the ignore index}; keys may be digit strings (``--set``, JSON)."""
    if value is None:
        return None
    out = {}
    for key, target in _mapping(value, path).items():
        raw = int(key) if isinstance(key, str) and key.isdigit() else key
        item = f"{path}.{key}"
        _integer(raw, f"{item} (the key)", 0, MAX_UINT16)
        if not (
            isinstance(target, int)
            and not isinstance(target, bool)
            and (0 <= target < num_classes or target == ignore)
        ):
            raise _fail(item, f"a class id in [0, {num_classes}) or the ignore index {ignore}", target)
        out[raw] = int(target)
    return out


# ------------------------------------------------------------------------------------------- models, methods
@dataclass(frozen=True)
class ModelsConfig:
    """Named model specs as given (relative paths resolved), each checked against its kind's spec model."""

    segmenters: dict[str, dict[str, Any]] = field(default_factory=dict)
    denoisers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, path: str = "models", *, base_dir: Path | None = None) -> ModelsConfig:
        d = _mapping(data, path, ("segmenters", "denoisers"))
        groups = {}
        for group in registry.GROUPS:
            kinds = list(registry.KINDS[group])
            gpath = _join(path, group)
            specs = {}
            for name, spec in _mapping(d.get(group), gpath).items():
                spath = _join(gpath, name)
                _name(name, f"{spath} (the name)")
                spec = _mapping(spec, spath)
                if "kind" not in spec:
                    raise ConfigError(f"{_join(spath, 'kind')}: required (one of {', '.join(kinds)})")
                _choice(spec["kind"], _join(spath, "kind"), kinds)
                try:
                    registry.check_spec(group, spath, spec)
                except ValueError as err:
                    raise ConfigError(str(err)) from None
                specs[name] = {
                    k: _resolve(v, base_dir) if is_path_key(k) and isinstance(v, str) else v
                    for k, v in spec.items()
                }
            groups[group] = specs
        return cls(**groups)


def is_path_key(key: str) -> bool:
    """A model-spec key that holds a file or folder (resolved against the config's folder when relative)."""
    return key in MODEL_PATH_KEYS or str(key).endswith(MODEL_PATH_SUFFIXES)


@dataclass(frozen=True)
class MethodConfig:
    """One certified pipeline: a segmenter, optionally behind a denoiser."""

    segmenter: str
    denoiser: str | None = None


def _methods_from_dict(data: Any, models: ModelsConfig, path: str = "methods") -> dict[str, MethodConfig]:
    methods = {}
    for name, spec in _mapping(data, path).items():
        mpath = _join(path, name)
        _name(name, f"{mpath} (the name)")
        spec = _mapping(spec, mpath, ("segmenter", "denoiser"))
        refs = {}
        for key, group in (("segmenter", models.segmenters), ("denoiser", models.denoisers)):
            ref = spec.get(key)
            if ref is None and key == "denoiser":
                refs[key] = None
                continue
            if ref not in group:
                close = difflib.get_close_matches(str(ref), list(group), n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else f"defined: {', '.join(group) or 'none'}"
                raise ConfigError(f"{_join(mpath, key)}: unknown {key} {_show(ref)} (models.{key}s: {hint})")
            refs[key] = ref
        methods[name] = MethodConfig(**refs)
    if not methods:
        raise ConfigError(
            f"{path}: at least one method {{NAME: {{segmenter: NAME, denoiser: NAME | null}}}} is required"
        )
    return methods


# ------------------------------------------------------------------------------------ sampling, certify, ray
@dataclass(frozen=True)
class SamplingConfig:
    """Monte Carlo sampling: n0 selection and n estimation samples per (image, method, sigma)."""

    sigmas: tuple[float, ...] = (0.25, 0.5)
    n0: int = 10
    n: int = 100
    batch_size: int = 16
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    channels_last: bool = False
    compile: bool = False
    store_counts: bool = False
    keep_host_memory: bool = True

    @classmethod
    def from_dict(cls, data: Any, path: str = "sampling") -> SamplingConfig:
        d = _mapping(data, path, cls.__dataclass_fields__)
        p = lambda key: _join(path, key)
        return cls(
            sigmas=_list(
                d.get("sigmas", cls.sigmas),
                p("sigmas"),
                lambda v, q: _number(v, q, lambda x: x > 0, "a number > 0"),
            ),
            n0=_integer(d.get("n0", cls.n0), p("n0"), 1),
            n=_integer(d.get("n", cls.n), p("n"), 1, MAX_UINT16),
            batch_size=_integer(d.get("batch_size", cls.batch_size), p("batch_size"), 1),
            seed=_integer(d.get("seed", cls.seed), p("seed"), 0, 2**63 - 1),
            device=_string(
                d.get("device", cls.device), p("device"), DEVICE_PATTERN, "auto, cpu, cuda or cuda:N"
            ),
            dtype=_choice(d.get("dtype", cls.dtype), p("dtype"), DTYPES),
            channels_last=_boolean(d.get("channels_last", cls.channels_last), p("channels_last")),
            compile=_boolean(d.get("compile", cls.compile), p("compile")),
            store_counts=_boolean(d.get("store_counts", cls.store_counts), p("store_counts")),
            keep_host_memory=_boolean(d.get("keep_host_memory", cls.keep_host_memory), p("keep_host_memory")),
        )


@dataclass(frozen=True)
class CertifyConfig:
    """What every vote row is certified at: each procedure of ``procedures`` (SegCertify by default) at each
    of its points, the parameters it leaves open (tau, alpha, correction) taken from the shared grid
    taus x alphas x corrections (:func:`ray_certseg.certify.points`)."""

    taus: tuple[float, ...] = (0.75,)
    alphas: tuple[float, ...] = (0.001,)
    corrections: tuple[str, ...] = CORRECTIONS
    procedures: tuple[Any, ...] = ("segcertify",)

    @classmethod
    def from_dict(cls, data: Any, path: str = "certify") -> CertifyConfig:
        d = _mapping(data, path, cls.__dataclass_fields__)
        return cls(
            taus=_list(
                d.get("taus", cls.taus),
                _join(path, "taus"),
                lambda v, q: _number(v, q, lambda x: 0.5 < x < 1, "a number with 0.5 < tau < 1"),
            ),
            alphas=_list(
                d.get("alphas", cls.alphas),
                _join(path, "alphas"),
                lambda v, q: _number(v, q, lambda x: 0 < x < 1, "a number with 0 < alpha < 1"),
            ),
            corrections=_list(
                d.get("corrections", cls.corrections),
                _join(path, "corrections"),
                lambda v, q: _choice(v, q, CORRECTIONS),
            ),
            procedures=cls._procedures(d.get("procedures", cls.procedures), _join(path, "procedures")),
        )

    def __post_init__(self) -> None:
        from ray_certseg import certify

        try:  # every entry names a procedure and gives it valid parameters, before anything starts
            certify.points(self.procedures, self.__dict__, "certify.procedures")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @staticmethod
    def _procedures(value: Any, path: str) -> tuple[Any, ...]:
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise _fail(path, "a non-empty list of procedures (e.g. [segcertify])", value)
        return tuple(items)


@dataclass(frozen=True)
class RayConfig:
    """Cluster resources: a fixed actor pool (``actors: N``) or an autoscaling one (``{min: a, max: b}``)."""

    address: str | None = None
    actors: int | dict[str, int] = 1
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    batch_size: int = 1
    max_tasks_in_flight_per_actor: int = 2
    runtime_env: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: Any, path: str = "ray", *, base_dir: Path | None = None) -> RayConfig:
        d = _mapping(data, path, cls.__dataclass_fields__)
        p = lambda key: _join(path, key)
        actors = d.get("actors", cls.actors)
        if isinstance(actors, Mapping):
            a = _mapping(actors, p("actors"), ("min", "max"))
            lo = _integer(a.get("min", 1), _join(p("actors"), "min"), 1)
            hi = _integer(a.get("max"), _join(p("actors"), "max"), lo)
            actors = {"min": lo, "max": hi}
        elif isinstance(actors, int) and not isinstance(actors, bool) and actors >= 1:
            actors = int(actors)
        else:
            raise _fail(p("actors"), "an integer >= 1 or {min: a, max: b}", actors)
        address = d.get("address")
        return cls(
            address=None if address is None else _string(address, p("address")),
            actors=actors,
            num_gpus_per_actor=_number(
                d.get("num_gpus_per_actor", cls.num_gpus_per_actor),
                p("num_gpus_per_actor"),
                lambda x: x >= 0,
                "a number >= 0",
            ),
            num_cpus_per_actor=_number(
                d.get("num_cpus_per_actor", cls.num_cpus_per_actor),
                p("num_cpus_per_actor"),
                lambda x: x >= 0,
                "a number >= 0",
            ),
            batch_size=_integer(d.get("batch_size", cls.batch_size), p("batch_size"), 1),
            max_tasks_in_flight_per_actor=_integer(
                d.get("max_tasks_in_flight_per_actor", cls.max_tasks_in_flight_per_actor),
                p("max_tasks_in_flight_per_actor"),
                1,
            ),
            runtime_env=_runtime_env(d.get("runtime_env"), p("runtime_env"), base_dir),
        )


def _runtime_env(value: Any, path: str, base_dir: Path | None) -> dict[str, Any] | None:
    """Ray's runtime_env for the sampling actors, so user code and packages reach the workers the same way
    locally and on a cluster. Local ``py_modules`` entries and ``working_dir`` resolve like model paths and
    must exist (Ray uploads them); URLs and pip names pass through."""
    if value is None:
        return None
    env = _mapping(value, path, RUNTIME_ENV_KEYS)
    if "py_modules" in env:
        modules = env["py_modules"]
        if not isinstance(modules, (list, tuple)) or not modules:
            raise _fail(_join(path, "py_modules"), "a non-empty list of package folders or URLs", modules)
        env["py_modules"] = [
            _existing(
                m,
                f"{path}.py_modules[{i}]",
                base_dir,
                "a package folder (the one holding __init__.py), a .py file, a .whl or a URL",
            )
            for i, m in enumerate(modules)
        ]
    if "working_dir" in env:
        env["working_dir"] = _existing(
            env["working_dir"], _join(path, "working_dir"), base_dir, "a folder or a URL"
        )
    if "pip" in env and not isinstance(env["pip"], (list, tuple, dict, str)):
        raise _fail(_join(path, "pip"), "a list of requirements", env["pip"])
    if "env_vars" in env:
        env["env_vars"] = {
            str(k): str(v) for k, v in _mapping(env["env_vars"], _join(path, "env_vars")).items()
        }
    return env


def _existing(value: Any, path: str, base_dir: Path | None, requirement: str) -> str:
    """A local path resolved like model paths (the driver checks that it exists before Ray starts), or a
    URL as written."""
    value = _string(value, path, requirement=requirement)
    return value if "://" in value else _resolve(value, base_dir)


# ------------------------------------------------------------------------------------------------------- job
@dataclass(frozen=True)
class JobConfig:
    """The whole job: where to read, which models/methods, sampling and certification grids, resources."""

    name: str
    output: str
    dataset: DatasetConfig
    models: ModelsConfig
    methods: dict[str, MethodConfig]
    sampling: SamplingConfig = SamplingConfig()
    certify: CertifyConfig = CertifyConfig()
    ray: RayConfig = RayConfig()
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    KEYS = ("name", "output", "storage_options", "dataset", "models", "methods", "sampling", "certify", "ray")

    @classmethod
    def from_dict(cls, data: Any, *, base_dir: str | Path | None = None) -> JobConfig:
        """Validate a config mapping; relative paths are resolved as the module docstring says, with
        ``base_dir`` standing for the config file's directory."""
        d = _mapping(data, "", cls.KEYS)
        base = Path(base_dir).resolve() if base_dir is not None else None
        name = _name(d.get("name", "job"), "name")
        output = _string(d.get("output", f"outputs/{name}"), "output", requirement="a path or URL")
        if storage.is_local(output):
            output = storage.strip_protocol(output)
        storage_options = _mapping(d.get("storage_options"), "storage_options")
        if "dataset" not in d:
            raise ConfigError("dataset: required (a mapping with kind, root or manifest, num_classes, ...)")
        models = ModelsConfig.from_dict(d.get("models"), base_dir=base)
        return cls(
            name=name,
            output=output,
            storage_options=storage_options,
            dataset=DatasetConfig.from_dict(d["dataset"], base_dir=base, storage_options=storage_options),
            models=models,
            methods=_methods_from_dict(d.get("methods"), models),
            sampling=SamplingConfig.from_dict(d.get("sampling")),
            certify=CertifyConfig.from_dict(d.get("certify")),
            ray=RayConfig.from_dict(d.get("ray"), base_dir=base),
        )

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """A plain mapping (lists, str keys) for recording in outputs; :meth:`from_dict` reads it back.
        With ``redact`` every secret in ``storage_options`` is replaced by ``***``."""
        dataset = self.dataset.to_dict(redact=redact)
        own = {k: v for k, v in self.dataset.storage_options.items() if self.storage_options.get(k) != v}
        dataset["storage_options"] = storage.redact_options(own) if redact else own
        scalars = lambda obj: {k: getattr(obj, k) for k in obj.__dataclass_fields__}
        return _plain(
            {
                "name": self.name,
                "output": self.output,
                "storage_options": storage.redact_options(self.storage_options)
                if redact
                else dict(self.storage_options),
                "dataset": dataset,
                "models": {"segmenters": self.models.segmenters, "denoisers": self.models.denoisers},
                "methods": {k: scalars(m) for k, m in self.methods.items()},
                "sampling": scalars(self.sampling),
                "certify": scalars(self.certify),
                "ray": scalars(self.ray),
            }
        )


# --------------------------------------------------------------------------------------------------- loading
def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``key.sub=value`` set; values are parsed as YAML (``0.5``,
    ``[0.25, 0.5]``,
    ``null``, ``true``...); missing or null intermediate mappings are created."""
    import copy

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
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return JobConfig.from_dict(apply_overrides(data, overrides), base_dir=path.parent)
