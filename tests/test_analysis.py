"""Analysis API, plots and report: unit tests on hand-made votes, and end-to-end on a real job output (a
tiny world from jobworld run through the CLI on local Ray)."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import jobworld
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy.stats import norm

from ray_certseg import analysis, cli, votes
from ray_certseg.certify import ABSTAIN, certify
from ray_certseg.job.rundir import RunDir
from ray_certseg.models.segmenters import Segmenter
from ray_certseg.models.tiny import tiny_segnet
from ray_certseg.results import drawing, plots, reduce, stream
from ray_certseg.sampling import count_votes

ALPHA = 0.1
IGNORE = 255


# ------------------------------------------------------------------------------------------- hand-made votes
def synthetic_rows(seed: int = 0) -> list[dict]:
    """Two 8x8 images x two methods x two sigmas, C = 3, n = 50: labels with an ignored row, a c_hat that
    is mostly right, and vote counts k spread from hopeless to unanimous."""
    rng = np.random.default_rng(seed)
    rows = []
    for image in range(2):
        label = rng.integers(0, 3, (8, 8)).astype(np.uint8)
        label[0] = IGNORE
        for method in ("a", "b"):
            for sigma in (0.25, 0.5):
                c_hat = np.where(rng.random((8, 8)) < 0.8, np.minimum(label, 2), rng.integers(0, 3, (8, 8)))
                k = rng.choice([10, 30, 42, 47, 50], size=(8, 8)).astype(np.uint16)
                rows.append(
                    {
                        "image_id": f"im{image}",
                        "dataset": "syn",
                        "method": method,
                        "denoiser": "",
                        "segmenter": "s",
                        "sigma": sigma,
                        "n0": 5,
                        "n": 50,
                        "seed": 0,
                        "num_classes": 3,
                        "ignore_index": IGNORE,
                        "label": label,
                        "c_hat": c_hat.astype(np.uint8),
                        "k": k,
                        "clean_pred": np.minimum(label, 2),
                        "sample_seconds": 0.1,
                    }
                )
    return rows


@pytest.fixture(scope="module")
def syn_votes(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("syn") / "votes" / "part-0.parquet"
    votes.write_votes(synthetic_rows(), str(path))
    return path.parent


def test_load_votes_gives_zero_copy_read_only_maps_and_filters(syn_votes):
    frame = analysis.load_votes(str(syn_votes))
    assert len(frame) == 8 and set(frame.columns) >= {"image_id", "method", "sigma", "c_hat", "k", "label"}
    expected = {(r["image_id"], r["method"], r["sigma"]): r for r in synthetic_rows()}
    for row in frame.itertuples():
        want = expected[(row.image_id, row.method, row.sigma)]
        np.testing.assert_array_equal(row.k, want["k"])
        np.testing.assert_array_equal(row.c_hat, want["c_hat"])
        assert row.k.shape == (8, 8) and not row.k.flags.writeable and not row.k.flags.owndata
    assert frame["counts"].isna().all()
    only = analysis.load_votes(str(syn_votes), image_ids=["im1"], columns=[])
    assert set(only["image_id"]) == {"im1"} and len(only) == 4 and only["c_hat"].isna().all()
    with pytest.raises(ValueError, match="unknown column"):
        analysis.load_votes(str(syn_votes), columns=["kk"])
    with pytest.raises(FileNotFoundError, match="no vote files"):
        analysis.load_votes(str(syn_votes.parent / "nothing"))


def test_recertify_needs_the_maps_and_valid_parameters(syn_votes):
    with pytest.raises(ValueError, match="c_hat"):
        analysis.recertify(analysis.load_votes(str(syn_votes), columns=[]), tau=0.75, alpha=ALPHA)
    frame = analysis.load_votes(str(syn_votes))
    with pytest.raises(ValueError, match="correction"):
        analysis.recertify(frame, tau=0.75, alpha=ALPHA, correction="sidak")
    with pytest.raises(ValueError, match="tau"):
        analysis.recertify(frame, tau=0.4, alpha=ALPHA)


def oracle_accuracy(rows: list[dict], method: str, sigma: float, radius: float, correction: str) -> float:
    """Certified pixel accuracy counted directly: certified pixels equal to the label / labelled pixels."""
    tau = norm.cdf(radius / sigma)
    correct = labelled = 0
    for r in rows:
        if r["method"] == method and r["sigma"] == sigma:
            cert = certify(
                r["c_hat"], r["k"], n=r["n"], sigma=sigma, tau=tau, alpha=ALPHA, correction=correction
            )
            valid = r["label"] != IGNORE
            correct += int(((cert.labels == r["label"]) & valid).sum())
            labelled += int(valid.sum())
    return correct / labelled


@pytest.mark.parametrize("correction", ["holm", "bonferroni"])
def test_curve_per_sigma_is_certify_at_phi_of_r_over_sigma(syn_votes, correction):
    radii = [0.05, 0.2, 0.4, 0.6, 0.8]
    frame = analysis.load_votes(str(syn_votes))
    curve = analysis.certified_accuracy_curve(
        frame, radii, alpha=ALPHA, correction=correction, per_sigma=True
    )
    rows = synthetic_rows()
    assert len(curve) == 2 * 2 * len(radii)
    for c in curve.itertuples():
        assert c.tau == pytest.approx(norm.cdf(c.radius / c.sigma))
        want = oracle_accuracy(rows, c.method, c.sigma, c.radius, correction)
        assert c.certified_accuracy == pytest.approx(want)
    # a larger radius needs a larger tau: never more certified pixels
    for _, g in curve.groupby(["method", "sigma"]):
        assert (np.diff(g.sort_values("radius")["certified_accuracy"]) <= 1e-12).all()
    assert curve["certified_accuracy"].max() > 0  # the test data certify something
    # the path form, file by file, gives the same numbers
    pd.testing.assert_frame_equal(
        curve,
        analysis.certified_accuracy_curve(
            str(syn_votes), radii, alpha=ALPHA, correction=correction, per_sigma=True, engine="local"
        ),
    )


def test_envelope_is_the_max_over_sigma_and_zero_where_nothing_certifies(syn_votes):
    radii = [0.1, 0.3, 5.0]  # 5.0: tau = Phi(r / sigma) rounds to 1 for both sigmas: nothing can certify it
    frame = analysis.load_votes(str(syn_votes))
    per_sigma = analysis.certified_accuracy_curve(frame, radii, alpha=ALPHA, per_sigma=True)
    env = analysis.certified_accuracy_curve(frame, radii, alpha=ALPHA)
    assert len(env) == 2 * len(radii)
    for e in env.itertuples():
        options = per_sigma[(per_sigma["method"] == e.method) & (per_sigma["radius"] == e.radius)]
        best = options["certified_accuracy"].max() if len(options) else 0.0
        assert e.certified_accuracy == pytest.approx(best)
    far = env[env["radius"] == 5.0]
    assert (far["certified_accuracy"] == 0).all() and far["sigma"].isna().all()
    assert (env[env["radius"] == 0.1]["certified_accuracy"] > 0).all()
    with pytest.raises(ValueError, match="radii must be"):
        analysis.certified_accuracy_curve(frame, [0.0, 0.1])
    with pytest.raises(ValueError, match="correction"):
        analysis.certified_accuracy_curve(frame, [0.1], correction="bh")


def test_envelope_fills_radii_no_sigma_can_certify():
    curve = pd.DataFrame(
        {
            "dataset": ["d"],
            "method": ["m"],
            "sigma": [0.25],
            "radius": [0.1],
            "tau": [0.65],
            "certified_accuracy": [0.4],
            "miou": [0.3],
            "abstain_rate": [0.5],
            "images": [1],
        }
    )
    env = analysis.envelope(curve, [0.1, 9.0])
    assert env["certified_accuracy"].tolist() == [0.4, 0.0]
    assert env["sigma"].iloc[0] == 0.25 and np.isnan(env["sigma"].iloc[1])


def test_radius_grid_ends_where_n_samples_stop_certifying():
    grid = analysis.radius_grid([0.25, 0.5], n=100, alpha=0.001, num_pixels=4096, points=10)
    tau_max = (0.001 / 4096) ** (1 / 100)
    assert grid[-1] == pytest.approx(0.5 * norm.ppf(tau_max)) and len(grid) == 10 and grid[0] > 0
    # at tau just above tau_max even a unanimous pixel (k = n) is not certified; just below it is
    k = np.full((64, 64), 100, np.uint16)
    c = np.zeros((64, 64), np.uint8)
    assert certify(c, k, n=100, sigma=0.5, tau=tau_max * 1.0001, alpha=0.001).num_certified == 0
    assert certify(c, k, n=100, sigma=0.5, tau=tau_max * 0.9999, alpha=0.001).num_certified == 4096


def test_noisy_sample_is_the_jobs_estimation_draw():
    """f(noisy_sample(index=j)) are exactly the job's estimation votes (counts of draws 0 and 1)."""
    torch.manual_seed(0)
    seg = Segmenter(tiny_segnet(3, width=8), num_classes=3).eval()
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    v = count_votes(
        image,
        seg,
        sigma=0.5,
        n0=1,
        n=2,
        num_classes=3,
        batch_size=2,
        seed=5,
        image_id="x",
        return_counts=True,
    )
    with torch.inference_mode():
        samples = [analysis.noisy_sample(image, sigma=0.5, seed=5, image_id="x", index=j) for j in (0, 1)]
        labels = [seg(s[None])[0].argmax(0) for s in samples]
    onehot = sum(torch.nn.functional.one_hot(lab, 3).permute(2, 0, 1).numpy() for lab in labels)
    np.testing.assert_array_equal(onehot, v.counts)
    first, second = (analysis.noisy_sample(image, sigma=0.5, seed=5, image_id="x", index=j) for j in (0, 1))
    assert not torch.equal(first, second)


def test_votes_and_metrics_load_from_s3_like_local(syn_votes, monkeypatch):
    """load_votes / load_metrics / the curve on an object store (moto's S3 server on loopback)."""
    s3fs = pytest.importorskip("s3fs")
    from s3server import start_moto_server

    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    local = analysis.load_votes(str(syn_votes))
    result = analysis.recertify(local, tau=0.75, alpha=ALPHA)
    with start_moto_server() as endpoint:
        opts = {"endpoint_url": endpoint}
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir("out-bucket")
        fs.put(str(syn_votes / "part-0.parquet"), "out-bucket/run/votes/part-0.parquet")
        reduce.write_metrics(
            RunDir("s3://out-bucket/run", opts), result.per_image, result.metrics, result.summary_markdown
        )
        remote = analysis.load_votes("s3://out-bucket/run", storage_options=opts)
        pd.testing.assert_frame_equal(
            analysis.recertify(remote, tau=0.75, alpha=ALPHA).metrics,
            analysis.load_metrics("s3://out-bucket/run", storage_options=opts),
        )
        curve = analysis.certified_accuracy_curve(
            "s3://out-bucket/run", [0.1, 0.3], alpha=ALPHA, storage_options=opts, engine="local"
        )
    pd.testing.assert_frame_equal(
        remote.drop(columns=list(votes.ARRAY_COLUMNS)), local.drop(columns=list(votes.ARRAY_COLUMNS))
    )
    pd.testing.assert_frame_equal(curve, analysis.certified_accuracy_curve(local, [0.1, 0.3], alpha=ALPHA))


def test_colourize_marks_abstain_white_and_ignore_black():
    rgb = drawing.colourize(np.array([[0, 1, ABSTAIN, IGNORE]]), 3, IGNORE)
    np.testing.assert_array_equal(rgb[0, 2], [1, 1, 1])
    np.testing.assert_array_equal(rgb[0, 3], [0, 0, 0])
    assert not np.allclose(rgb[0, 0], rgb[0, 1])


# ------------------------------------------------------------------------------------------ a real job output
@pytest.fixture(scope="module")
def job(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("job")
    manifest = jobworld.write_dataset(root / "data", 5, corrupt=(3,))
    cfg = jobworld.config(manifest, jobworld.write_models(root / "models"), root / "out", n=40)
    path = jobworld.write_config(root / "job.yaml", cfg)
    code = cli.main(["run", "--config", str(path), "--progress-interval", "0"])
    return {"code": code, "out": root / "out", "config": path}


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.slow
@pytest.mark.ray
def test_job_writes_plots_and_the_report_embeds_them(job):
    out = job["out"]
    assert job["code"] == 1  # the corrupt image: the job reports it, everything else is there
    for name in ("certified_accuracy.png", "certified_accuracy_per_sigma.png", "iou_per_class.png"):
        pixels = png(out / "plots" / name)
        assert pixels.shape[0] > 200 and pixels.std() > 10  # a drawn figure, not a blank canvas
    assert sorted(p.name for p in (out / "plots" / "examples").glob("*.png")) == [
        "img000.png",
        "img001.png",
        "img002.png",
    ]
    strip = png(out / "plots" / "examples" / "img000.png")
    assert strip.shape[0] > 4 * 100  # one row per (method, sigma): 4 rows
    csv = pd.read_csv(out / "plots" / "certified_accuracy.csv")
    assert set(csv["method"]) == {"plain", "diffusion"} and set(csv["sigma"]) == {0.25, 0.5}

    assert cli.main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "plots/certified_accuracy.png" in links and "plots/examples/img001.png" in links
    assert all(not Path(link).is_absolute() and (out / link).is_file() for link in links)
    metrics = analysis.load_metrics(str(out))
    for row in metrics.itertuples():
        assert f"| {row.dataset} | {row.method} | {row.sigma} | {row.correction} |" in text
    assert "img003" in text.split("## Failed rows")[1]


@pytest.mark.slow
@pytest.mark.ray
def test_recertify_gives_the_reducers_numbers(job, tmp_path):
    out = job["out"]
    frame = analysis.load_votes(str(out))
    cfg = analysis.load_config(str(out))
    same = analysis.recertify(
        frame, tau=cfg.certify.taus, alpha=cfg.certify.alphas, correction=cfg.certify.corrections
    )
    pd.testing.assert_frame_equal(same.metrics, analysis.load_metrics(str(out)))
    pd.testing.assert_frame_equal(same.per_image, analysis.load_metrics(str(out), per_image=True))
    assert same.metrics["certified_accuracy"].max() > 0
    # another grid: the reducer re-run on a copy of the output
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    result = reduce.reduce_output(str(copy), taus=[0.55, 0.7], alphas=[0.2], engine="local")
    other = analysis.recertify(frame, tau=[0.55, 0.7], alpha=0.2, correction=["holm", "bonferroni"])
    pd.testing.assert_frame_equal(other.metrics, result.metrics)
    pd.testing.assert_frame_equal(other.metrics, analysis.load_metrics(str(copy)))
    # the report of the re-reduced output redraws the plots at the new grid (same correction as the run)
    assert plots.plotted_grid_point(str(copy)) == (0.6, ALPHA, "holm")
    assert cli.main(["report", str(copy)]) == 0
    assert plots.plotted_grid_point(str(copy)) == (0.55, 0.2, "holm")
    assert "at tau = 0.55, alpha = 0.2, holm" in (copy / "report.md").read_text()
    # a lower tau at a larger alpha certifies at least as many pixels, here strictly more somewhere
    key = ["method", "sigma", "correction"]
    low = other.metrics[other.metrics["tau"] == 0.55].set_index(key)["certified_accuracy"]
    run = same.metrics.set_index(key)["certified_accuracy"]
    assert (low >= run - 1e-12).all() and (low > run).any()


@pytest.mark.slow
@pytest.mark.ray
def test_curve_at_the_runs_radius_matches_the_metrics_and_engines_agree(job):
    out = str(job["out"])
    metrics = analysis.load_metrics(out)
    holm = metrics[metrics["correction"] == "holm"].set_index(["method", "sigma"])
    radii = sorted({s * norm.ppf(0.6) for s in (0.25, 0.5)} | {0.02, 0.3})
    local = analysis.certified_accuracy_curve(out, radii, alpha=ALPHA, per_sigma=True, engine="local")
    for c in local.itertuples():
        if np.isclose(c.radius, c.sigma * norm.ppf(0.6)):
            assert c.certified_accuracy == pytest.approx(holm.loc[(c.method, c.sigma), "certified_accuracy"])
    on_ray = analysis.certified_accuracy_curve(out, radii, alpha=ALPHA, per_sigma=True, engine="ray")
    pd.testing.assert_frame_equal(on_ray, local)
    in_memory = analysis.certified_accuracy_curve(
        analysis.load_votes(out), radii, alpha=ALPHA, per_sigma=True
    )
    pd.testing.assert_frame_equal(in_memory, local)


@pytest.mark.slow
@pytest.mark.ray
def test_a_plotting_failure_never_fails_the_job(job, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no display today")

    monkeypatch.setattr(plots, "write_plots", broken)
    with caplog.at_level(logging.WARNING, logger="ray_certseg"):
        code = cli.main(["run", "--config", str(job["config"]), "--progress-interval", "0"])
    assert code == job["code"]  # the same outcome as the first run (the corrupt image), no new failure
    assert any(
        "plots not written" in r.getMessage() and "no display today" in r.getMessage() for r in caplog.records
    )
    assert (job["out"] / "metrics" / "metrics.parquet").exists()


class MapReads:
    """Spy on ``votes.read_votes``: the number of vote rows each call decodes maps for."""

    def __init__(self, monkeypatch):
        self.rows: list[int] = []
        real = votes.read_votes

        def spy(source, **kwargs):
            out = real(source, **kwargs)
            if kwargs.get("columns") is None or list(kwargs["columns"]):
                self.rows.append(len(out))
            return out

        monkeypatch.setattr(votes, "read_votes", spy)


@pytest.mark.slow
@pytest.mark.ray
def test_plots_and_report_read_the_votes_a_chunk_or_one_strip_at_a_time(job, monkeypatch):
    """Every reader of stored votes takes the chunked path: with chunks of one vote row, drawing every plot
    again and writing the report decode the maps of at most one image's rows at once (an example strip: 2
    methods x 2 sigmas), never the run's 16 rows."""
    monkeypatch.setattr(stream, "CHUNK_BYTES", 1)  # one vote row per chunk
    reads = MapReads(monkeypatch)
    assert cli.main(["report", str(job["out"]), "--replot"]) == 0
    assert reads.rows and max(reads.rows) <= 4
    assert sum(n == 1 for n in reads.rows) >= 16  # the curves went through the vote rows one at a time
