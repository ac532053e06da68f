"""The job as users run it: `ray job submit` to a real Ray head started here, and a run whose inputs and
outputs live in S3 (moto's server on 127.0.0.1). Real processes, real Parquet, free ports from the OS."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jobworld
import pyarrow.parquet as pq
import pytest
from s3server import free_port, start_moto_server

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray head exited with {proc.returncode} before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


@pytest.fixture
def ray_head():
    """`ray start --head --block` on 127.0.0.1 with every port taken from the OS and a private temp dir;
    stopped by signalling its own process group only (never `ray stop`, which stops every Ray on the host)."""
    with start_ray_head() as head:
        yield head


@contextlib.contextmanager
def start_ray_head() -> Iterator[dict]:
    """The ``ray_head`` fixture's head, as a context manager."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Unix socket paths are length-limited
    dashboard = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--object-store-memory=200000000",
        "--disable-usage-stats",
        *[f"{k}={v}" for k, v in ports.items()],
    ]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_http(f"http://127.0.0.1:{dashboard}/api/version", 180, proc)
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            # workers and raylet stop within seconds; the GCS would drain for 30 s more, pointless for a head
            # of the test's own (its temp dir and ports are private), so what is left of the group is killed
            proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_job_on_a_real_head(ray_head, tmp_path):
    manifest = jobworld.write_dataset(tmp_path / "data", 3)
    models = jobworld.write_models(tmp_path / "models")
    out = tmp_path / "out"
    cfg = jobworld.write_config(tmp_path / "job.yaml", jobworld.config(manifest, models, out))
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        ray_head["address"],
        "--working-dir",
        str(REPO),
        "--submission-id",
        "certseg-e2e",
        "--",
        "python",
        "jobs/certify.py",
        "--config",
        str(cfg),
        "--progress-interval",
        "1",
    ]
    done = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=600, check=False)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "succeeded" in log
    assert "certified_accuracy" in log  # the job printed the metrics table
    assert "Using address" in log or "Connecting to existing Ray cluster" in log  # it attached, no new Ray
    votes = pq.read_table(out / "votes", columns=["image_id", "method", "sigma"])
    assert votes.num_rows == 3 * 2 * 2
    keys = set(zip(*(votes[c].to_pylist() for c in ("image_id", "method", "sigma"))))
    assert len(keys) == votes.num_rows
    metrics = pq.read_table(out / "metrics" / "metrics.parquet").to_pandas()
    assert len(metrics) == 2 * 2 * 2 and (metrics["images"] == 3).all()


def test_job_reads_and_writes_s3(tmp_path, ray_session, monkeypatch):
    import s3fs

    from ray_certseg import cli

    secret = "s3cr3t-VALUE-never-logged"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with start_moto_server() as endpoint:
        opts = {"key": "AKIAE2ETEST", "secret": secret, "endpoint_url": endpoint}
        fs = s3fs.S3FileSystem(**opts)
        fs.mkdir("certseg")
        manifest = jobworld.write_dataset(tmp_path / "data", 3)
        fs.put(str(manifest.parent) + "/", "certseg/data/", recursive=True)
        models = jobworld.write_models(tmp_path / "models")
        cfg = jobworld.config(Path("unused"), models, Path("unused"))
        cfg["dataset"]["manifest"] = "s3://certseg/data/manifest.csv"
        cfg["output"] = "s3://certseg/runs/e2e"
        cfg["storage_options"] = opts
        path = jobworld.write_config(tmp_path / "s3.yaml", cfg)
        assert cli.main(["run", "--config", str(path), "--progress-interval", "1"]) == 0
        files = fs.find("certseg/runs/e2e")
        assert any(f.startswith("certseg/runs/e2e/votes/") and f.endswith(".parquet") for f in files)
        for name in ("metrics.parquet", "metrics.csv", "summary.md", "per_image.parquet"):
            assert f"certseg/runs/e2e/metrics/{name}" in files
        with fs.open("certseg/runs/e2e/metrics/metrics.parquet", "rb") as f:
            metrics = pq.read_table(f).to_pandas()
        assert (metrics["images"] == 3).all()
        for f in files:  # no credential in anything the job wrote
            assert secret.encode() not in fs.cat(f)
        # a rerun resumes from S3: nothing left to sample
        assert cli.main(["run", "--config", str(path)]) == 0
        assert sorted(fs.find("certseg/runs/e2e/votes")) == sorted(f for f in files if "/votes/" in f)
