"""The run folder: one object names every path of a run and reads and writes it, locally and on S3 (moto), with
object-store errors translated and no credential in its repr or its errors; and no other module spells a run
path."""

from __future__ import annotations

import ast
import traceback
from pathlib import Path

import pyarrow as pa
import pytest
from s3server import start_moto_server

from ray_certseg.job import rundir
from ray_certseg.job.rundir import RunDir
from ray_certseg.storage import StorageError

PACKAGE = Path(__file__).resolve().parent.parent / "ray_certseg"
KEY, SECRET = "AKIADUMMYKEY0003", "dummy-secret-value-0004"


def _round_trip(run: RunDir) -> None:
    assert not run.exists(rundir.CONFIG) and run.files(rundir.VOTES) == []
    run.write_json({"name": "x", "n": [1, 2]}, rundir.CONFIG)
    assert run.read_json(rundir.CONFIG) == {"name": "x", "n": [1, 2]}
    table = pa.table({"image_id": ["a", "b"], "sigma": [0.25, 0.5]})
    run.write_table(table, rundir.ERROR_PARTS, "a.parquet")
    run.write_table(table, rundir.ERROR_PARTS, "sub", "b.parquet")
    found = run.files(rundir.ERROR_PARTS)
    assert [run.relative(p) for p in found] == ["_errors/a.parquet", "_errors/sub/b.parquet"]
    assert run.read_table(run.relative(found[0])).equals(table)
    run.write_bytes(b"# report\n", rundir.REPORT)
    assert run.read_bytes(rundir.REPORT) == b"# report\n" and run.exists(rundir.REPORT)


def test_paths_and_local_round_trip(tmp_path):
    run = RunDir(str(tmp_path / "out"))
    assert run.votes == str(tmp_path / "out" / "votes") and run.plots.endswith("/out/plots")
    assert run.metrics("summary.md") == str(tmp_path / "out" / "metrics" / "summary.md")
    assert run.metrics(into="reductions/x") == str(tmp_path / "out" / "reductions" / "x")
    assert run.is_local and RunDir.of(run) is run and RunDir.of(str(tmp_path / "out")) == run
    _round_trip(run)


def test_s3_round_trip_errors_and_repr_carry_no_credential(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with start_moto_server() as endpoint:
        import s3fs

        s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir("runs")
        options = {"endpoint_url": endpoint, "key": KEY, "secret": "sk-option-secret"}
        run = RunDir("s3://runs/job", options)
        assert "sk-option-secret" not in repr(run) and KEY not in repr(run)
        assert run.votes == "s3://runs/job/votes" and not run.is_local
        _round_trip(run)
        missing = RunDir("s3://no-such-bucket/job", options)
        with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist") as info:
            missing.check_bucket()
        with pytest.raises(StorageError, match="no-such-bucket"):
            missing.read_json(rundir.CONFIG)
        text = "".join(traceback.format_exception(info.value))
        assert KEY not in text and SECRET not in text and "sk-option-secret" not in text
        assert missing.redact(f"failed with {KEY} and sk-option-secret") == "failed with *** and ***"


def test_no_module_but_rundir_spells_a_run_path():
    """The names of a run folder's parts appear as string literals in rundir.py only (models/ reads Hugging
    Face folders, whose config.json is another file)."""
    names = {rundir.CONFIG, rundir.VOTES, rundir.ERROR_PARTS, rundir.ERRORS, rundir.PARTIAL}
    names |= {rundir.METRICS, rundir.PLOTS, rundir.REPORT}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "rundir.py" or "models" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value!r}")
    assert not found, found
