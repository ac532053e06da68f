"""docs/own-data.md, run as written: its files are written from the doc's ``# file:`` blocks and its commands run
from its ``bash`` blocks in a fresh folder, locally (a private Ray started by the job) and through
``ray job submit`` to a real head; then a no-op resume (no Ray started) and the doc's pandas block. The only
substitutions are the ones a test must make: the head's free port instead of 8265, and auth disabled on the
test's own head instead of a token."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_job_e2e import BIN, REPO, ray_head  # noqa: F401 - the fixture: a real head on free ports

pytestmark = pytest.mark.slow
DOC = REPO / "docs" / "own-data.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def write_files(root: Path) -> list[str]:
    written = []
    for block in blocks("python") + blocks("yaml"):
        first, _, body = block.partition("\n")
        if first.startswith("# file: "):
            path = root / first[len("# file: ") :].strip()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
            written.append(path.name)
    return written


def sh(line: str, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    return done


def test_own_data_walkthrough_runs_as_written(tmp_path, ray_head):  # noqa: F811
    root = tmp_path / "walk"
    root.mkdir()
    assert {"make_scenes.py", "colour.py", "save_weights.py", "make_segformer.py", "job.yaml"} <= set(
        write_files(root)
    )
    ray_tmp = tempfile.mkdtemp(prefix="rw", dir="/tmp")
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_CERTSEG": str(REPO),
        "RAY_AUTH_MODE": "disabled",
        "RAY_TMPDIR": ray_tmp,
        "PYTHONPATH": "",
    }
    env.pop("RAY_ADDRESS", None)
    local, cluster = blocks("bash")

    logs = []
    for line in local.strip().splitlines():
        done = sh(line, root, env)
        logs.append(done.stdout + done.stderr)
        assert done.returncode == 0, f"{line}\n{logs[-1][-4000:]}"
    log = logs[-1]

    # without runtime_env, from a folder that is not the package's parent: mynets cannot be imported and the
    # job stops once (exit 2) on the driver, before Ray starts (issue 13: every used model is built there
    # first), its last line the one that says why and how to fix it
    (root / "no_env.yaml").write_text(
        (root / "job.yaml")
        .read_text()
        .replace("  runtime_env: {py_modules: [mynets]}\n", "")
        .replace("${RAY_CERTSEG}", str(REPO))
        .replace("outputs/mine", "outputs/no_env")
    )
    done = sh("ray-certseg run --config ../no_env.yaml", root / "mydata", env)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert (
        last.startswith(
            "ray-certseg: error: models.segmenters.colour: ValueError: cannot import segmenter factory"
        )
        and "py_modules" in last
    ), last

    assert "certified_accuracy" in log and "Loading weights" not in log
    out = root / "outputs" / "mine"
    local_votes = pq.read_table(out / "votes").sort_by([("image_id", "ascending"), ("method", "ascending")])
    assert local_votes.num_rows == 3 * 3
    metrics = pq.read_table(out / "metrics" / "metrics.parquet").to_pandas().set_index("method")
    assert metrics.loc["colour", "certified_accuracy"] > 0.6  # the hand-made colour net is right
    assert (metrics["infeasible_images"] == 0).all()
    assert (out / "plots" / "examples").is_dir()

    # a rerun finds every row written: it starts no Ray (nothing appears in RAY_TMPDIR) and only re-certifies
    for p in Path(ray_tmp).iterdir():
        subprocess.run(["rm", "-rf", str(p)], check=True)
    done = sh("ray-certseg run --config job.yaml", root, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "0 to sample" in done.stderr and not any(Path(ray_tmp).iterdir())

    # the cluster commands: the head is the test's (free ports, started with the venv on PATH, auth off)
    start, submit = [x for x in cluster.strip().splitlines() if x.strip()]
    assert start.startswith("ray start --head")
    submit = submit.replace("http://127.0.0.1:8265", ray_head["address"]).replace("RAY_AUTH_MODE=token ", "")
    done = sh(submit, root, {**env, **ray_head["env"], "RAY_CERTSEG": str(REPO)})
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    cluster_votes = pq.read_table(root / "outputs" / "mine-cluster" / "votes").sort_by(
        [("image_id", "ascending"), ("method", "ascending")]
    )
    for column in ("image_id", "method", "c_hat", "k", "clean_pred"):
        assert cluster_votes[column].equals(local_votes[column]), column

    # the pandas block
    (python_block,) = [b for b in blocks("python") if not b.startswith("# file:")]
    done = subprocess.run(
        [sys.executable, "-c", python_block],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "colour_ddpm" in done.stdout and "infeasible_images" in done.stdout
