"""The sampling actor: one per device, loading every model once, turning a batch of image references into vote
rows (``count_votes`` per pending (method, sigma)) and a failed row into an error record, never a failed batch."""

from __future__ import annotations

import json
import logging
import threading
import traceback
import zlib
from typing import Any

import numpy as np
import pyarrow as pa

from ray_certseg import storage, votes
from ray_certseg.config import JobConfig
from ray_certseg.job import preflight, rundir
from ray_certseg.job.rundir import ERRORS_SCHEMA, RunDir

log = logging.getLogger("ray_certseg")


CALLS_PER_ACTOR = 2
"""Calls of one sampling actor that Ray runs at once, in threads: one samples, the other decodes its next image."""


def row_key(image_id: str, method: str, sigma: float) -> tuple[str, str, float]:
    """The identity of one vote row: (image, method, sigma)."""
    return (str(image_id), str(method), float(sigma))


# --------------------------------------------------------------------------------------------- sampling stage
class VoteSampler:
    """Ray Data actor UDF: loads every segmenter and denoiser the job's methods use once, in ``__init__``.

    Each call receives a batch of image references (``image_id``, paths, and ``todo``: the JSON list of
    pending ``[method, sigma]`` pairs for that image) and returns one Arrow row per (image, method, sigma)
    in the vote schema. Any exception while loading or sampling one image is recorded and that row is
    skipped, so one bad image costs nothing else.
    """

    def __init__(
        self, config: dict[str, Any], probe_size: tuple[int, int] | None = None, row_counter: Any = None
    ):
        import torch

        from ray_certseg.models.registry import load_denoiser, load_segmenter
        from ray_certseg.sampling import SamplingSpec, keep_freed_host_memory, prepare_model

        self.cfg = JobConfig.from_dict(config)
        s = self.cfg.sampling
        if s.keep_host_memory:
            keep_freed_host_memory()
        self.device = resolve_device(s.device)
        self.dtype = getattr(torch, s.dtype)
        self.autocast_dtype = None if s.dtype == "float32" else self.dtype
        used_seg = {m.segmenter for m in self.cfg.methods.values()}
        used_den = {m.denoiser for m in self.cfg.methods.values() if m.denoiser}
        # Weights stay float32; bf16/fp16 run under autocast (sampling.dtype), except where a loader
        # applies its own precision scheme (ADM's fp16 blocks on GPU).
        # A model that fails to load, or a segmenter for another class count, fails this constructor: Ray Data
        # then stops the job once (preflight.job_error) instead of every image failing the same way.
        prep = {"channels_last": s.channels_last, "compile": s.compile}
        self.segmenters = {}
        for name in sorted(used_seg):
            segmenter = preflight.load_model(
                "segmenters",
                name,
                lambda name=name: load_segmenter(self.cfg.models.segmenters[name], device=self.device),
            )
            preflight.check_segmenter(
                name, segmenter, self.cfg.dataset.num_classes, self.device, self.cfg.dataset.resize
            )
            self.segmenters[name] = prepare_model(segmenter, **prep)
        den_dtype = self.dtype if self.device.type == "cuda" else torch.float32
        self.denoisers = {}
        for name in sorted(used_den):
            denoiser = preflight.load_model(
                "denoisers",
                name,
                lambda name=name: load_denoiser(
                    self.cfg.models.denoisers[name], device=self.device, dtype=den_dtype
                ),
            )
            self._size_tile_batches(name, denoiser)
            self.denoisers[name] = prepare_model(denoiser, **prep)
        if probe_size is not None:
            for name, denoiser in self.denoisers.items():
                preflight.check_denoiser(name, denoiser, *probe_size)
        self.hierarchy = None
        if self.cfg.dataset.hierarchy is not None:  # per-level votes for hierarchical certification
            from ray_certseg.certify import class_tree
            from ray_certseg.sampling import level_index

            self.hierarchy = class_tree.load(self.cfg.dataset.hierarchy)
            self.hierarchy_index = level_index(self.hierarchy.node[1:], self.device)
        self.spec = SamplingSpec(
            sigma=0.0,  # each row's own: spec.at(sigma)
            n0=s.n0,
            n=s.n,
            num_classes=self.cfg.dataset.num_classes,
            batch_size=s.batch_size,
            seed=s.seed,
            device=self.device,
            autocast_dtype=self.autocast_dtype,
            channels_last=s.channels_last,
            return_counts=s.store_counts,
            hierarchy_index=None if self.hierarchy is None else self.hierarchy_index,
        )
        self.run = RunDir.of_config(self.cfg)
        self.row_counter = row_counter  # a RowCounter actor handle (the driver's progress line), or None
        self._device = threading.Lock()  # one call samples at a time; the other reads and decodes meanwhile

    def _size_tile_batches(self, name: str, denoiser: Any) -> None:
        """Tiles per network call of a tile-mode denoiser (``sampling.tile_pixels``), set once per actor
        before any image (and before compiling), so every image of the actor runs the same batch shapes."""
        from ray_certseg.models.denoisers import DiffusionDenoiser

        s = self.cfg.sampling
        if not isinstance(denoiser, DiffusionDenoiser) or denoiser.resolution != "tile":
            return
        if s.tile_pixels != "auto":
            denoiser.tile_pixels = s.tile_pixels
        elif denoiser.fit_tile_pixels_to(self.device, self.autocast_dtype) is not None:
            log.info("denoiser %s: %d tiles per network call", name, denoiser.tiles_per_call(s.batch_size))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Vote rows of a batch of image references.

        Ray runs up to ``CALLS_PER_ACTOR`` calls of one actor at once, in threads. Reading and decoding an
        image happen outside the actor's device lock, sampling inside it: while one call samples, the other
        reads and decodes its next image (both release the GIL in their kernels and codecs), so the device
        waits for no decoding, across Ray batches too. A load error still costs only its own image."""
        from ray_certseg.data import load_item

        records: list[votes.VoteRecord] = []
        for i in range(len(batch["image_id"])):
            ref = {k: _scalar(v[i]) for k, v in batch.items() if k != "todo"}
            todo = json.loads(batch["todo"][i])
            try:
                item = load_item(ref, self.cfg.dataset)
            except storage.StorageError:
                raise  # the store itself fails: every image would, so the job stops (preflight.job_error)
            except Exception as exc:  # noqa: BLE001 - one bad image must not cost the others
                self._record_error(ref["image_id"], "", float("nan"), "load", exc)
                self._finished(len(todo))
                continue
            failed = []
            with self._device:
                for method, sigma in todo:
                    try:
                        records.append(self._sample(item, method, float(sigma)))
                    except Exception as exc:  # noqa: BLE001
                        failed.append((method, float(sigma), exc))
                    self._finished(1)
            for method, sigma, exc in failed:  # written outside the lock: the device goes on meanwhile
                self._record_error(ref["image_id"], method, sigma, "sample", exc)
        return votes.make_table(records)

    def _sample(self, item: dict[str, Any], method: str, sigma: float) -> votes.VoteRecord:
        from ray_certseg.sampling import count_votes

        m = self.cfg.methods[method]
        segmenter = self.segmenters[m.segmenter]
        denoiser = self.denoisers[m.denoiser] if m.denoiser else None
        spec = self.spec.at(sigma)
        v = count_votes(item["image"], segmenter, spec, denoiser=denoiser, image_id=item["image_id"])
        return votes.VoteRecord.from_votes(
            v,
            spec,
            image_id=item["image_id"],
            dataset=item["dataset"],
            method=method,
            denoiser=getattr(denoiser, "name", "") if denoiser is not None else "",
            segmenter=getattr(segmenter, "name", m.segmenter),
            ignore_index=self.cfg.dataset.ignore_index,
            label=item["label"],
            hierarchy=None if self.hierarchy is None else self.hierarchy.digest,
        )

    def _finished(self, rows: int) -> None:
        """Tell the driver's progress line that ``rows`` more rows are done (sampled or failed); a call that
        waits for nothing, so the device never waits for it."""
        if self.row_counter is not None:
            self.row_counter.add.remote(rows)

    def _record_error(self, image_id: str, method: str, sigma: float, stage: str, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        log.warning(
            "image %s (%s%s): %s", image_id, stage, f", {method} sigma={sigma}" if method else "", message
        )
        log.debug("%s", "".join(traceback.format_exception(exc)))  # called after the except block too
        table = pa.Table.from_pylist(
            [
                {
                    "image_id": image_id,
                    "method": method,
                    "sigma": sigma,
                    "stage": stage,
                    "error": self.run.redact(message),
                }
            ],
            schema=ERRORS_SCHEMA,
        )
        tag = zlib.crc32(f"{image_id}:{method}:{sigma}:{stage}".encode())
        self.run.write_table(table, rundir.ERROR_PARTS, f"{image_id}-{tag:08x}.parquet")


def _scalar(x: Any) -> Any:
    return x.item() if isinstance(x, np.generic) else x


def resolve_device(name: str):
    """``auto`` -> the first CUDA device when there is one, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
