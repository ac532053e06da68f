"""One run folder: its filesystem (local or an object store) and every path in it, named once.

::

    <output>/
      config.json          the validated job config, secrets redacted (written before sampling)
      votes/               vote-count Parquet files (ray_certseg.votes); the only thing sampling writes
      _errors/             one small Parquet file per failed (image, method, sigma) row, while sampling runs
      errors.parquet       those records gathered by the driver
      _partial/            vote files a crash left half-written, set aside on resume (their rows are resampled)
      metrics/             per_image.parquet, metrics.parquet, summary.md (``reduce``; other names for recertify),
                           inputs.json (the votes, errors and config they and plots/ were made from)
      plots/               figures (ray_certseg.results.plots); plots/examples/ per image
      report.md            the report (ray_certseg.results.report)

Every read and write goes through :meth:`RunDir.io`, which turns object-store failures into errors naming the
bucket and never a credential (:func:`ray_certseg.storage.translate_errors`); ``repr`` shows no options.
"""

from __future__ import annotations

import io as _io
import json
import posixpath
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ray_certseg import storage

CONFIG, VOTES, ERROR_PARTS, ERRORS, PARTIAL = "config.json", "votes", "_errors", "errors.parquet", "_partial"
METRICS, PLOTS, REPORT = "metrics", "plots", "report.md"
INPUTS = "inputs.json"  # what metrics/ (or a reduction) and plots/ were made from: a no-op rerun skips both


@dataclass(frozen=True)
class RunDir:
    """The folder ``url`` (a local path or ``s3://bucket/prefix``) read and written with ``storage_options``."""

    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, run: RunDir | str, storage_options: Mapping[str, Any] | None = None) -> RunDir:
        """``run`` itself, or the run folder at the path ``run``."""
        return run if isinstance(run, RunDir) else cls(str(run), dict(storage_options or {}))

    @classmethod
    def of_config(cls, cfg: Any) -> RunDir:
        """The run folder of a :class:`ray_certseg.config.JobConfig` (its ``output``, its options)."""
        return cls(cfg.output, dict(cfg.storage_options))

    # ----------------------------------------------------------------------------------------------- paths
    def path(self, *parts: str) -> str:
        """The URL (or local path) of ``parts`` under the folder, as :mod:`ray_certseg.storage` takes it."""
        return storage.join(self.url, *parts) if parts else self.url

    @property
    def votes(self) -> str:
        return self.path(VOTES)

    @property
    def plots(self) -> str:
        return self.path(PLOTS)

    def metrics(self, name: str = "", into: str = METRICS) -> str:
        """``metrics/<name>`` (or the folder), or under ``into`` for a recertification's other folder."""
        return self.path(into, name) if name else self.path(into)

    @property
    def is_local(self) -> bool:
        return storage.is_local(self.url)

    # ---------------------------------------------------------------------------------------- filesystems
    def filesystem(self, *parts: str) -> tuple[Any, str]:
        """(fsspec filesystem, its path of ``parts``)."""
        return storage.get_filesystem(self.path(*parts), self.storage_options)

    def pyarrow_filesystem(self, *parts: str) -> tuple[Any, str]:
        """(pyarrow filesystem, its path of ``parts``), for Ray Data and pyarrow.dataset."""
        return storage.pyarrow_filesystem(self.path(*parts), self.storage_options)

    @contextmanager
    def io(self, *parts: str) -> Iterator[Any]:
        """The fsspec filesystem, inside the error translation for ``parts``."""
        fs, _ = self.filesystem(*parts)
        with storage.translate_errors(self.path(*parts), self.storage_options):
            yield fs

    def redact(self, text: str) -> str:
        """``text`` without any credential of this folder's options or the environment."""
        return storage.redact(text, self.storage_options)

    def check_bucket(self) -> None:
        storage.check_bucket(self.url, self.storage_options)  # never create a bucket by accident

    # ---------------------------------------------------------------------------------------- operations
    def exists(self, *parts: str) -> bool:
        return storage.exists(self.path(*parts), self.storage_options)

    def read_bytes(self, *parts: str) -> bytes:
        return storage.read_bytes(self.path(*parts), self.storage_options)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        storage.write_bytes(self.path(*parts), data, self.storage_options)

    def remove(self, *parts: str) -> None:
        """Delete the file at ``parts``."""
        fs, path = self.filesystem(*parts)
        with storage.translate_errors(self.path(*parts), self.storage_options):
            fs.rm(path)

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_json(self, data: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(data, indent=2, sort_keys=True).encode(), *parts)

    def read_table(self, *parts: str, columns: list[str] | None = None) -> Any:
        import pyarrow.parquet as pq

        return pq.read_table(_io.BytesIO(self.read_bytes(*parts)), columns=columns)

    def write_table(self, table: Any, *parts: str) -> None:
        import pyarrow.parquet as pq

        buffer = _io.BytesIO()
        pq.write_table(table, buffer)
        self.write_bytes(buffer.getvalue(), *parts)

    def files(self, *parts: str, suffix: str = ".parquet") -> list[str]:
        """The filesystem paths of the files under ``parts`` (recursively) ending in ``suffix``, sorted."""
        fs, root = self.filesystem(*parts)
        with storage.translate_errors(self.path(*parts), self.storage_options):
            return sorted(p for p in fs.find(root) if p.endswith(suffix)) if fs.exists(root) else []

    def sizes(self, *parts: str, suffix: str = ".parquet") -> dict[str, int]:
        """{path below the folder: bytes} of the files under ``parts`` ending in ``suffix``, from one listing."""
        fs, root = self.filesystem(*parts)
        with storage.translate_errors(self.path(*parts), self.storage_options):
            found = fs.find(root, detail=True) if fs.exists(root) else {}
        return {
            self.relative(p): int(info["size"]) for p, info in sorted(found.items()) if p.endswith(suffix)
        }

    def size(self, *parts: str) -> int | None:
        """Bytes of the file at ``parts``; None when there is none."""
        fs, path = self.filesystem(*parts)
        with storage.translate_errors(self.path(*parts), self.storage_options):
            return int(fs.size(path)) if fs.isfile(path) else None

    def relative(self, fs_path: str) -> str:
        """A filesystem path under the folder as the path parts below it (``votes/x.parquet``)."""
        return posixpath.relpath(fs_path, self.filesystem()[1])

    # --------------------------------------------------------------------------------------------- votes
    def vote_files(self) -> tuple[Any, list[str]]:
        """(pyarrow filesystem, the vote files under votes/, sorted); none when the folder is missing."""
        from ray_certseg import votes

        return votes.parquet_files(self.votes, storage_options=self.storage_options)

    def vote_schema_version(self) -> int | None:
        """The vote schema version of votes/ (refused when unreadable, :func:`ray_certseg.votes.check_schema_version`)."""
        from ray_certseg import votes

        return votes.check_schema_version(self.votes, storage_options=self.storage_options)

    # --------------------------------------------------------------------------------- "up to date" record
    def inputs(self, grid: Mapping[str, Any]) -> dict[str, Any]:
        """What a reduction of this run with ``grid`` (its record: points and pooling) and the plots drawn from it
        are a function of: this package's version, the recorded job config (without ``ray``, ``output`` and
        ``storage_options``, which change no result), the grid, and the vote files and errors.parquet by path and
        size. A vote file is written once and never changed, so equal listings mean equal votes."""
        from ray_certseg import __version__

        config = self.read_json(CONFIG) if self.exists(CONFIG) else {}
        recorded = {
            "version": __version__,
            "config": {k: v for k, v in config.items() if k not in ("ray", "output", "storage_options")},
            "grid": dict(grid),
            "vote_files": self.sizes(VOTES),
            "errors": self.size(ERRORS),
        }
        return json.loads(json.dumps(recorded))

    def is_current(self, inputs: Mapping[str, Any]) -> bool:
        """Whether metrics/ (its summary too) and plots/ were both made from exactly ``inputs``: the reducer
        writes ``metrics/inputs.json`` last, and the plots copy it to ``plots/inputs.json`` once drawn
        (:meth:`record_plotted`)."""
        wanted = ((METRICS, INPUTS), (METRICS, "summary.md"), (PLOTS, INPUTS))
        if not all(self.exists(*parts) for parts in wanted):
            return False
        return all(self.read_json(part, INPUTS) == inputs for part in (METRICS, PLOTS))

    def record_plotted(self) -> None:
        """Note that plots/ now shows what metrics/ holds (its ``inputs.json``, copied); written last."""
        if self.exists(METRICS, INPUTS):
            self.write_json(self.read_json(METRICS, INPUTS), PLOTS, INPUTS)


ERRORS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("method", pa.string()),
        ("sigma", pa.float64()),
        ("stage", pa.string()),
        ("error", pa.string()),
    ]
)
