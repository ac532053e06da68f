"""Config building blocks on pydantic v2: a strict section model, value types whose rule is stated once (as
constraints, and in words), path resolution, and a ValidationError turned into one line that names the key
path, says what was expected and what was given.

Models state their rules once, as constraints; the field's (or list item's) ``description`` says the rule in
words and is what an error quotes: ``sampling.n0: must be an integer >= 1, got -3``. An unknown key gets the
closest allowed one: ``unknown key 'sampling.batchsize' (did you mean 'batch_size'?)``. A validator that
needs more than one field raises :class:`Invalid`, naming the key below the model it checks. A field with
no description is quoted in pydantic's words (``...: input should be a valid integer, got '2'``).
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
)

from ray_certseg import storage
from ray_certseg.dtypes import MAX_UINT16

NAME_RULE = "a name of letters, digits, '_' and '-'"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class ConfigError(ValueError):
    """An invalid job configuration; the message starts with the offending key path."""


class Invalid(ValueError):
    """Raised in a validator: ``key`` (below the validated model, ``""`` for itself) and the reason. With
    ``requirement`` the line reads ``KEY: must be REQUIREMENT, got VALUE``; with ``whole`` the text is the
    complete line (it names its own key)."""

    def __init__(
        self,
        key: str,
        text: str = "",
        *,
        requirement: str | None = None,
        value: Any = None,
        whole: bool = False,
    ) -> None:
        if requirement is not None:
            text = f"must be {requirement}, got {show(value)}"
        super().__init__(text)
        self.key, self.text, self.whole = key, text, whole


def show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def join(path: str, key: Any) -> str:
    """``sampling`` + ``n0`` -> ``sampling.n0``; an index -> ``sampling.sigmas[1]``."""
    if isinstance(key, int) or str(key).startswith("["):
        return f"{path}{key if str(key).startswith('[') else f'[{key}]'}"
    return f"{path}.{key}" if path and key != "" else path or str(key)


def hint(given: str, known: Iterable[str], listed: str = "allowed") -> str:
    """``did you mean 'c'?`` for the closest of ``known``, else ``allowed: a, b`` (or ``defined: none``)."""
    known = list(known)
    close = difflib.get_close_matches(given, known, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"{listed}: {', '.join(known) or 'none'}"


def unknown_key(path: str, allowed: Iterable[str]) -> str:
    """``unknown key 'a.b' (did you mean 'c'?)``, or the allowed keys when none is close."""
    return f"unknown key {path!r} ({hint(path.rsplit('.', 1)[-1], allowed)})"


def first_error(err: ValidationError, root: Any, prefix: str = "") -> str:
    """The first error of ``err`` (raised validating ``root``, a model class) as one line under ``prefix``."""
    first = err.errors()[0]
    loc: Sequence[Any] = first["loc"]
    path = prefix
    for part in loc:
        path = join(path, part)
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, Invalid):
        return cause.text if cause.whole else f"{join(path, cause.key)}: {cause.text}"
    if first["type"] == "extra_forbidden":
        return unknown_key(path, _fields(_walk(root, loc[:-1])[0]))
    requirement = _walk(root, loc)[1]
    if first["type"] == "missing":
        return f"{path}: required" + (f" ({requirement})" if requirement else "")
    if requirement:
        return f"{path}: must be {requirement}, got {show(first['input'])}"
    message = first["msg"].removeprefix("Value error, ")
    return f"{path}: {message[0].lower()}{message[1:]}, got {first['input']!r}"


def _walk(annotation: Any, loc: Sequence[Any]) -> tuple[Any, str | None]:
    """The type at ``loc`` below ``annotation`` and the description that states its rule (if any)."""
    description = None
    for part in loc:
        annotation, _ = _strip(annotation)
        origin = typing.get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return None, None
            annotation, inner = _strip(field.annotation)
            description = field.description or inner
            continue
        if origin in (list, tuple, set, Sequence):
            annotation = typing.get_args(annotation)[0]
        elif origin is dict:
            annotation = typing.get_args(annotation)[1]
        else:
            return None, description
        annotation, description = _strip(annotation)
    return _strip(annotation)[0], description


def _strip(annotation: Any) -> tuple[Any, str | None]:
    """``Annotated[T, Field(description=d)] | None`` -> (T, d)."""
    description = None
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *metadata = typing.get_args(annotation)
        for item in metadata:
            description = getattr(item, "description", None) or description
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _strip(members[0])[0], description or _strip(members[0])[1]
    return annotation, description


def _fields(model: Any) -> list[str]:
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


# ------------------------------------------------------------------------------------------------- sections
def rule(base: type, description: str, **constraints: Any) -> Any:
    """``base`` in strict mode (YAML's '2' is no number, true is no integer) under ``constraints``, with the
    rule in words for errors and the JSON Schema."""
    return Annotated[base, Strict(), Field(description=description, **constraints)]


def _distinct(values: tuple[Any, ...]) -> tuple[Any, ...]:
    for i, value in enumerate(values):
        if value in values[:i]:
            raise Invalid(f"[{i}]", f"duplicate value {show(value)}")
    return values


def as_list(value: Any) -> Any:
    """A scalar counts as a list of one."""
    return value if isinstance(value, (list, tuple)) else [value]


def list_of(item: Any, description: str = "a non-empty list", distinct: bool = True) -> Any:
    """A non-empty list (of distinct items unless told otherwise); a scalar counts as a list of one. (The
    constraint comes before the validators, or pydantic's JSON Schema says minLength for an array.)"""
    checks = (BeforeValidator(as_list), *([AfterValidator(_distinct)] if distinct else []))
    return Annotated[(tuple[item, ...], Field(min_length=1, description=description), *checks)]


Name = rule(str, NAME_RULE, pattern=NAME_PATTERN.pattern)
PosInt = rule(int, "an integer >= 1", ge=1)
Count = rule(int, f"an integer in [1, {MAX_UINT16}]", ge=1, le=MAX_UINT16)
PosFloat = rule(float, "a number > 0", gt=0)
NonNegFloat = rule(float, "a number >= 0", ge=0)
Flag = rule(bool, "true or false")
Options = Annotated[dict[str, Any], Field(description="a mapping", repr=False)]


def resolve_path(value: Any, base_dir: Path | None) -> Any:
    """A relative local path -> absolute against the working directory if it exists there, else against
    ``base_dir`` if it exists there, else unchanged (also a URL, or a value that is no string)."""
    if not isinstance(value, str) or not storage.is_local(value):
        return value
    if os.path.isabs(os.path.expanduser(value)):
        return os.path.expanduser(value)
    for root in (Path.cwd(), base_dir):
        if root is not None and (root / value).exists():
            return str((root / value).resolve())
    return value


def check_name(name: Any) -> None:
    """A name given as a mapping key (a model's, a method's)."""
    if not (isinstance(name, str) and NAME_PATTERN.fullmatch(name)):
        raise Invalid(f"{name} (the name)", requirement=NAME_RULE, value=name)


def base_dir_of(info: ValidationInfo) -> Path | None:
    return (info.context or {}).get("base_dir")


class Section(BaseModel):
    """A config section: unknown keys are errors (with the closest known one), values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: the section's key in the job config, which its errors start with
    path: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, data: Any, path: str | None = None, *, base_dir: str | Path | None = None) -> Any:
        """Validate a mapping; errors are :class:`ConfigError` lines under ``path``; relative paths resolve
        against the working directory, then ``base_dir`` (the config file's folder)."""
        base = Path(base_dir).resolve() if base_dir is not None else None
        try:
            return cls.model_validate({} if data is None else data, context={"base_dir": base})
        except ValidationError as err:
            raise ConfigError(first_error(err, cls, cls.path if path is None else path)) from None
