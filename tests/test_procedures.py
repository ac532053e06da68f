"""The certification-procedure interface: SegCertify is one procedure among others, and a procedure defined in
this file alone (a fixed vote threshold; a toy without error control) gets its rows through the config, the
reducer (in process and as a Ray stage is the same code: certify_table), ``reduce`` of the CLI and recertify."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ray_certseg import analysis, certify, votes
from ray_certseg.config import ConfigError, JobConfig
from ray_certseg.results import image_records, reduce

REPO = Path(__file__).resolve().parent.parent


class ThresholdParams(certify.Params):
    min_votes: int


def certify_threshold(rec, p: ThresholdParams) -> certify.CertifiedMap:
    """c_hat where k >= min_votes, abstain elsewhere; the radius of tau = 0.75 (a toy claim)."""
    labels = np.where(rec.k >= p.min_votes, rec.c_hat.astype(np.int16), certify.ABSTAIN)
    return certify.CertifiedMap(labels, certify.radius(rec.sigma, 0.75))


THRESHOLD = certify.Procedure("toy-threshold", ThresholdParams, certify_threshold)
THIS = f"{Path(__file__).stem}:THRESHOLD"  # the procedure by import path (tests/ is on sys.path)


def record(image_id: str, seed: int, n: int = 40) -> votes.VoteRecord:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, (4, 4)).astype(np.uint8)
    c_hat = np.where(rng.random((4, 4)) < 0.7, label, rng.integers(0, 3, (4, 4))).astype(np.uint8)
    return votes.VoteRecord(
        image_id=image_id,
        dataset="toy",
        method="m",
        denoiser="",
        segmenter="s",
        sigma=0.25,
        n0=2,
        n=n,
        seed=0,
        num_classes=3,
        ignore_index=255,
        height=4,
        width=4,
        label=label,
        c_hat=c_hat,
        k=rng.integers(25, 41, (4, 4)).astype(np.uint16),
        clean_pred=label,
        sample_seconds=0.1,
        counts=None,
    )


@pytest.fixture
def output(tmp_path) -> Path:
    """A run folder with 3 vote rows and a config.json whose certify section is SegCertify's (Holm, 0.6)."""
    recs = [record(f"img{i}", seed=i) for i in range(3)]
    votes.write_votes(recs, str(tmp_path / "votes" / "part-0.parquet"))
    (tmp_path / "config.json").write_text(
        json.dumps({"certify": {"taus": [0.6], "alphas": [0.1], "corrections": ["holm"]}})
    )
    return tmp_path


def test_segcertify_is_the_default_procedure_and_keeps_its_columns(output):
    result = reduce.reduce_output(str(output), engine="local")
    m = result.metrics
    assert m["procedure"].tolist() == ["segcertify"]
    assert json.loads(m["params"].iloc[0]) == {"tau": 0.6, "alpha": 0.1, "correction": "holm"}
    assert (m["tau"].iloc[0], m["alpha"].iloc[0], m["correction"].iloc[0]) == (0.6, 0.1, "holm")
    # the rows equal certify() called directly on each record
    for rec, row in zip(votes.read_votes(str(output / "votes")), result.per_image.itertuples()):
        cert = certify.certify(
            rec.c_hat, rec.k, n=rec.n, sigma=rec.sigma, tau=0.6, alpha=0.1, correction="holm"
        )
        assert row.num_certified == cert.num_certified and row.radius == cert.radius


def _expected_certified(output: Path, min_votes: int) -> int:
    return sum(int((rec.k >= min_votes).sum()) for rec in votes.read_votes(str(output / "votes")))


def test_a_procedure_from_a_test_file_gets_its_rows_through_reduce_and_recertify(output, monkeypatch):
    monkeypatch.setitem(certify.PROCEDURES, THRESHOLD.name, THRESHOLD)
    entries = ["segcertify", {"procedure": "toy-threshold", "grid": {"min_votes": [30, 38]}}]
    result = reduce.reduce_output(str(output), procedures=entries, engine="local", into="reductions/toy")
    m = result.metrics
    assert m["procedure"].tolist() == ["segcertify", "toy-threshold", "toy-threshold"]
    toy = m[m["procedure"] == "toy-threshold"]
    assert [json.loads(p) for p in toy["params"]] == [{"min_votes": 30}, {"min_votes": 38}]
    assert toy["tau"].isna().all() and toy["correction"].isna().all()  # the toy has no tau, alpha, correction
    per = result.per_image[result.per_image["procedure"] == "toy-threshold"]
    for min_votes in (30, 38):
        got = per[per["params"] == json.dumps({"min_votes": min_votes})]["num_certified"].sum()
        assert got == _expected_certified(output, min_votes)
    written = pd.read_parquet(output / "reductions" / "toy" / "metrics.parquet")
    assert written["procedure"].tolist() == m["procedure"].tolist()
    assert "toy-threshold" in (output / "reductions" / "toy" / "summary.md").read_text()
    assert not (output / "metrics").exists()  # the run's own metrics are not touched

    again = analysis.recertify(analysis.load_votes(str(output)), tau=0.6, alpha=0.1, procedures=entries)
    pd.testing.assert_frame_equal(again.metrics, m)
    pd.testing.assert_frame_equal(again.per_image, result.per_image)


def test_a_procedure_named_by_import_path_needs_no_registration(output, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    entry = {"procedure": THIS, "params": {"min_votes": 35}}
    result = reduce.reduce_output(str(output), procedures=[entry], engine="local", into="reductions/p")
    assert result.metrics["procedure"].tolist() == ["toy-threshold"]
    assert result.per_image["num_certified"].sum() == _expected_certified(output, 35)


def test_the_cli_reduces_at_a_procedure_given_as_yaml(output):
    tests = str(Path(__file__).parent)
    env = {"PYTHONPATH": tests, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "ray_certseg.cli", "reduce", str(output), "--procedure", "segcertify"]
        + ["--procedure", f"{{procedure: '{THIS}', params: {{min_votes: 35}}}}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    (folder,) = (output / "reductions").glob("tau0.6_alpha0.1_holm_segcertify-toy-threshold_*")  # + hash
    metrics = pd.read_parquet(folder / "metrics.parquet")
    assert metrics["procedure"].tolist() == ["segcertify", "toy-threshold"]
    assert '| toy-threshold | {"min_votes": 35} |' in done.stdout


@pytest.mark.parametrize(
    ("procedures", "message"),
    [
        (["segcertfy"], "certify.procedures[0].procedure: unknown certification procedure 'segcertfy'"),
        (
            [{"procedure": "segcertify", "params": {"tau": 1.5}}],
            "certify.procedures[0]: segcertify parameter tau: input should be less than 1, got 1.5",
        ),
        (
            [{"procedure": "segcertify", "params": {"taus": 0.6}}],
            "certify.procedures[0]: segcertify parameter taus: extra inputs are not permitted, got 0.6",
        ),
        (
            ["segcertify", {"procedure": "segcertify", "grid": {"tau": 0.6}}],
            "certify.procedures[1].grid.tau: give a non-empty list of values, got 0.6",
        ),
        ([{"name": "segcertify"}], "certify.procedures[0]: an entry is a procedure name or {procedure: NAME"),
    ],
)
def test_a_bad_procedure_entry_is_refused_by_the_config(procedures, message):
    with pytest.raises(ConfigError) as info:
        JobConfig.from_dict(_config({"procedures": procedures}))
    assert str(info.value).startswith(message)


def test_the_config_records_its_procedures():
    cfg = JobConfig.from_dict(
        _config({"procedures": ["segcertify", {"procedure": "segcertify", "params": {"tau": 0.9}}]})
    )
    again = JobConfig.from_dict(cfg.to_dict())
    assert again.certify.procedures == cfg.certify.procedures
    grid = image_records.Grid(
        cfg.certify.taus, cfg.certify.alphas, cfg.certify.corrections, cfg.certify.procedures
    )
    assert [json.loads(p.key)["tau"] for p in grid.points()] == [0.75, 0.75, 0.9, 0.9]


def _config(certify_section: dict) -> dict:
    from ray_certseg.config import load_config

    data = load_config(str(REPO / "configs" / "demo.yaml")).to_dict()
    data["certify"] = {**data["certify"], **certify_section}
    return data
