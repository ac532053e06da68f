"""The Ray job end to end on a real local Ray instance: votes exactly once, determinism against an in-process
run, resume, per-image errors, and the reducer (Ray and local engines, byte-identical reruns)."""

from __future__ import annotations

import collections
import itertools
import json
import shutil
from pathlib import Path

import jobworld
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ray_certseg import analysis, cli, votes
from ray_certseg.config import JobConfig
from ray_certseg.job import output
from ray_certseg.job.sampler import CALLS_PER_ACTOR, VoteSampler
from ray_certseg.results import reduce

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return {
        "manifest": jobworld.write_dataset(root / "data", 5, corrupt=(3,)),
        "models": jobworld.write_models(root / "models"),
        "root": root,
    }


def run(world, tmp_path, name="out", extra=(), **sampling):
    out = tmp_path / name
    cfg = jobworld.config(world["manifest"], world["models"], out, **sampling)
    path = jobworld.write_config(tmp_path / f"{name}.yaml", cfg)
    code = cli.main(["run", "--config", str(path), "--progress-interval", "0.5", *extra])
    return code, out, path


def keys(out: Path) -> list[tuple[str, str, float]]:
    t = pq.read_table(out / "votes", columns=["image_id", "method", "sigma"])
    return list(zip(t["image_id"].to_pylist(), t["method"].to_pylist(), t["sigma"].to_pylist()))


def test_job_writes_every_row_once_records_errors_and_metrics(world, tmp_path, ray_session):
    code, out, _ = run(world, tmp_path)
    assert code == 1  # one corrupt image: the job says so, the others are all there
    got = keys(out)
    good = [f"img{i:03d}" for i in (0, 1, 2, 4)]
    expected = {(i, m, s) for i in good for m in ("plain", "diffusion") for s in (0.25, 0.5)}
    assert collections.Counter(got) == collections.Counter(expected)
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert {e["image_id"] for e in errors} == {"img003"} and errors[0]["stage"] == "load"
    assert "img003" in errors[0]["error"]
    metrics = pq.read_table(out / "metrics" / "metrics.parquet").to_pandas()
    assert len(metrics) == 2 * 2 * 2  # methods x sigmas x corrections
    assert set(metrics["images"]) == {4}
    assert (out / "metrics" / "metrics.csv").exists() and (out / "metrics" / "summary.md").exists()
    holm = metrics.set_index(["method", "sigma", "correction"])["certified_accuracy"]
    for m in ("plain", "diffusion"):
        for s in (0.25, 0.5):
            assert holm[(m, s, "holm")] >= holm[(m, s, "bonferroni")]


def test_votes_match_an_in_process_sequential_run(world, tmp_path, ray_session):
    """Deterministic: the Ray job's votes equal count_votes called here, image by image, same seeds, whatever
    the grouping (3 images per Ray batch, vote files of at least 3 rows)."""
    from ray_certseg.data import load_item
    from ray_certseg.models.registry import load_denoiser, load_segmenter
    from ray_certseg.sampling import count_votes

    grouping = ["ray.batch_size=3", "ray.rows_per_file=3", "sampling.batch_size=5"]
    code, out, path = run(world, tmp_path, extra=[a for g in grouping for a in ("--set", g)])
    assert code == 1  # the corrupt image
    from ray_certseg.config import load_config

    cfg = load_config(path, grouping)
    assert len(list((out / "votes").glob("*.parquet"))) < 16  # rows coalesced: fewer files than rows
    seg = load_segmenter(cfg.models.segmenters["seg"])
    den = load_denoiser(cfg.models.denoisers["ddpm"])
    records = votes.read_votes(str(out / "votes"))
    assert len(records) == 16
    for rec in records:
        item = load_item(
            {
                "image_id": rec.image_id,
                "image_path": str(world["root"] / "data" / f"img{rec.image_id[3:]}.png"),
                "label_path": str(world["root"] / "data" / f"lab{rec.image_id[3:]}.png"),
                "dataset": "toy",
            },
            cfg.dataset,
        )
        v = count_votes(
            item["image"],
            seg,
            denoiser=den if rec.method == "diffusion" else None,
            sigma=rec.sigma,
            n0=3,
            n=12,
            num_classes=3,
            batch_size=12,
            seed=7,
            image_id=rec.image_id,
        )
        np.testing.assert_array_equal(v.c_hat, rec.c_hat)
        np.testing.assert_array_equal(v.k, rec.k)
        np.testing.assert_array_equal(v.clean_pred, rec.clean_pred)
        np.testing.assert_array_equal(item["label"], rec.label)


def test_a_finished_rerun_redoes_nothing_until_its_inputs_change(world, tmp_path, ray_session, caplog):
    """Every row written, metrics and plots made from these votes and this config: a rerun certifies and plots
    nothing and prints the stored table. Another grid, or missing plots, and it does both again."""
    code, out, path = run(world, tmp_path, extra=["--set", "dataset.limit=2"])
    assert code == 0 and (out / "metrics" / "inputs.json").exists()
    made = lambda: {p.name: p.stat().st_mtime_ns for p in [*(out / "metrics").iterdir(), out / "plots"]}
    before = made()
    args = ["run", "--config", str(path), "--set", "dataset.limit=2"]
    with caplog.at_level("INFO", logger="ray_certseg"):
        assert cli.main(args) == 0
    assert "up to date with votes/ and the config" in caplog.text
    assert made() == before
    caplog.clear()
    with caplog.at_level("INFO", logger="ray_certseg"):
        assert cli.main([*args, "--set", "certify.taus=[0.7]"]) == 0
    assert "up to date" not in caplog.text
    assert set(pq.read_table(out / "metrics" / "metrics.parquet")["tau"].to_pylist()) == {0.7}
    shutil.rmtree(out / "plots")
    caplog.clear()
    with caplog.at_level("INFO", logger="ray_certseg"):
        assert cli.main([*args, "--set", "certify.taus=[0.7]"]) == 0
    assert "up to date" not in caplog.text and any((out / "plots").rglob("*.png"))


def test_resume_samples_only_missing_rows_and_sets_partial_files_aside(world, tmp_path, ray_session):
    code, out, path = run(world, tmp_path, extra=["--set", "dataset.limit=2"])
    assert code == 0 and len(keys(out)) == 2 * 4
    first_files = sorted(p.name for p in (out / "votes").glob("*.parquet"))
    # a run killed while writing leaves a truncated file: it must be set aside and its rows redone
    victim = out / "votes" / first_files[0]
    lost = set(keys_of(victim))
    victim.write_bytes(victim.read_bytes()[:100])
    code = cli.main(["run", "--config", str(path)])
    assert code == 1  # the corrupt image 3 is now in scope
    got = keys(out)
    assert len(got) == len(set(got)) == 4 * 4
    assert (out / "_partial" / (first_files[0] + ".partial")).exists()
    for f in first_files[1:]:  # finished files are kept, not rewritten
        assert (out / "votes" / f).exists()
    assert lost <= set(got)


def keys_of(path: Path):
    t = pq.read_table(path, columns=["image_id", "method", "sigma"])
    return zip(t["image_id"].to_pylist(), t["method"].to_pylist(), t["sigma"].to_pylist())


def test_resume_refuses_an_output_made_with_another_config(world, tmp_path, ray_session):
    code, out, path = run(world, tmp_path, extra=["--set", "dataset.limit=1"])
    assert code == 0
    assert cli.main(["run", "--config", str(path), "--set", "dataset.limit=1", "--set", "sampling.n=13"]) == 2
    assert (
        cli.main(
            [
                "run",
                "--config",
                str(path),
                "--set",
                "dataset.limit=1",
                "--set",
                "sampling.n=13",
                "--overwrite",
            ]
        )
        == 0
    )
    assert {r.n for r in votes.read_votes(str(out / "votes"), columns=[])} == {13}


def test_reducer_is_deterministic_and_engines_agree(world, tmp_path, ray_session):
    code, out, _ = run(world, tmp_path, extra=["--set", "dataset.limit=2"])
    assert code == 0
    files = ["per_image.parquet", "metrics.parquet", "metrics.csv", "summary.md"]
    first = {f: (out / "metrics" / f).read_bytes() for f in files}
    reduce.reduce_output(str(out), engine="local")
    assert {f: (out / "metrics" / f).read_bytes() for f in files} == first
    reduce.reduce_output(str(out), engine="ray")
    assert {f: (out / "metrics" / f).read_bytes() for f in files} == first


def test_reduce_cli_recertifies_at_another_tau(world, tmp_path, ray_session):
    code, out, _ = run(world, tmp_path, extra=["--set", "dataset.limit=2"])
    assert code == 0
    before = pq.read_table(out / "metrics" / "metrics.parquet").to_pandas()
    own = (out / "metrics" / "metrics.parquet").read_bytes()
    assert cli.main(["reduce", str(out), "--tau", "0.9", "--alpha", "0.1"]) == 0
    assert (out / "metrics" / "metrics.parquet").read_bytes() == own  # the run's own rows stay
    (folder,) = (out / "reductions").iterdir()
    assert folder.name.startswith("tau0.9_alpha0.1_holm-bonferroni_")  # then the grid's short hash
    after = pq.read_table(folder / "metrics.parquet").to_pandas()
    pd.testing.assert_frame_equal(after, analysis.load_metrics(str(folder)))
    assert set(after["tau"]) == {0.9}
    assert (after["radius"] > before["radius"].max()).all()
    # a higher tau can only certify fewer pixels
    b = before.set_index(["method", "sigma", "correction"])["certified_accuracy"]
    a = after.set_index(["method", "sigma", "correction"])["certified_accuracy"]
    assert (a <= b + 1e-12).all()


def test_check_resumable_names_what_changed():
    cfg = JobConfig.from_dict(
        jobworld.config(Path("m.csv"), {"seg": Path("s"), "ddpm": Path("d")}, Path("o"))
    )
    old = cfg.to_dict()
    new = json.loads(json.dumps(old))
    new["models"]["denoisers"]["ddpm"]["path"] = "other"
    with pytest.raises(ValueError, match="models.denoisers.ddpm"):
        output.check_resumable(old, new)
    new = json.loads(json.dumps(old))
    new["sampling"]["sigmas"] = [0.25, 0.5, 1.0]  # more sigmas: resumable, only the new rows are sampled
    output.check_resumable(old, new)


@pytest.mark.parametrize(
    "key, value",
    [
        ("n0", 4),
        ("n", 7),
        ("seed", 1),
        ("dtype", "bfloat16"),
        ("device", "cuda"),
        ("compile", True),
        ("channels_last", True),
    ],
)
def test_check_resumable_refuses_keys_that_change_votes(key, value):
    cfg = JobConfig.from_dict(
        jobworld.config(Path("m.csv"), {"seg": Path("s"), "ddpm": Path("d")}, Path("o"))
    )
    old = cfg.to_dict()
    new = json.loads(json.dumps(old))
    new["sampling"][key] = value
    with pytest.raises(ValueError, match=f"sampling.{key}"):
        output.check_resumable(old, new)
    from ray_certseg.config import SamplingConfig

    del old["sampling"][key]  # a config.json from before the key existed means its default
    new["sampling"][key] = SamplingConfig.model_fields[key].default
    output.check_resumable(old, new)


def test_check_resumable_allows_batch_size_with_a_warning(caplog):
    cfg = JobConfig.from_dict(
        jobworld.config(Path("m.csv"), {"seg": Path("s"), "ddpm": Path("d")}, Path("o"))
    )
    old = cfg.to_dict()
    new = json.loads(json.dumps(old))
    new["sampling"]["batch_size"] = old["sampling"]["batch_size"] + 3
    new["sampling"]["store_counts"] = not old["sampling"]["store_counts"]
    with caplog.at_level("WARNING", logger="ray_certseg"):
        output.check_resumable(old, new)
    assert "sampling.batch_size changed" in caplog.text and "store_counts" not in caplog.text


def test_votes_bit_identical_across_batch_sizes_with_the_job_models(world):
    """The decision above: on the CPU in float32, a real segmenter and diffusion denoiser give the same votes
    at any batch_size, so a resume after a batch_size change mixes no incomparable rows there."""
    from ray_certseg.models.registry import load_denoiser, load_segmenter
    from ray_certseg.sampling import count_votes

    cfg = JobConfig.from_dict(jobworld.config(world["manifest"], world["models"], world["root"] / "o"))
    seg = load_segmenter(cfg.models.segmenters[cfg.methods["diffusion"].segmenter])
    den = load_denoiser(cfg.models.denoisers[cfg.methods["diffusion"].denoiser])
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    runs = [
        count_votes(
            image,
            seg,
            denoiser=den,
            sigma=0.25,
            n0=2,
            n=9,
            num_classes=cfg.dataset.num_classes,
            batch_size=b,
            seed=3,
            image_id="x",
            return_counts=True,
        )
        for b in (1, 4, 11)
    ]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.counts, runs[0].counts)
        np.testing.assert_array_equal(other.counts0, runs[0].counts0)


def test_reduce_cli_takes_lists_and_names_its_folder(world, tmp_path, ray_session):
    code, out, _ = run(world, tmp_path, extra=["--set", "dataset.limit=1"])
    assert code == 0
    assert (
        cli.main(
            [
                "reduce",
                str(out),
                "--tau",
                "0.6",
                "0.9",
                "--alpha",
                "0.1",
                "0.2",
                "--correction",
                "holm",
                "--name",
                "sweep",
            ]
        )
        == 0
    )
    sweep = analysis.load_metrics(str(out / "reductions" / "sweep"))
    assert set(zip(sweep["tau"], sweep["alpha"])) == {(0.6, 0.1), (0.6, 0.2), (0.9, 0.1), (0.9, 0.2)}
    assert set(sweep["correction"]) == {"holm"}
    assert cli.main(["reduce", str(out), "--tau", "0.9", "--replace-metrics"]) == 0
    assert set(analysis.load_metrics(str(out))["tau"]) == {0.9}


def test_check_resumable_reads_an_older_run_that_wrote_dataset_scale():
    cfg = JobConfig.from_dict(
        jobworld.config(Path("m.csv"), {"seg": Path("s"), "ddpm": Path("d")}, Path("o"))
    )
    old, new = cfg.to_dict(), cfg.to_dict()
    old["dataset"]["scale"] = old["dataset"].pop("certify_at_scale")
    output.check_resumable(old, new)
    old["dataset"]["scale"] = 0.5
    with pytest.raises(ValueError, match="dataset"):
        output.check_resumable(old, new)


def test_actor_calls_decode_while_another_samples_and_never_sample_at_once(world, tmp_path, monkeypatch):
    """Ray runs CALLS_PER_ACTOR calls of one actor at once, in threads: their sampling never overlaps (the
    actor's device lock), one call reads and decodes while the other samples, and a corrupt image (item 3) is
    still recorded as its own error while every other image gets its row."""
    import threading
    import time

    from ray_certseg import data

    assert CALLS_PER_ACTOR == 2
    cfg = JobConfig.from_dict(jobworld.config(world["manifest"], world["models"], tmp_path / "o"))
    sampler = VoteSampler(cfg.to_dict(redact=False))
    refs = data.list_items(cfg.dataset)

    def batch(part):
        columns = {k: np.array([r[k] for r in part]) for k in part[0]}
        return {**columns, "todo": np.array([json.dumps([["plain", 0.25]])] * len(part))}

    spans: list[tuple[str, str, float, float]] = []  # (what, image id, start, end)
    real_load, real_sample = data.load_item, sampler._sample

    def load(ref, dataset_cfg):
        start = time.perf_counter()
        time.sleep(0.2)  # a slow read: the overlaps below are not an accident of timing
        try:
            return real_load(ref, dataset_cfg)
        finally:
            spans.append(("load", ref["image_id"], start, time.perf_counter()))

    def sample(item, method, sigma):
        start = time.perf_counter()
        time.sleep(0.1)
        record = real_sample(item, method, sigma)
        spans.append(("sample", item["image_id"], start, time.perf_counter()))
        return record

    monkeypatch.setattr(data, "load_item", load)
    monkeypatch.setattr(sampler, "_sample", sample)
    tables = []
    calls = [
        threading.Thread(target=lambda b=b: tables.append(sampler(b)))
        for b in (batch(refs[:3]), batch(refs[3:]))
    ]
    for call in calls:
        call.start()
    for call in calls:
        call.join(timeout=120)
    ids = [r["image_id"] for r in refs]
    assert sorted(i for t in tables for i in t["image_id"].to_pylist()) == sorted(ids[:3] + ids[4:])
    assert len(list((tmp_path / "o" / "_errors").glob("*.parquet"))) == 1
    samples = sorted((start, end) for what, _, start, end in spans if what == "sample")
    assert all(end <= following for (_, end), (following, _) in itertools.pairwise(samples))  # one at a time
    call_of = {i: 0 if i in ids[:3] else 1 for i in ids}
    overlapping = [
        (loaded, sampled)
        for w1, loaded, l0, l1 in spans
        for w2, sampled, s0, s1 in spans
        if w1 == "load" and w2 == "sample" and call_of[loaded] != call_of[sampled] and l0 < s1 and s0 < l1
    ]
    assert overlapping  # a call decoded while the other one sampled


@pytest.mark.parametrize(("tile_pixels", "per_call"), [("auto", 8), (3 * 16 * 16, 3)])
def test_actor_sets_the_tile_batches_of_a_tile_mode_denoiser_once(world, tmp_path, tile_pixels, per_call):
    """sampling.tile_pixels reaches a tile-mode denoiser before any image: an integer as given; auto on the
    CPU keeps one tile position of every sample (batch_size = 8) per network call."""
    cfg = jobworld.config(world["manifest"], world["models"], tmp_path / "o", tile_pixels=tile_pixels)
    cfg["models"]["denoisers"]["ddpm"].update(resolution="tile", tile_overlap=4)
    sampler = VoteSampler(JobConfig.from_dict(cfg).to_dict(redact=False))
    denoiser = sampler.denoisers["ddpm"]
    assert denoiser.sample_size == 16 and denoiser.tiles_per_call(8) == per_call


def test_tile_pixels_must_be_a_positive_integer_or_auto(world, tmp_path):
    from ray_certseg.config import ConfigError

    cfg = jobworld.config(world["manifest"], world["models"], tmp_path / "o", tile_pixels=0)
    with pytest.raises(ConfigError, match="sampling.tile_pixels"):
        JobConfig.from_dict(cfg)


def test_a_failed_row_logs_its_own_traceback(world, tmp_path, monkeypatch, caplog):
    """The debug log of a failed (image, method, sigma) row holds that exception's traceback (it is written
    after the except block, where ``traceback.format_exc()`` would say 'NoneType: None')."""
    import logging

    from ray_certseg import data

    cfg = JobConfig.from_dict(jobworld.config(world["manifest"], world["models"], tmp_path / "o"))
    sampler = VoteSampler(cfg.to_dict(redact=False))
    ref = data.list_items(cfg.dataset)[0]

    def broken_sample(item, method, sigma):
        raise RuntimeError("out of device memory, say")

    monkeypatch.setattr(sampler, "_sample", broken_sample)
    batch = {k: np.array([ref[k]]) for k in ref} | {"todo": np.array([json.dumps([["plain", 0.25]])])}
    with caplog.at_level(logging.DEBUG, logger="ray_certseg"):
        assert sampler(batch).num_rows == 0
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    assert "Traceback" in text and "broken_sample" in text and "out of device memory" in text
    assert "NoneType: None" not in text


def test_overwrite_refuses_a_folder_that_is_not_a_run_and_deletes_nothing(world, tmp_path, capsys):
    """``--output ~/data --overwrite`` by a slip: a non-empty folder without config.json or votes/ is refused
    with one line and exit 2, before Ray, and every file in it stays."""
    data = tmp_path / "out"
    (data / "photos").mkdir(parents=True)
    (data / "photos" / "holiday.jpg").write_bytes(b"precious")
    (data / "notes.txt").write_text("keep me")
    code, _, _ = run(world, tmp_path, extra=["--overwrite"])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "neither a run folder" in err[0] and "nothing was removed" in err[0]
    assert (data / "photos" / "holiday.jpg").read_bytes() == b"precious"
    assert (data / "notes.txt").read_text() == "keep me"
    assert not (data / "config.json").exists()


def test_overwrite_may_remove_a_run_folder_or_an_empty_one(world, tmp_path):
    """What --overwrite may remove: a folder with config.json (a run's, even without votes yet), one with
    votes/, and an empty one; the check itself runs before anything is written."""
    cfg = JobConfig.from_dict(jobworld.config(world["manifest"], world["models"], tmp_path / "out"))
    out = tmp_path / "out"
    for marker in ("config.json", "votes", None):
        out.mkdir()
        if marker == "config.json":
            (out / marker).write_text("{}")
        elif marker == "votes":
            (out / marker).mkdir()
        if marker is not None:
            (out / "leftover.txt").write_text("from an earlier run")
        output.prepare_output(cfg, overwrite=True)
        assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # removed, then this run's config
        shutil.rmtree(out)


@pytest.mark.parametrize("recorded", [{"dataset": {}, "methods": {}}, ["not", "a", "config"], {}])
def test_resume_into_a_foreign_or_old_config_json_names_the_problem(recorded):
    """A config.json without the sections resuming compares (here: no models) is one clear sentence naming
    what is missing and the fix, not ``error: 'models'``."""
    cfg = JobConfig.from_dict(
        jobworld.config(Path("m.csv"), {"seg": Path("s"), "ddpm": Path("d")}, Path("o"))
    )
    with pytest.raises(ValueError, match=r"config.json lacks .*models.*--overwrite to start over"):
        output.check_resumable(recorded, cfg.to_dict())


def test_progress_counts_rows_before_the_first_vote_file_lands(world, tmp_path, ray_session):
    """A piped run's progress line counts rows as the actors finish them (a RowCounter actor), not as vote
    files land: with every image in one Ray batch (one file at the end), a line with rows > 0 is logged while
    votes/ still holds no file."""
    import logging
    import re

    seen: list[tuple[int, int]] = []  # (rows in the line, vote files at that moment)
    out = tmp_path / "out"

    class Snapshot(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            match = re.match(r"progress: (\d+)/", record.getMessage())
            if match:
                files = list((out / "votes").glob("*.parquet")) if (out / "votes").exists() else []
                seen.append((int(match.group(1)), len(files)))

    handler, logger = Snapshot(), logging.getLogger("ray_certseg")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        code, _, _ = run(
            world,
            tmp_path,
            extra=["--set", "ray.batch_size=3", "--set", "dataset.limit=3", "--progress-interval", "0.2"],
            n=60,  # about a second per image here: several lines while the one batch samples
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert code == 0
    assert any(rows > 0 and files == 0 for rows, files in seen), seen
    assert all(rows <= 12 for rows, _ in seen)  # 3 images x 2 methods x 2 sigmas (the world's 4th is corrupt)
