"""The results stage (issue 26): reductions that never collide, a run cache that says "up to date" only when
metrics/ and plots/ match the config's grid and the votes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_procedures import output, record  # noqa: F401 (output: a fixture)

from ray_certseg import cli, votes
from ray_certseg.job.rundir import RunDir
from ray_certseg.results import curves, image_records, reduce, stream

DEMO_TREE = "demo"


def hierarchical(thresholds: list[float]) -> dict:
    return {"procedure": "hierarchical", "params": {"hierarchy": DEMO_TREE, "thresholds": thresholds}}


def test_reduction_names_are_readable_and_differ_by_every_parameter_of_the_grid():
    grid = lambda *entries: image_records.Grid((0.75,), (0.001,), ("holm",), entries)
    a = reduce.reduction_name(grid(hierarchical([0.5, 0.3, 0.0])))
    b = reduce.reduction_name(grid(hierarchical([0.7, 0.5, 0.0])))
    assert a != b  # thresholds are not in the readable part: the hash tells the grids apart
    assert a.rsplit("_", 1)[0] == b.rsplit("_", 1)[0] == "tau0.75_alpha0.001_holm_hierarchical"
    assert len(a.rsplit("_", 1)[1]) == 8
    plain = reduce.reduction_name(grid("segcertify"))
    assert plain.startswith("tau0.75_alpha0.001_holm_") and plain != a
    assert reduce.reduction_name(grid("segcertify"), "all") != plain
    assert "_all-rows_" in reduce.reduction_name(grid("segcertify"), "all")
    assert reduce.reduction_name(grid("segcertify")) == plain  # a pure function of the grid


def test_reducing_into_a_folder_of_another_grid_is_refused_with_the_fix(output, capsys):  # noqa: F811
    out = str(output)
    assert cli.main(["reduce", out, "--tau", "0.9", "--alpha", "0.1", "--name", "mine"]) == 0
    folder = output / "reductions" / "mine"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    capsys.readouterr()
    assert cli.main(["reduce", out, "--tau", "0.8", "--alpha", "0.1", "--name", "mine"]) == 2
    err = capsys.readouterr().err
    assert "another grid" in err and "--name" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing replaced
    # the same grid again may refresh its own folder
    assert cli.main(["reduce", out, "--tau", "0.9", "--alpha", "0.1", "--name", "mine"]) == 0
    # a folder with files but no record of its grid (made by hand, or by an older version) is refused too
    (output / "reductions" / "hand").mkdir()
    (output / "reductions" / "hand" / "metrics.csv").write_text("a,b\n")
    assert cli.main(["reduce", out, "--tau", "0.9", "--alpha", "0.1", "--name", "hand"]) == 2
    assert "without a record of their grid" in capsys.readouterr().err


def test_two_grids_without_a_name_get_two_folders(output):  # noqa: F811
    out = str(output)
    for tau in ("0.9", "0.8"):
        assert cli.main(["reduce", out, "--tau", tau, "--alpha", "0.1"]) == 0
    folders = sorted(p.name for p in (output / "reductions").iterdir())
    assert len(folders) == 2 and [f.split("_")[0] for f in folders] == ["tau0.8", "tau0.9"]
    for f in folders:
        record = json.loads((output / "reductions" / f / "inputs.json").read_text())["grid"]
        assert [json.loads(p)["tau"] for _, p in record["points"]] == [float(f.split("_")[0][3:])]


def test_replace_metrics_leaves_no_stale_up_to_date(output):  # noqa: F811
    """metrics/inputs.json says what metrics/ was made from (its grid included); plots/inputs.json what
    plots/ shows. After ``reduce --replace-metrics`` with another grid, the run is no longer 'up to date' for
    its config; back at the config's grid it is only once the plots show that grid too."""
    run = RunDir.of(str(output))
    config_inputs = reduce.inputs_of(run)
    reduce.reduce_output(run, engine="local")
    (output / "plots").mkdir()
    run.record_plotted()  # as write_plots does last
    assert run.is_current(config_inputs)

    assert cli.main(["reduce", str(output), "--tau", "0.9", "--replace-metrics"]) == 0
    recorded = json.loads((output / "metrics" / "inputs.json").read_text())
    assert [json.loads(p)["tau"] for _, p in recorded["grid"]["points"]] == [0.9]  # refreshed
    assert not run.is_current(config_inputs)

    run.record_plotted()  # `report --replot`: plots/ now shows the 0.9 grid
    assert cli.main(["reduce", str(output), "--replace-metrics"]) == 0  # the config's grid again
    assert json.loads((output / "metrics" / "inputs.json").read_text()) == config_inputs
    assert not run.is_current(config_inputs)  # the plots still show the 0.9 grid's metrics
    run.record_plotted()
    assert run.is_current(config_inputs)

    votes.write_votes([record("img9", seed=9)], str(output / "votes" / "part-1.parquet"))
    assert not run.is_current(reduce.inputs_of(run))  # new votes


def test_a_failed_reduction_leaves_no_record(output, monkeypatch):  # noqa: F811
    run = RunDir.of(str(output))
    reduce.reduce_output(run, engine="local")
    assert (output / "metrics" / "inputs.json").exists()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(reduce, "write_metrics", broken)
    with pytest.raises(RuntimeError):
        reduce.reduce_output(run, engine="local")
    assert not (output / "metrics" / "inputs.json").exists()


def test_inputs_record_the_votes_by_listing(output):  # noqa: F811
    run = RunDir.of(str(output))
    inputs = reduce.inputs_of(run)
    assert list(inputs["vote_files"]) == ["votes/part-0.parquet"]
    assert inputs["grid"]["pooling"] == "common"
    assert (
        Path(output / "votes" / "part-0.parquet").stat().st_size
        == inputs["vote_files"]["votes/part-0.parquet"]
    )


# ------------------------------------------------------------------------- one chunked path, bounded memory
def hierarchical_run(root: Path, images: int = 6) -> Path:
    """A run folder of demo-hierarchy vote rows (7 classes, per-level votes): 2 methods x 2 sigmas per
    image, in files of 5 rows, and a config.json with SegCertify and a hierarchical entry."""
    from test_hierarchical import _record

    from ray_certseg.certify import class_tree

    h = class_tree.load(DEMO_TREE)
    recs = []
    for i in range(images):
        for j, (method, sigma) in enumerate([(m, s) for m in ("a", "b") for s in (0.25, 0.5)]):
            rec = _record(10 * i + j, h, size=8)
            rec.image_id, rec.method, rec.sigma = f"img{i:02d}", method, sigma
            recs.append(rec)
    for start in range(0, len(recs), 5):
        votes.write_votes(recs[start : start + 5], str(root / "votes" / f"part-{start:03d}.parquet"))
    certify_cfg = {
        "taus": [0.6],
        "alphas": [0.05],
        "corrections": ["holm"],
        "procedures": ["segcertify", hierarchical([0.5, 0.3, 0.0])],
    }
    (root / "config.json").write_text(json.dumps({"certify": certify_cfg}))
    return root


def test_every_consumer_of_a_path_reads_one_chunk_of_vote_rows_at_a_time(tmp_path, monkeypatch):
    """recertify, both curves and the threshold sweep over a folder decode the maps of one vote row at a time
    when a chunk holds one (the run has 24), and give the numbers of the same call on the rows in memory."""
    import pandas as pd
    from test_analysis import MapReads

    from ray_certseg import analysis

    out = hierarchical_run(tmp_path)
    frame = analysis.load_votes(out)
    monkeypatch.setattr(stream, "CHUNK_BYTES", 1)
    reads = MapReads(monkeypatch)
    procedures = ["segcertify", hierarchical([0.5, 0.3, 0.0])]
    radii = [0.05, 0.1, 0.2]
    calls = {
        "recertify": lambda src: analysis.recertify(src, tau=0.6, alpha=0.05, procedures=procedures).metrics,
        "accuracy curve": lambda src: analysis.certified_accuracy_curve(
            src, radii, alpha=0.05, engine="local"
        ),
        "procedure curve": lambda src: analysis.procedure_curve(src, radii, procedures, alpha=0.05),
        "sweep": lambda src: analysis.sweep_thresholds(
            src,
            [(0.5, 0.3, 0.0), (0.7, 0.5, 0.0)],
            hierarchy=DEMO_TREE,
            tau=0.6,
            alpha=0.05,
            held_out=["img00", "img01"],
        ),
    }
    for name, call in calls.items():
        reads.rows.clear()
        streamed = call(str(out))
        assert reads.rows and max(reads.rows) == 1, name
        assert sum(reads.rows) == 24, name  # every vote row read once: one pass for every point
        pd.testing.assert_frame_equal(streamed, call(frame), obj=name)
    for entries in (
        procedures,
        procedures[1:],
    ):  # the plots' one pass for both curves, with SegCertify or not
        reads.rows.clear()
        accuracy, by_procedure = curves.radius_curves(str(out), radii, entries, alpha=0.05, engine="local")
        assert sum(reads.rows) == 24 and max(reads.rows) == 1
        pd.testing.assert_frame_equal(
            accuracy, analysis.certified_accuracy_curve(frame, radii, alpha=0.05, per_sigma=True)
        )
        pd.testing.assert_frame_equal(
            by_procedure, analysis.procedure_curve(frame, radii, entries, alpha=0.05)
        )
        assert set(by_procedure["procedure"]) == {
            e if isinstance(e, str) else e["procedure"] for e in entries
        }


def test_segcertify_records_from_counts_equal_those_from_the_certified_map():
    """SegCertifyCounts (one pass over a row for every SegCertify point) gives the records that certify()'s map
    through image_stats gives, field for field: ignore labels, ties in k, Holm and Bonferroni, many taus."""
    import dataclasses

    import numpy as np

    from ray_certseg import certify

    generic = dataclasses.replace(certify.SEGCERTIFY, name="segcertify-by-map")  # the map path, same maths
    shared = {
        "taus": (0.55, 0.6, 0.75, 0.9, 0.95),
        "alphas": (0.001, 0.2),
        "corrections": ("holm", "bonferroni"),
    }
    fast, slow = (
        certify.points(["segcertify"], shared),
        [certify.Point(generic, p.params) for p in certify.points(["segcertify"], shared)],
    )
    for seed in range(4):
        rec = record(f"img{seed}", seed=seed, n=[40, 12, 100, 7][seed])
        rng = np.random.default_rng(seed)
        rec.label = rec.label.copy()
        rec.label[rng.random(rec.label.shape) < 0.2] = 255
        rec.k = rng.integers(0, rec.n + 1, rec.k.shape).astype(np.uint16)
        rec.k[0, 0] = rec.n
        got, want = image_records.image_rows(rec, fast), image_records.image_rows(rec, slow)
        assert len(got) == len(want) == 20
        for g, w in zip(got, want):
            assert g.pop("procedure") == "segcertify" and w.pop("procedure") == "segcertify-by-map"
            assert g.keys() == w.keys()
            for key in g:
                np.testing.assert_array_equal(g[key], w[key], err_msg=key)
    bad = record("bad", seed=9)
    bad.c_hat = bad.c_hat.copy()
    bad.c_hat[0, 0] = 3  # num_classes = 3
    with pytest.raises(ValueError, match="c_hat holds classes outside"):
        image_records.image_rows(bad, fast)


def test_ray_certseg_analysis_exposes_every_name_the_docs_and_notebook_use():
    """``ray_certseg.analysis`` is the documented pandas API: every ``analysis.NAME`` in the README, docs/ and
    the notebook resolves, and each is the object of the results module that defines it."""
    import re

    from ray_certseg import analysis
    from ray_certseg.results import analysis as loading
    from ray_certseg.results import curves

    root = Path(__file__).resolve().parent.parent
    texts = [root / "README.md", root / "notebooks" / "analysis.ipynb", *sorted((root / "docs").glob("*.md"))]
    used = {m for p in texts for m in re.findall(r"\banalysis\.([a-z_]+)\(", p.read_text())}
    assert {"load_votes", "load_metrics", "recertify", "certified_accuracy_curve"} <= used
    for name in sorted(used):
        assert getattr(analysis, name) is getattr(loading, name, None) or getattr(analysis, name) is getattr(
            curves, name
        ), name
    assert sorted(analysis.__all__) == sorted(
        n for n in dir(analysis) if not n.startswith("_") and n != "annotations"
    )
