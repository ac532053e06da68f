"""What a newcomer sees: Ray Data's progress bars at a terminal, the periodic log line otherwise, and the
known core_worker line explained rather than left unexplained."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

import jobworld
import pytest

from ray_certseg.job import session

REPO = Path(__file__).resolve().parents[1]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_interactive_terminal_decision():
    assert session.interactive_terminal(Tty(), {})
    assert not session.interactive_terminal(io.StringIO(), {})  # piped or redirected
    assert not session.interactive_terminal(
        Tty(), {session.SUBMITTED_JOB_ENV: "{}"}
    )  # a `ray job submit` driver
    assert not session.interactive_terminal(Tty(), {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    assert not session.interactive_terminal(object(), {})


def test_ray_job_submit_sets_the_variable_we_test_for():
    """The supervisor strips RAY_JOB_ID from the entrypoint's env (an internal flag) but sets the job config."""
    from ray._private import ray_constants
    from ray.dashboard.modules.job import job_supervisor

    assert "RAY_JOB_ID" in ray_constants.RAY_INTERNAL_FLAGS
    assert getattr(job_supervisor, "RAY_JOB_CONFIG_JSON_ENV_VAR", None) == session.SUBMITTED_JOB_ENV


def _world(root: Path) -> Path:
    manifest = jobworld.write_dataset(root / "data", 2)
    cfg = jobworld.config(manifest, jobworld.write_models(root / "models"), root / "out")
    cfg["methods"] = {"plain": {"segmenter": "seg"}}
    return jobworld.write_config(root / "cfg.yaml", cfg)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_DATA_DISABLE_PROGRESS_BARS"}
    return {**env, "RAY_AUTH_MODE": "disabled", "COLUMNS": "150", "LINES": "40"}


@pytest.mark.slow
def test_terminal_run_shows_progress_bars_and_a_piped_run_logs_progress(tmp_path):
    config = _world(tmp_path)
    command = [sys.executable, str(REPO / "jobs" / "certify.py"), "--config", str(config)]
    leader, follower = pty.openpty()
    subprocess.run(["stty", "cols", "150", "rows", "40"], stdin=follower, check=False)
    proc = subprocess.Popen(
        command + ["--output", str(tmp_path / "tty")],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=_env(),
        cwd=tmp_path,
        close_fds=True,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    os.close(leader)
    seen = b"".join(chunks).decode(errors="replace")
    assert "Running Dataset" in seen and "MapBatches(VoteSampler)" in seen  # Ray Data's bars
    assert "progress:" not in seen
    assert "ray-project/ray#53727" in seen  # the explanation precedes the core_worker line

    piped = subprocess.run(
        command + ["--output", str(tmp_path / "piped"), "--progress-interval", "0.5"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert "progress:" in piped.stderr and "Running Dataset" not in piped.stderr
