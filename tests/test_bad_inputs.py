"""Bad input through the whole job (``cli.main(["run", ...])``): an image-level fault costs only that image's rows
and is reported (errors.parquet, summary, exit code 1); a job-level fault is one clear error with exit code 2
before any sampling (no vote file, no per-image errors, no actor restarted); hostile image ids write nothing
outside the output folder; no credential reaches a log, an error or an output file. Nothing is mocked: real
PNGs, real checkpoints, a real pickle, moto's S3 server, a private Ray instance for the log test."""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jobworld
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from s3server import free_port, start_moto_server
from safetensors.torch import save_file

from ray_certseg import cli
from ray_certseg.data import sanitize_id

REPO = Path(__file__).resolve().parent.parent
KEY, SECRET, ENV_SECRET = "AKIAFAULTTEST0001", "opt-secret-Zq81-never-logged", "env-secret-Wx27-never-logged"
NAN_THRESHOLD = 0.9  # the fault-injection segmenter's logits are NaN for images brighter than this on average


class NanOnBright(torch.nn.Module):
    """logits = x (class c = colour channel c, right for jobworld's images) + log(0.9 - mean(x)): finite for the
    toy images (mean about 0.4), NaN for a white image. A real TorchScript file, loaded like any user model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.log(NAN_THRESHOLD - x.mean(dim=(1, 2, 3), keepdim=True))


class Marker:
    """Unpickling this creates ``path``: proof that a pickle was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = jobworld.write_models(root)
    nan_seg = root / "nan_on_bright.pt"
    torch.jit.save(torch.jit.trace(NanOnBright(), torch.rand(1, 3, 16, 16)), str(nan_seg))
    from ray_certseg.models.tiny import tiny_segnet

    save_file(tiny_segnet(5, width=8).state_dict(), str(root / "seg5.safetensors"))
    marker = root / "pickle-was-executed"
    torch.save({"conv.weight": torch.zeros(1), "extra": Marker(str(marker))}, root / "evil.pt")
    (root / "not_diffusers").mkdir()
    (root / "not_diffusers" / "README.txt").write_text("weights will be here")
    return {
        **out,
        "nan_seg": nan_seg,
        "seg5": root / "seg5.safetensors",
        "evil": root / "evil.pt",
        "marker": marker,
        "not_diffusers": root / "not_diffusers",
    }


def base_config(models, manifest: Path, out: Path) -> dict:
    return jobworld.config(manifest, models, out, sigmas=[0.25])


def run(cfg: dict, tmp_path: Path, *extra: str) -> int:
    path = jobworld.write_config(tmp_path / f"job{len(list(tmp_path.glob('job*.yaml')))}.yaml", cfg)
    return cli.main(["run", "--config", str(path), "--progress-interval", "0", *extra])


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ------------------------------------------------------------------------------------------------ image-level
def write_faulty_dataset(
    root: Path, abs_target: Path
) -> tuple[Path, dict[str, str], dict[str, tuple[str, str]]]:
    """jobworld's 3 good images plus one item per image-level fault, several with hostile ids. Returns the
    manifest, {jobworld id of a good image: its id in the manifest} and {id of a bad item: (its stage as the
    message names it, a phrase of the fix)}."""
    manifest = jobworld.write_dataset(root, 3)
    rows = manifest.read_text().splitlines()
    good = {"img000": "../../escape_good", "img001": str(abs_target / "good"), "img002": "img002"}
    rows = [rows[0]] + [r.rsplit(",", 1)[0] + "," + good[r.rsplit(",", 1)[1]] for r in rows[1:]]
    label = np.array(Image.open(root / "lab000.png"))
    image = np.array(Image.open(root / "img000.png"))

    def save(name: str, array: np.ndarray) -> str:
        Image.fromarray(array).save(root / name)
        return name

    (root / "garbage.png").write_bytes(b"this is not a PNG file at all " * 8)
    (root / "truncated.png").write_bytes((root / "img002.png").read_bytes()[:60])
    bad_label = label.copy()
    bad_label[5, 5] = 7  # a class id outside [0, 3) that is not the ignore label 255
    bad = [
        (
            "garbage.png",
            "lab000.png",
            "../../../escape_garbage",
            "decode_image",
            "re-download or re-export it",
        ),
        (
            "truncated.png",
            "lab002.png",
            str(abs_target / "truncated"),
            "decode_image",
            "re-download or re-export",
        ),
        ("img000.png", "missing_label.png", "nolabel", "read_label", "check the manifest"),
        ("img000.png", save("small_label.png", label[:12]), "mismatch", "check_size", "pair the right files"),
        (
            "img000.png",
            save("bad_label.png", bad_label),
            "badlabel",
            "check_label",
            "check dataset.num_classes",
        ),
        (
            save("white.png", np.full_like(image, 255)),
            "lab000.png",
            "white",
            "sigma=0.25",
            "check the model weights",
        ),
    ]
    rows += [f"{i},{lab},{raw}" for i, lab, raw, _, _ in bad]
    manifest.write_text("\n".join(rows) + "\n")
    expected = {raw: (stage, fix) for _, _, raw, stage, fix in bad}
    return manifest, good, expected


def test_image_level_faults_cost_only_their_own_rows(models, tmp_path, ray_session):
    abs_target = tmp_path / "absolute_target"
    manifest, good, expected = write_faulty_dataset(tmp_path / "data", abs_target)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    cfg = base_config(models, manifest, out)
    cfg["models"]["segmenters"]["seg"] = {
        "kind": "torchscript",
        "path": str(models["nan_seg"]),
        "num_classes": 3,
    }
    before = tree(tmp_path)

    assert run(cfg, work) == 1

    # every row of every good image exactly once, under its sanitised id; nothing of a bad image
    votes = pq.read_table(out / "votes", columns=["image_id", "method", "sigma"])
    got = collections.Counter(zip(*(votes[c].to_pylist() for c in ("image_id", "method", "sigma"))))
    safe = {raw: sanitize_id(raw) for raw in [*good.values(), *expected]}
    assert got == collections.Counter(
        {(safe[raw], m, 0.25): 1 for raw in good.values() for m in ("plain", "diffusion")}
    )
    for raw in [*good.values(), *expected]:
        assert "/" not in safe[raw] and ".." not in safe[raw] and not safe[raw].startswith(".")

    # one record per bad image (load faults), one per (method, sigma) for the NaN image; clear messages
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    by_image = collections.defaultdict(list)
    for e in errors:
        by_image[e["image_id"]].append(e)
    assert set(by_image) == {safe[raw] for raw in expected}
    for raw, (stage, fix) in expected.items():
        records = by_image[safe[raw]]
        if raw == "white":
            assert sorted((e["method"], e["stage"]) for e in records) == [
                ("diffusion", "sample"),
                ("plain", "sample"),
            ]
            assert all("non-finite logits (NaN/Inf)" in e["error"] for e in records)
        else:
            assert [(e["method"], e["stage"]) for e in records] == [("", "load")]
        for e in records:
            assert safe[raw] in e["error"] and stage in e["error"] and fix in e["error"], e

    # the summary names every failed image with its error
    summary = (out / "metrics" / "summary.md").read_text()
    metrics = pq.read_table(out / "metrics" / "metrics.parquet").to_pandas()
    assert set(metrics["images"]) == {len(good)}
    for raw, (stage, _) in expected.items():
        line = next(x for x in summary.splitlines() if x.startswith(f"| {safe[raw]} |"))
        assert stage in line

    # hostile ids wrote nothing outside the output folder
    assert not abs_target.exists()
    assert {p for p in tree(tmp_path) - before if not p.startswith("work/out")} == {"work/job0.yaml"}
    for p in out.rglob("*"):
        assert p.resolve().is_relative_to(out.resolve())


# -------------------------------------------------------------------------------------------------- job-level
def assert_stopped_before_sampling(
    out: Path, err: str, *phrases: str, votes_before: tuple[str, ...] = ()
) -> None:
    """The message says what and how to fix; no vote file was added, no per-image error written, no secret shown."""
    for phrase in phrases:
        assert phrase in err, err
    assert sorted(p.name for p in (out / "votes").glob("*.parquet")) == sorted(votes_before)
    assert not (out / "errors.parquet").exists()  # not one identical error per image
    assert KEY not in err and SECRET not in err and ENV_SECRET not in err


@pytest.mark.parametrize(
    "override,phrases",
    [
        ("sampling.sigmas=[0.25, -0.5]", ["sampling.sigmas[1]", "> 0"]),
        ("certify.taus=[0.4]", ["certify.taus[0]", "0.5 < tau < 1"]),
        ("certify.alphas=[1.5]", ["certify.alphas[0]", "0 < alpha < 1"]),
        ("sampling.n0=0", ["sampling.n0", ">= 1"]),
        ("sampling.n=70000", ["sampling.n", "[1, 65535]"]),
        ("sampling.batchsize=4", ["unknown key 'sampling.batchsize'", "did you mean 'batch_size'"]),
        ("outptu=elsewhere", ["unknown key 'outptu'", "did you mean 'output'"]),
    ],
)
def test_bad_config_values_stop_before_anything_runs(models, tmp_path, capsys, override, phrases):
    out = tmp_path / "out"
    cfg = base_config(models, jobworld.write_dataset(tmp_path / "data", 1), out)
    assert run(cfg, tmp_path, "--set", override) == 2
    assert_stopped_before_sampling(out, capsys.readouterr().err, *phrases)
    assert not out.exists() and not (tmp_path / "elsewhere").exists()


def sampler_actors() -> dict[str, dict]:
    """The VoteSampler actors this Ray session has created (the GCS actor table: needs no dashboard)."""
    from ray._private import state

    return {k: a for k, a in state.actors().items() if "VoteSampler" in a["ActorClassName"]}


def _missing_denoiser(cfg, m, tmp_path):
    cfg["models"]["denoisers"]["ddpm"]["path"] = str(tmp_path / "no_such_folder")
    return ["models.denoisers.ddpm", "no_such_folder", "does not exist", "a diffusers denoiser folder is"]


def _not_diffusers(cfg, m, tmp_path):
    cfg["models"]["denoisers"]["ddpm"]["path"] = str(m["not_diffusers"])
    return ["models.denoisers.ddpm", "is not a diffusers model folder", "DDPMPipeline folder"]


def _pickle_checkpoint(cfg, m, tmp_path):
    cfg["models"]["segmenters"]["seg"]["weights"] = str(m["evil"])
    return ["models.segmenters.seg", "evil.pt", "needs code execution", "safetensors"]


def _declared_class_count(cfg, m, tmp_path):
    seg = cfg["models"]["segmenters"]["seg"]
    seg.update(num_classes=5, weights=str(m["seg5"]), kwargs={"num_classes": 5, "width": 8})
    return ["models.segmenters.seg.num_classes", "predicts 5 classes", "has 3 (dataset.num_classes)"]


def _actual_class_count(cfg, m, tmp_path):
    seg = cfg["models"]["segmenters"]["seg"]  # declares the dataset's 3 classes, but the network has 5
    seg.update(weights=str(m["seg5"]), kwargs={"num_classes": 5, "width": 8})
    return ["models.segmenters.seg", "(1, 5, 64, 64)", "dataset.num_classes = 3", "check its num_classes"]


@pytest.mark.parametrize(
    "fault",
    [_missing_denoiser, _not_diffusers, _pickle_checkpoint, _declared_class_count, _actual_class_count],
    ids=lambda f: f.__name__.strip("_"),
)
def test_model_faults_are_one_job_error_before_sampling(models, tmp_path, capsys, ray_session, fault):
    out = tmp_path / "out"
    cfg = base_config(models, jobworld.write_dataset(tmp_path / "data", 4), out)
    phrases = fault(cfg, models, tmp_path)
    actors_before = sampler_actors()

    assert run(cfg, tmp_path) == 2
    assert_stopped_before_sampling(out, capsys.readouterr().err, *phrases)
    new = {k: a for k, a in sampler_actors().items() if k not in actors_before}
    assert len(new) <= 1 and all(a["NumRestarts"] == 0 for a in new.values())  # no restart loop
    if fault is _declared_class_count:
        assert not new  # found by the driver from the config alone: no actor was started
    assert not models["marker"].exists()  # the pickle was refused, never executed


def test_output_written_with_another_schema_version_is_refused(models, tmp_path, capsys, ray_session):
    out = tmp_path / "out"
    cfg = base_config(models, jobworld.write_dataset(tmp_path / "data", 1), out)
    (out / "votes").mkdir(parents=True)
    old = out / "votes" / "old.parquet"
    pq.write_table(pa.table({"image_id": ["img000"], "schema_version": pa.array([99], pa.int16())}), old)
    content = old.read_bytes()
    assert run(cfg, tmp_path) == 2
    assert_stopped_before_sampling(
        out, capsys.readouterr().err, "schema version 99", "--overwrite", votes_before=("old.parquet",)
    )
    assert old.read_bytes() == content

    old.unlink()
    pq.write_table(pa.table({"image_id": ["img000"]}), out / "votes" / "foreign.parquet")
    assert run(cfg, tmp_path) == 2
    assert_stopped_before_sampling(
        out,
        capsys.readouterr().err,
        "foreign.parquet is not a ray_certseg vote file",
        votes_before=("foreign.parquet",),
    )


@pytest.fixture
def secrets_in_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def test_forbidden_bucket_is_one_clear_error(
    models, tmp_path, capfd, ray_session, secrets_in_env, monkeypatch
):
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")  # moto checks credentials: ours are unknown to it
    manifest = jobworld.write_dataset(tmp_path / "data", 2)
    with start_moto_server() as endpoint:
        so = {"endpoint_url": endpoint, "key": KEY, "secret": SECRET}
        cfg = base_config(models, manifest, tmp_path / "unused")
        cfg.update(output="s3://locked-bucket/run", storage_options=so)
        assert run(cfg, tmp_path) == 2
        captured = capfd.readouterr()
        assert_stopped_before_sampling(
            tmp_path / "unused",
            captured.err + captured.out,
            "access denied to bucket 'locked-bucket'",
            "check the credentials",
        )

        cfg = base_config(models, manifest, tmp_path / "out")
        cfg.update(storage_options=so)
        cfg["dataset"]["manifest"] = "s3://locked-bucket/data/manifest.csv"
        assert run(cfg, tmp_path) == 2
        captured = capfd.readouterr()
        assert_stopped_before_sampling(
            tmp_path / "out", captured.err + captured.out, "access denied to bucket 'locked-bucket'"
        )


def test_unreachable_store_stops_the_job_once(models, tmp_path, capfd, ray_session, secrets_in_env):
    nowhere = {
        "endpoint_url": f"http://127.0.0.1:{free_port()}",
        "key": KEY,
        "secret": SECRET,
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
    }
    manifest = jobworld.write_dataset(tmp_path / "data", 3)
    cfg = base_config(models, manifest, tmp_path / "unused")
    cfg.update(output="s3://results/run", storage_options=nowhere)
    assert run(cfg, tmp_path) == 2
    captured = capfd.readouterr()
    assert_stopped_before_sampling(
        tmp_path / "unused", captured.err + captured.out, "cannot reach the object store for bucket 'results'"
    )

    # the listing is local, the images are in the unreachable store: the actor stops the job on the first
    # image instead of recording one identical error per image
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([lines[0]] + [f"s3://images/{r}" for r in lines[1:]]) + "\n")
    out = tmp_path / "out"
    cfg = base_config(models, manifest, out)
    cfg["dataset"]["storage_options"] = nowhere
    assert run(cfg, tmp_path) == 2
    captured = capfd.readouterr()
    assert_stopped_before_sampling(
        out,
        captured.err + captured.out,
        "sampling stopped: StorageError",
        "cannot reach the object store for bucket 'images'",
        "run again to resume",
    )


# ------------------------------------------------------------------------------------------------- credentials
@pytest.mark.slow
def test_no_credential_in_logs_errors_or_outputs(models, tmp_path, secrets_in_env):
    """The job in its own process and Ray instance (worker logs forwarded to the driver), its dataset in S3
    behind dummy credentials from both storage_options and the environment, one corrupt image so an error is
    recorded: neither secret appears in the captured log, any output file or any Ray log file."""
    import s3fs

    manifest = jobworld.write_dataset(tmp_path / "data", 3, corrupt=(1,))
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Unix socket paths are length-limited
    try:
        with start_moto_server() as endpoint:
            so = {"endpoint_url": endpoint, "key": KEY, "secret": SECRET}
            fs = s3fs.S3FileSystem(**so)
            fs.mkdir("data-bucket")
            fs.put(str(manifest.parent) + "/", "data-bucket/ds/", recursive=True)
            out = tmp_path / "out"
            cfg = base_config(models, Path("unused"), out)
            cfg["dataset"]["manifest"] = "s3://data-bucket/ds/manifest.csv"
            cfg["storage_options"] = so
            path = jobworld.write_config(tmp_path / "job.yaml", cfg)
            env = {
                **os.environ,
                "RAY_TMPDIR": ray_tmp,
                "RAY_AUTH_MODE": "disabled",
                "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                "RAY_USAGE_STATS_ENABLED": "0",
            }
            env.pop("RAY_ADDRESS", None)
            done = subprocess.run(
                [
                    sys.executable,
                    str(REPO / "jobs" / "certify.py"),
                    "--config",
                    str(path),
                    "--progress-interval",
                    "1",
                ],
                env=env,
                capture_output=True,
                timeout=600,
                check=False,
            )
        log = done.stdout + done.stderr
        assert done.returncode == 1, log.decode(errors="replace")[-3000:]  # the corrupt image
        errors = pq.read_table(out / "errors.parquet").to_pylist()
        assert [e["image_id"] for e in errors] == ["img001"] and "s3://data-bucket/ds/img001.png" in errors[
            0
        ]["error"]
        files = [p for p in out.rglob("*") if p.is_file()]
        ray_logs = [p for p in Path(ray_tmp).rglob("*") if p.is_file() and not p.is_socket()]
        assert files and ray_logs and b"img001" in log
        assert SECRET.encode() in path.read_bytes()  # the secret was there to leak (and the search finds it)
        for secret in (KEY, SECRET, ENV_SECRET):
            assert secret.encode() not in log
            for p in files + ray_logs:
                assert secret.encode() not in p.read_bytes(), p
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------ what a new user hit
def test_every_row_failing_prints_the_error_table_and_exits_1(models, tmp_path, capsys, ray_session):
    manifest = jobworld.write_dataset(tmp_path / "data", 2, corrupt=(0, 1))
    out = tmp_path / "out"
    assert run(base_config(models, manifest, out), tmp_path) == 1
    printed = capsys.readouterr().out
    assert "No vote rows to certify. 2 rows failed" in printed
    for image_id in ("img000", "img001"):
        line = next(x for x in printed.splitlines() if x.startswith(f"| {image_id} |"))
        assert "decode_image" in line and "re-download or re-export" in line
    assert pq.read_table(out / "errors.parquet").num_rows == 2


@pytest.mark.parametrize("where", ["a_file", "a_file/below"])
def test_unusable_output_names_output_and_exits_2(models, tmp_path, capsys, where):
    (tmp_path / "a_file").write_text("not a folder")
    cfg = base_config(models, jobworld.write_dataset(tmp_path / "data", 1), tmp_path / where)
    assert run(cfg, tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ray-certseg: error: output: ")
    assert "--output" in err[0] and str(tmp_path / where) in err[0]
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_resize_mode_with_non_integer_factors_is_one_job_error(models, tmp_path, capsys, ray_session):
    out = tmp_path / "out"
    cfg = base_config(models, jobworld.write_dataset(tmp_path / "data", 3), out)
    cfg["models"]["denoisers"]["ddpm"]["resolution"] = "resize"
    cfg["dataset"]["resize"] = [24, 24]  # 24 / sample_size 16 is no integer factor
    actors_before = sampler_actors()
    assert run(cfg, tmp_path) == 2
    assert_stopped_before_sampling(
        out,
        capsys.readouterr().err,
        "models.denoisers.ddpm",
        "images are 24x24",
        "integer multiples of sample_size=16",
    )
    new = {k: a for k, a in sampler_actors().items() if k not in actors_before}
    assert len(new) <= 1 and all(a["NumRestarts"] == 0 for a in new.values())
