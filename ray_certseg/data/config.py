"""The ``dataset`` section of a job config: which layout, where its files are, how labels are read.

Relative paths (``root``, ``manifest``, ``hierarchy``) resolve against the working directory, then the config
file's folder (:func:`ray_certseg.validation.resolve_path`); URLs are never changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_serializer, model_validator

from ray_certseg import storage
from ray_certseg.dtypes import MAX_UINT16, UINT8_LABEL_CLASSES
from ray_certseg.validation import (
    Count,
    Invalid,
    Name,
    Options,
    PosFloat,
    PosInt,
    Section,
    base_dir_of,
    resolve_path,
    rule,
)

#: the layouts that know their class count; ``manifest`` needs ``num_classes``
DEFAULT_NUM_CLASSES = {"cityscapes": 19, "pascal_context": 59}


class Subset(Section):
    """SegCertify's evaluation subset: ``count`` N -> stride m = floor(len / N), the first N of items
    0, m, 2m, ...; or ``every`` m -> items 0, m, 2m, ..."""

    count: PosInt | None = None
    every: PosInt | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_key(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or len(data) != 1:
            raise Invalid("", requirement="null, {count: N} or {every: m}", value=data)
        return data

    @model_serializer
    def _given(self) -> dict[str, int]:
        return {"count": self.count} if self.count is not None else {"every": self.every}


class DatasetConfig(Section):
    """Where the images and labels are and how to read them (see :mod:`ray_certseg.data`).

    ``label_map`` is applied after the layout's built-in map (Cityscapes labelIds -> trainIds, Pascal-Context
    shift); values it does not list are kept. ``storage_options`` are the job's merged with the dataset's own.
    """

    path: ClassVar[str] = "dataset"
    kind: Annotated[
        Literal["manifest", "cityscapes", "pascal_context"],
        Field(description="one of manifest, cityscapes, pascal_context"),
    ]
    root: str | None = None
    manifest: str | None = None
    split: rule(
        str, "a split name of letters, digits, '.', '_' and '-'", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
    ) = "val"
    name: Name = ""
    limit: PosInt | None = None
    subset: Subset | None = None
    certify_at_scale: PosFloat = 1.0
    resize: Annotated[tuple[PosInt, PosInt], Field(description="null or [height, width]")] | None = None
    num_classes: Count | None = None
    ignore_index: rule(int, "an integer in [num_classes, 255], not a class id") = 255
    class_names: tuple[rule(str, "a string", min_length=1), ...] | None = None
    label_map: dict[int, rule(int, "a class id or the ignore index")] | None = None
    palette: tuple[str, ...] | None = None
    duplicate_ids: Annotated[Literal["error", "rename"], Field(description="one of error, rename")] = "error"
    hierarchy: str | None = None
    storage_options: Options = Field(default_factory=dict)

    #: absent from older config.json files
    DEFAULTS_ADDED_LATER: ClassVar[dict[str, Any]] = {
        "palette": None,
        "duplicate_ids": "error",
        "certify_at_scale": 1.0,
        "hierarchy": None,
    }
    SCALE_RENAMED: ClassVar[str] = (
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

    @model_validator(mode="before")
    @classmethod
    def _layout(cls, data: Any) -> Any:
        """The kind's defaults, ``manifest`` for kind manifest and ``root`` for the folder layouts (the other
        absent), and the renamed ``scale`` refused unless it is the no-op 1.0."""
        if not isinstance(data, Mapping):
            return data
        d, kind = dict(data), data.get("kind")
        if "scale" in d and (d["scale"] != 1.0 or "certify_at_scale" in d):
            raise Invalid("", cls.SCALE_RENAMED.format(path="dataset", value=d["scale"]), whole=True)
        d.pop("scale", None)
        if kind in ("manifest", *DEFAULT_NUM_CLASSES):
            d.setdefault("num_classes", DEFAULT_NUM_CLASSES.get(kind))
            d["name"] = d.get("name") or kind
            unused = "root" if kind == "manifest" else "manifest"
            if d.get(unused) is not None:
                reason = " (paths in the manifest are relative to its folder)" if kind == "manifest" else ""
                raise Invalid(unused, f"not used by kind {kind!r}{reason}; remove it")
        return d

    @field_validator("root", "manifest", "hierarchy")
    @classmethod
    def _paths(cls, value: str | None, info: ValidationInfo) -> str | None:
        from ray_certseg.certify import class_tree

        if value is None or (info.field_name == "hierarchy" and value in class_tree.SHIPPED):
            return value
        return resolve_path(value, base_dir_of(info))

    @field_validator("resize", mode="before")
    @classmethod
    def _pair(cls, value: Any) -> Any:
        if value is not None and not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise Invalid("", requirement="null or [height, width]", value=value)
        return value

    @field_validator("palette", mode="before")
    @classmethod
    def _colours(cls, value: Any) -> Any:
        """One matplotlib colour per class: a name ('red', 'tab:blue'), '#rrggbb', or [r, g, b] in [0, 255]."""
        from matplotlib.colors import is_color_like

        if not isinstance(value, (list, tuple)):
            return value
        out = []
        for i, colour in enumerate(value):
            if isinstance(colour, (list, tuple)):
                if len(colour) != 3 or not all(type(c) is int and 0 <= c <= 255 for c in colour):
                    raise Invalid(f"[{i}]", requirement="[r, g, b] with 3 values in [0, 255]", value=colour)
                colour = "#{:02x}{:02x}{:02x}".format(*colour)
            if not (isinstance(colour, str) and is_color_like(colour)):
                rule = "a matplotlib colour (e.g. 'red', 'tab:blue', '#ff8800')"
                raise Invalid(f"[{i}]", requirement=rule, value=colour)
            out.append(colour)
        return out

    @model_validator(mode="after")
    def _against_classes(self) -> DatasetConfig:
        """What depends on C: the ignore index, names, colours, label map and hierarchy; the layout's path."""
        c, kind = self.num_classes, self.kind
        if c is None:
            raise Invalid("num_classes", f"required for kind {kind!r} (an integer >= 1)")
        used = "manifest" if kind == "manifest" else "root"
        if getattr(self, used) is None:
            rule = (
                "a path to a CSV or Parquet file with columns image_path,label_path[,image_id]"
                if kind == "manifest"
                else "a path to the dataset folder"
            )
            raise Invalid(used, requirement=rule, value=None)
        top = 255 if c <= UINT8_LABEL_CLASSES else MAX_UINT16
        if not c <= self.ignore_index <= top:
            dtype = "uint8" if top == 255 else "uint16"
            rule = f"an integer in [{c}, {top}] (not a class id; labels are {dtype} for {c} classes)"
            raise Invalid("ignore_index", requirement=rule, value=self.ignore_index)
        if self.class_names is not None and len(self.class_names) != c:
            raise Invalid(
                "class_names", requirement=f"null or a list of {c} names", value=list(self.class_names)
            )
        if self.palette is not None and len(self.palette) != c:
            rule = f"null or a list of {c} colours (names, '#rrggbb' or [r, g, b])"
            raise Invalid("palette", requirement=rule, value=list(self.palette))
        for key, target in (self.label_map or {}).items():
            if not (0 <= key <= MAX_UINT16):
                raise Invalid(
                    f"label_map.{key} (the key)", requirement=f"an integer in [0, {MAX_UINT16}]", value=key
                )
            if not (0 <= target < c or target == self.ignore_index):
                rule = f"a class id in [0, {c}) or the ignore index {self.ignore_index}"
                raise Invalid(f"label_map.{key}", requirement=rule, value=target)
        if self.hierarchy is not None:
            from ray_certseg.certify import class_tree

            try:
                class_tree.check_classes(class_tree.load(self.hierarchy), c, self.class_names)
            except (ValueError, FileNotFoundError) as exc:
                raise Invalid("hierarchy", str(exc)) from None
        return self

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """A plain mapping that :meth:`from_dict` reads back; label_map keys become strings (JSON-stable)."""
        d = self.model_dump(mode="json", exclude={"storage_options"})
        options = dict(self.storage_options)
        return {**d, "storage_options": storage.redact_options(options) if redact else options}
