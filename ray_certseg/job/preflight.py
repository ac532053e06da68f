"""Preflight: the job-level checks that stop a job once, with one clear error (exit code 2), instead of
failing every image the same way; and the Ray error of a stopped sampling stage turned back into its cause.

A model that cannot load, a segmenter made for another number of classes or an object store that cannot be
reached is not a property of one image: recorded per image it would turn into N identical errors, and an
actor that keeps failing must not be restarted forever. So:

* the driver, before anything is started, checks what the config alone tells (:func:`check_class_counts`);
* the sampling actor, at construction, loads every model under its config key (:func:`load_model`) and runs
  one probe forward per segmenter (:func:`check_segmenter`); Ray Data fails the job on the first actor
  whose constructor raises (``DataContext.max_consecutive_actor_init_deaths = 0``, the default);
* the driver turns the Ray error, which carries the original exception only as traceback text, back into
  that exception's message (:func:`job_error`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from ray_certseg.config import ConfigError, JobConfig
from ray_certseg.models import registry
from ray_certseg.models.specs import is_path_key

log = logging.getLogger("ray_certseg")
T = TypeVar("T")
PROBE_SIZE = (64, 64)
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception)): ", re.MULTILINE)
_RAY_WRAPPERS = ("ray.exceptions.", "ray.data.exceptions.")


class ModelError(ValueError):
    """A model of the config cannot be used; the message starts with its config key (``models.<group>.<name>``)."""


class JobError(RuntimeError):
    """The sampling stage stopped on a job-level fault; the message is the original error and the way on."""


def check_class_counts(cfg: JobConfig) -> None:
    """Every segmenter a method uses and that declares ``num_classes`` must predict the dataset's C classes
    (the votes, labels and metrics are over C classes)."""
    used = sorted({m.segmenter for m in cfg.methods.values()})
    for name in used:
        declared = cfg.models.segmenters[name].get("num_classes")
        if declared is not None and declared != cfg.dataset.num_classes:
            raise ConfigError(
                f"models.segmenters.{name}.num_classes: the segmenter predicts {declared} classes but dataset "
                f"{cfg.dataset.name!r} has {cfg.dataset.num_classes} (dataset.num_classes): use a segmenter "
                "trained for the dataset's classes, or correct the wrong num_classes"
            )


def check_hierarchies(cfg: JobConfig) -> None:
    """A procedure that certifies at hierarchy levels needs votes counted for its hierarchy: the one named by
    ``dataset.hierarchy``, from which the sampler counts each level's c_hat and k."""
    from ray_certseg import certify
    from ray_certseg.certify import class_tree

    shared = {"taus": cfg.certify.taus, "alphas": cfg.certify.alphas, "corrections": cfg.certify.corrections}
    for point in certify.points(cfg.certify.procedures, shared):
        wanted = getattr(point.params, "hierarchy", None)
        if wanted is None:
            continue
        sampled = cfg.dataset.hierarchy
        if sampled is None or class_tree.load(sampled).digest != class_tree.load(wanted).digest:
            raise ConfigError(
                f"certify.procedures: {point.procedure.name} at hierarchy {wanted!r} needs votes counted for it: "
                f"set dataset.hierarchy: {wanted} (now {sampled!r}), so the sampler stores every level's votes"
            )


def check_model_files(cfg: JobConfig) -> None:
    """Every local file or folder a used model spec names (``weights``, ``path``, ``checkpoint``, ``unet``,
    ``scheduler``, ``*_file``, ...) exists on the driver, so a wrong path fails in seconds and names its key.
    Remote URLs are the loader's; so is a diffusers hub id (``org/model``, not a local path), which loads only
    where a hub is reachable."""
    for group, names in _used_models(cfg).items():
        for name in sorted(names):
            spec = getattr(cfg.models, group)[name]
            for key, value in spec.items():
                if (
                    not (is_path_key(key) and isinstance(value, str))
                    or "://" in value
                    or os.path.exists(value)
                ):
                    continue
                hub_id = (
                    spec["kind"] == "diffusers"
                    and value.count("/") == 1
                    and not value.startswith((".", "/", "~"))
                )
                if not hub_id:
                    help_ = registry.kind_of(group, spec).spec.files_help
                    raise ConfigError(
                        f"models.{group}.{name}.{key}: {value!r} does not exist (relative paths are taken from the "
                        "working directory, else the config file's folder)" + (f"; {help_}" if help_ else "")
                    )


def check_model_builds(cfg: JobConfig) -> None:
    """Every used model whose kind has a driver-side check (``registry.Kind.check``: a module segmenter is built
    on the meta device and its weights' names and shapes compared, no tensor loaded) passes it, so a model that
    cannot be built fails in seconds as :class:`ModelError` naming ``models.<group>.<name>``, before Ray."""
    for group, names in _used_models(cfg).items():
        for name in sorted(names):
            spec = getattr(cfg.models, group)[name]
            load_model(
                group, name, lambda spec=spec, group=group: registry.kind_of(group, spec).preflight(spec)
            )


def check_noise_levels(cfg: JobConfig) -> None:
    """Every sigma of ``sampling.sigmas`` lies in the range each used continuous-sigma denoiser was trained for
    (``models.loading.noise_range``: sigma_min / 2 to sigma_max / 2 of its scheduler), so an untrained noise
    level fails on the driver, naming the range, instead of every row failing on the actors."""
    from ray_certseg.models.loading import noise_range

    for name in sorted(_used_models(cfg)["denoisers"]):
        spec = cfg.models.denoisers[name]
        if spec["kind"] != "diffusers":
            continue
        span = noise_range(spec)
        outside = [s for s in cfg.sampling.sigmas if span is not None and not span[0] <= s <= span[1]]
        if outside:
            raise ConfigError(
                f"sampling.sigmas: {outside} outside [{span[0]:g}, {span[1]:g}], the noise levels that "
                f"models.denoisers.{name} was trained for (its scheduler's sigma_min / 2 to sigma_max / 2); "
                "drop those sigmas or use another denoiser for them"
            )


def _used_models(cfg: JobConfig) -> dict[str, set[str]]:
    return {
        "segmenters": {m.segmenter for m in cfg.methods.values()},
        "denoisers": {m.denoiser for m in cfg.methods.values() if m.denoiser},
    }


def check_runtime_env(cfg: JobConfig) -> None:
    """Every local path of ``ray.runtime_env`` (py_modules, working_dir) exists on the driver, which uploads it."""
    env = cfg.ray.runtime_env or {}
    paths = [(f"ray.runtime_env.py_modules[{i}]", m) for i, m in enumerate(env.get("py_modules", []))]
    if "working_dir" in env:
        paths.append(("ray.runtime_env.working_dir", env["working_dir"]))
    for key, value in paths:
        if "://" not in value and not os.path.exists(value):
            raise ConfigError(
                f"{key}: {value!r} does not exist (relative paths are taken from the working "
                "directory, else the config file's folder); give the folder of your package, "
                "the one holding its __init__.py"
            )


def add_py_modules_to_path(cfg: JobConfig) -> None:
    """Make ``ray.runtime_env.py_modules`` packages importable in this process too (the driver draws the example
    plots with the job's models), as Ray makes them importable in the workers."""
    for module in (cfg.ray.runtime_env or {}).get("py_modules", []):
        if "://" not in module and os.path.exists(module):
            parent = (
                os.path.dirname(os.path.abspath(module))
                if os.path.isdir(module) or module.endswith(".py")
                else os.path.abspath(module)
            )
            if parent not in sys.path:
                sys.path.insert(0, parent)


def check_feasible(cfg: JobConfig, height: int, width: int) -> list[str]:
    """The (tau, alpha) points of the grid at which ``sampling.n`` cannot certify any pixel of an image of
    height x width pixels (:func:`ray_certseg.certify.can_certify`: tau^n <= alpha / N is needed), each logged
    as a warning before Ray starts with the minimum n for that tau and the largest tau for that n. Such rows
    certify nothing whatever the model; the reducer marks them ``infeasible`` in the table. Not an error:
    the votes stay valid for a ``ray-certseg reduce`` at a feasible grid point."""
    from ray_certseg.certify import can_certify, max_tau, min_n

    n, pixels = cfg.sampling.n, height * width
    found = []
    for tau in cfg.certify.taus:
        for alpha in cfg.certify.alphas:
            if not can_certify(n, tau, alpha, pixels):
                found.append(
                    f"sampling.n={n} cannot certify any pixel of a {height}x{width} image ({pixels} pixels, the "
                    f"first that loads) at tau={tau:g}, alpha={alpha:g}: that needs n >= "
                    f"{min_n(tau, alpha, pixels)}, or tau <= {math.floor(max_tau(n, alpha, pixels) * 1000) / 1000:.3f} "
                    "for this n (certifying needs tau^n <= alpha / N); these rows will be marked infeasible"
                )
    for line in found:
        log.warning("%s", line)
    return found


def check_denoiser(name: str, denoiser: Any, height: int, width: int) -> None:
    """A denoiser whose resolution mode cannot take the dataset's image size (``resolution: resize`` needs
    integer factors of its sample size) fails once here, not on every image."""
    effective_sigma = getattr(denoiser, "effective_sigma", None)
    if effective_sigma is None:
        return
    try:
        effective_sigma(1.0, height, width)
    except ValueError as exc:
        raise ModelError(
            f"models.denoisers.{name}: the dataset's images are {height}x{width} (the first that "
            f"loads): {exc}"
        ) from exc


def load_model(group: str, name: str, load: Callable[[], T]) -> T:
    """``load()``, with a failure re-raised as :class:`ModelError` naming the config entry ``models.group.name``."""
    try:
        return load()
    except Exception as exc:  # any loader failure is this model's
        raise ModelError(f"models.{group}.{name}: {type(exc).__name__}: {exc}") from exc


def check_segmenter(
    name: str, segmenter: Any, num_classes: int, device: Any, size: tuple[int, int] | None = None
) -> None:
    """One forward pass on a black (1, 3, H, W) image (H x W = ``size``, default 64 x 64) must give
    (1, num_classes, H, W) logits: a segmenter for another class count fails here, not on every image."""
    import torch

    h, w = size or PROBE_SIZE
    fix = (
        f"the segmenter must map (B, 3, H, W) images to (B, {num_classes}, H, W) logits, one channel per "
        f"class of the dataset (dataset.num_classes = {num_classes}): check its num_classes, kwargs and weights"
    )
    with torch.inference_mode():
        try:
            logits = segmenter(torch.zeros(1, 3, h, w, device=device))
        except Exception as exc:  # reported with the config key
            raise ModelError(
                f"models.segmenters.{name}: a probe forward on a black {h}x{w} image failed "
                f"({type(exc).__name__}: {exc}); {fix}"
            ) from exc
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (1, num_classes, h, w):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelError(
            f"models.segmenters.{name}: a probe forward on a black {h}x{w} image gave {got}; {fix}"
        )


def root_cause(text: str) -> str:
    """The original ``Type: message`` in the text of a Ray error: the last exception line that is not one of
    Ray's own wrappers, up to the next blank line (module prefixes dropped). The first line if there is none."""
    found = [m for m in _EXCEPTION_LINE.finditer(text) if not m.group().startswith(_RAY_WRAPPERS)]
    if not found:
        return text.strip().splitlines()[0] if text.strip() else "unknown error"
    last = found[-1]
    message = text[last.end() :].split("\n\n", 1)[0].strip()
    return f"{last.group(1)}: {message}"


def job_error(exc: BaseException) -> JobError:
    """A :class:`JobError` for a Ray error of the sampling stage: an actor whose constructor failed (a model),
    or a task whose UDF raised (the store failed)."""
    cause = root_cause(str(exc))
    if getattr(exc, "actor_init_failed", False):
        return JobError(f"the sampling actor could not start: {cause}. Fix the config and run again")
    return JobError(f"sampling stopped: {cause}. Finished vote rows are kept; run again to resume")
