"""Hierarchical certification: the hierarchy files, the per-level votes counted on the device, the procedure
against SegCertify and hand computations, the CIG, the config checks, the threshold sweep, and the job end to
end (vote schema 2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jobworld
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from ray_certseg import analysis, certify, cli, votes
from ray_certseg.certify import class_tree
from ray_certseg.certify.hierarchical import HierarchicalParams, certify_hierarchical, choose_level
from ray_certseg.config import ConfigError, JobConfig, load_config
from ray_certseg.job.preflight import check_hierarchies
from ray_certseg.results import examples
from ray_certseg.results.metrics import level_stats
from ray_certseg.sampling import level_index, level_votes

REPO = Path(__file__).resolve().parent.parent
TOY = {"name": "toy", "classes": ["a", "b", "c", "d"], "levels": [{"ab": ["a", "b"], "cd": ["c", "d"]}]}


# --- hierarchies -----------------------------------------------------------------------------------------


def test_the_shipped_hierarchies_partition_their_classes_at_every_level_and_nest():
    for name, classes in (("cityscapes", 19), ("pascal_context59", 59), ("demo", 7)):
        h = class_tree.load(name)
        assert h.num_classes == classes
        for level in range(1, h.num_levels):
            assert h.sizes(level).sum() == classes and (h.sizes(level) > 0).all()
            # nesting: classes sharing a node at level l share one at level l + 1
            if level + 1 < h.num_levels:
                for v in range(len(h.names[level])):
                    assert len(set(h.node[level + 1][h.node[level] == v])) == 1
        assert class_tree.from_dict(h.to_dict()).digest == h.digest
    cs = class_tree.load("cityscapes")
    assert cs.names[1] == ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
    assert [cs.names[1][v] for v in cs.node[1][[0, 13, 14, 11]]] == ["flat", "vehicle", "vehicle", "human"]


@pytest.mark.parametrize(
    ("levels", "message"),
    [
        (
            [{"ab": ["a", "b"], "cd": ["c", "d", "a"]}],
            r"'a' appears in more than one node \(levels must nest\)",
        ),
        ([{"ab": ["a", "b"], "c": ["c"]}], r"\['d'\] of level 0 are in no node"),
        ([{"ab": ["a", "b"], "cd": ["c", "e"]}], "names 'e', which is not a node of level 0"),
        (
            [{"ab": ["a", "b"], "cd": ["c", "d"]}, {"all": ["ab", "c"]}],
            "names 'c', which is not a node of level 1",
        ),
        ([], "levels is empty"),
    ],
)
def test_a_bad_hierarchy_file_is_refused_with_the_reason(levels, message):
    with pytest.raises(ValueError, match=message):
        class_tree.from_dict({**TOY, "levels": levels})


# --- votes per level ------------------------------------------------------------------------------------


def test_level_votes_sum_fine_votes_per_node_and_break_ties_to_the_lowest_node():
    h = class_tree.from_dict(TOY)
    rng = np.random.default_rng(3)
    counts0 = rng.integers(0, 6, (4, 200)).astype(np.int32)
    counts0[:, 0] = [1, 1, 2, 0]  # a tie at level 1: ab = cd = 2 -> node 0; fine margin 2 - 1 = 1
    counts = rng.integers(0, 20, (4, 200)).astype(np.int32)
    margin, c, k = level_votes(torch.from_numpy(counts0), torch.from_numpy(counts), level_index(h.node[1:]))
    top = np.sort(counts0, axis=0)
    np.testing.assert_array_equal(margin[0].numpy(), top[-1] - top[-2])
    node0, node1 = h.matrix(1) @ counts0, h.matrix(1) @ counts
    np.testing.assert_array_equal(c[0].numpy(), node0.argmax(0))
    np.testing.assert_array_equal(k[0].numpy(), node1[node0.argmax(0), np.arange(200)])
    assert int(c[0, 0]) == 0 and int(margin[0, 0]) == 1


def test_choose_level_takes_the_finest_level_whose_threshold_the_margin_clears():
    margin = np.array([10, 7, 5, 3, 0])
    np.testing.assert_array_equal(choose_level(margin, 10, (0.7, 0.3, 0.0)), [0, 0, 1, 1, 2])
    np.testing.assert_array_equal(choose_level(margin, 10, (0.9, 0.8, 0.5)), [0, 2, 2, 2, 2])  # none: level L


def _record(
    seed: int, h: class_tree.Hierarchy, n0: int = 10, n: int = 100, size: int = 12
) -> votes.VoteRecord:
    """A vote row with per-level votes counted from random (C, size, size) selection and estimation counts."""
    rng = np.random.default_rng(seed)
    C = h.num_classes
    p = rng.dirichlet(np.ones(C) * 0.3, size * size).T
    counts0 = np.stack([rng.multinomial(n0, p[:, i]) for i in range(size * size)], 1)
    counts = np.stack([rng.multinomial(n, p[:, i]) for i in range(size * size)], 1)
    margin, c, k = level_votes(torch.from_numpy(counts0), torch.from_numpy(counts), level_index(h.node[1:]))
    c_hat = certify.select(counts0)
    shape = (size, size)
    return votes.VoteRecord(
        image_id=f"img{seed}",
        dataset="toy",
        method="m",
        denoiser="",
        segmenter="s",
        sigma=0.25,
        n0=n0,
        n=n,
        seed=0,
        num_classes=C,
        ignore_index=255,
        height=size,
        width=size,
        label=p.argmax(0).reshape(shape).astype(np.uint8),
        c_hat=c_hat.reshape(shape),
        k=counts[c_hat, np.arange(size * size)].reshape(shape).astype(np.uint16),
        clean_pred=p.argmax(0).reshape(shape).astype(np.uint8),
        sample_seconds=0.1,
        hierarchy=h.digest,
        margin=margin[0].numpy().reshape(shape).astype(np.uint16),
        c_hat_levels=c.numpy().reshape(-1, *shape).astype(np.uint8),
        k_levels=k.numpy().reshape(-1, *shape).astype(np.uint16),
    )


def test_the_procedure_with_zero_thresholds_is_segcertify_and_at_the_top_certifies_nodes():
    h = class_tree.load("demo")
    rec = _record(0, h)
    seg = certify.certify(rec.c_hat, rec.k, n=rec.n, sigma=rec.sigma, tau=0.6, alpha=0.05)
    flat = certify_hierarchical(
        rec, HierarchicalParams(hierarchy="demo", thresholds=(0, 0, 0), tau=0.6, alpha=0.05)
    )
    np.testing.assert_array_equal(flat.labels, seg.labels)
    assert (flat.level == 0).all() and flat.radius == seg.radius
    point = HierarchicalParams(hierarchy="demo", thresholds=(1, 1, 0), tau=0.6, alpha=0.05)
    top = certify_hierarchical(rec, point)
    full = rec.margin == rec.n0  # margin 1 clears t_0 = 1: those pixels stay fine, the others go to level 2
    assert full.any() and not full.all()
    assert (top.level[~full] == 2).all() and (top.level[full] == 0).all()
    rec.margin = np.zeros_like(rec.margin)  # every pixel at the top level: certify() of level 2's c and k
    top = certify_hierarchical(rec, point)
    by_hand = certify.certify(
        rec.c_hat_levels[1], rec.k_levels[1], n=rec.n, sigma=rec.sigma, tau=0.6, alpha=0.05
    )
    np.testing.assert_array_equal(top.labels, by_hand.labels)
    assert (top.level == 2).all() and by_hand.num_certified > seg.num_certified


def test_the_procedure_refuses_votes_counted_without_its_hierarchy():
    rec = _record(0, class_tree.load("demo"))
    rec.hierarchy, rec.margin, rec.c_hat_levels, rec.k_levels = None, None, None, None
    with pytest.raises(ValueError, match="sample with dataset.hierarchy: demo"):
        certify_hierarchical(
            rec, HierarchicalParams(hierarchy="demo", thresholds=(0.5, 0.3, 0), tau=0.6, alpha=0.1)
        )


def test_the_information_gain_counts_correct_nodes_by_their_size():
    h = class_tree.from_dict(TOY)
    node, sizes = h.tables
    label = np.array([[0, 1], [2, 255]])
    cert = np.array([[0, 0], [1, 1]])  # a fine; node ab (holds b); node cd (holds c); ignored
    level = np.array([[0, 1], [1, 1]])
    st = level_stats(label, cert, level, node, sizes)
    assert (st.num_labelled, st.num_correct) == (3, 3)
    assert st.info_gain == pytest.approx(math.log(4) + 2 * (math.log(4) - math.log(2)))
    assert st.pixels.tolist() == [1, 2] and st.certified.tolist() == [1, 2] and st.wrong.tolist() == [0, 0]
    wrong = level_stats(label, np.array([[1, 1], [0, -1]]), level, node, sizes)  # b for a; cd for b; ab for c
    assert (wrong.num_correct, wrong.info_gain, wrong.wrong.tolist()) == (0, 0.0, [1, 2])


@pytest.mark.parametrize("tree", ["demo", "cityscapes"])
def test_hierarchical_records_from_counts_equal_those_from_the_certified_map(tree, monkeypatch):
    """The vote histograms of a row (results.counts) give the records that certify_hierarchical's map gives
    through image_stats and level_stats, field for field and float for float: ignore labels, thresholds on
    the margin grid (m / n0 = t exactly) and between it, every pixel at one level, Holm and Bonferroni, many
    taus; SegCertify's records summed from the level-0 histogram equal its own counts. A row whose histograms
    would pass MAX_BINS takes the map path, with the same records."""
    import dataclasses

    from ray_certseg.certify.hierarchical import HIERARCHICAL
    from ray_certseg.results import counts, image_records

    h = class_tree.load(tree)
    generic = dataclasses.replace(HIERARCHICAL, name="hierarchical-by-map")  # the map path, same maths
    thresholds = [[0.3, 0.1, 0.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.95, 0.42, 0.0]]
    entries = [
        "segcertify",
        *({"procedure": "hierarchical", "params": {"hierarchy": tree, "thresholds": t}} for t in thresholds),
    ]
    shared = {"taus": (0.55, 0.75, 0.9), "alphas": (0.001, 0.2), "corrections": ("holm", "bonferroni")}
    fast = certify.points(entries, shared)
    slow = [certify.Point(generic, p.params) if p.procedure is HIERARCHICAL else p for p in fast]
    seg_only = certify.points(["segcertify"], shared)
    for seed in range(3):
        rec = _record(seed, h, n0=[10, 4, 20][seed], n=[100, 30, 50][seed], size=16)
        rng = np.random.default_rng(seed)
        rec.label = rec.label.copy()
        rec.label[rng.random(rec.label.shape) < 0.2] = 255
        rec.k = rec.k.copy()
        rec.k[0, 0] = rec.n
        got, want = image_records.image_rows(rec, fast), image_records.image_rows(rec, slow)
        assert len(got) == len(want) == 12 * len(entries)
        assert any(g["num_certified"] for g in got if g["procedure"] == "hierarchical")
        for g, w in zip(got, want):
            assert g.pop("procedure") == w.pop("procedure").replace("-by-map", "")
            assert g.keys() == w.keys()
            for key in g:
                np.testing.assert_array_equal(g[key], w[key], err_msg=key)
        plain = image_records.image_rows(rec, seg_only)  # SegCertify's own counts, no histogram per level
        assert [r["confusion"].tolist() for r in plain] == [r["confusion"].tolist() for r in got[:12]]
        monkeypatch.setattr(counts, "MAX_BINS", 10)
        assert not counts.HierarchicalCounts.fits(rec, h)
        again = image_records.image_rows(rec, fast)
        monkeypatch.undo()
        for g, a in zip(got, again):
            for key in a:
                if key != "procedure":
                    np.testing.assert_array_equal(a[key], g[key], err_msg=key)
    bad = _record(9, h, size=16)
    bad.margin = bad.margin.copy()
    bad.margin[0, 0] = bad.n0 + 1
    with pytest.raises(ValueError, match=r"margin holds values outside \[0, n0 = 10\]"):
        image_records.image_rows(bad, fast)


def test_segcertify_cig_equals_its_certified_accuracy_and_zero_thresholds_equal_segcertify():
    h = class_tree.load("demo")
    frame = pd.DataFrame([vars(_record(s, h)) for s in range(4)])
    entries = [
        "segcertify",
        {"procedure": "hierarchical", "params": {"hierarchy": "demo", "thresholds": [0, 0, 0]}},
    ]
    m = analysis.recertify(frame, tau=0.6, alpha=0.1, procedures=entries).metrics.set_index("procedure")
    assert m.loc["segcertify", "cig"] == pytest.approx(m.loc["segcertify", "certified_accuracy"])
    for column in ("cig", "abstain_rate", "level_accuracy", "certified_accuracy"):
        assert m.loc["hierarchical", column] == pytest.approx(m.loc["segcertify", column])
    coarse = analysis.recertify(
        frame,
        tau=0.6,
        alpha=0.1,
        procedures=[{"procedure": "hierarchical", "params": {"hierarchy": "demo", "thresholds": [1, 1, 0]}}],
    ).metrics.iloc[0]
    assert coarse["abstain_rate"] < m.loc["segcertify", "abstain_rate"]  # coarse nodes certify more pixels
    assert sum(coarse["level_share_per_level"]) == pytest.approx(1.0)


def test_the_procedure_curve_of_segcertify_is_its_certified_accuracy_curve():
    """For SegCertify the CIG is the certified accuracy, so its CIG-vs-radius envelope is the reducer's
    certified-accuracy envelope; the hierarchical curve comes from the same votes at the same tau(r, sigma)."""
    h = class_tree.load("demo")
    frame = pd.DataFrame([vars(_record(s, h)) | {"sigma": sigma} for s in range(3) for sigma in (0.25, 0.5)])
    radii = [0.05, 0.15, 0.3]
    entries = [
        "segcertify",
        {"procedure": "hierarchical", "params": {"hierarchy": "demo", "thresholds": [1, 1, 0]}},
    ]
    curve = analysis.procedure_curve(frame, radii, entries, alpha=0.1)
    accuracy = analysis.certified_accuracy_curve(frame, radii, alpha=0.1)
    seg = curve[curve["procedure"] == "segcertify"].reset_index(drop=True)
    np.testing.assert_allclose(seg["cig"], accuracy["certified_accuracy"])
    hier = curve[curve["procedure"] == "hierarchical"].reset_index(drop=True)
    assert len(hier) == len(radii) and (hier["abstain_rate"] <= seg["abstain_rate"] + 1e-12).all()


def test_the_sweep_reports_per_candidate_and_on_a_held_out_split(caplog):
    h = class_tree.load("demo")
    frame = pd.DataFrame([vars(_record(s, h)) for s in range(4)])
    table = analysis.sweep_thresholds(frame, [(0, 0, 0), (0.5, 0.3, 0)], hierarchy="demo", tau=0.6, alpha=0.1)
    assert table["thresholds"].tolist() == ["(0.0, 0.0, 0.0)", "(0.5, 0.3, 0.0)"]
    assert "optimistic" in caplog.text
    split = analysis.sweep_thresholds(
        frame, [(0.5, 0.3, 0)], hierarchy="demo", tau=0.6, alpha=0.1, held_out=["img3"]
    )
    assert split[["split", "images"]].values.tolist() == [["select", 3], ["held_out", 1]]


# --- config and job ----------------------------------------------------------------------------------------


def _demo(**dataset) -> dict:
    data = load_config(str(REPO / "configs" / "demo.yaml")).to_dict()
    data["dataset"].update(dataset)
    return data


def test_the_config_checks_the_hierarchy_against_the_dataset(tmp_path):
    with pytest.raises(
        ConfigError, match="dataset.hierarchy: hierarchy 'cityscapes' has 19 classes, the dataset 7"
    ):
        JobConfig.from_dict(_demo(hierarchy="cityscapes"))
    swapped = class_tree.load("demo").to_dict()
    swapped["classes"][1], swapped["classes"][2] = swapped["classes"][2], swapped["classes"][1]
    (tmp_path / "h.yaml").write_text(yaml.safe_dump(swapped))
    with pytest.raises(ConfigError, match="lists class 1 as 'green_1_7', the dataset as 'red_0_8'"):
        JobConfig.from_dict(_demo(hierarchy=str(tmp_path / "h.yaml")))
    data = _demo()
    data["certify"]["procedures"] = [
        {"procedure": "hierarchical", "params": {"hierarchy": "demo", "thresholds": [0.2, 0.5, 0]}}
    ]
    with pytest.raises(ConfigError, match="thresholds must be margins in"):
        JobConfig.from_dict(data)
    data["certify"]["procedures"][0]["params"]["thresholds"] = [0.5, 0.2, 0]
    check_hierarchies(JobConfig.from_dict(data))  # the demo samples with hierarchy demo
    data["dataset"]["hierarchy"] = None
    with pytest.raises(ConfigError, match="set dataset.hierarchy: demo"):
        check_hierarchies(JobConfig.from_dict(data))


@pytest.mark.ray
@pytest.mark.slow
def test_the_job_stores_every_level_and_the_reducer_certifies_both_procedures(tmp_path, ray_session):
    manifest = jobworld.write_dataset(tmp_path / "data", 2)
    models = jobworld.write_models(tmp_path / "models")
    tree = {"name": "toy3", "classes": ["c0", "c1", "c2"], "levels": [{"n0": ["c0"], "n12": ["c1", "c2"]}]}
    (tmp_path / "toy3.yaml").write_text(yaml.safe_dump(tree))
    cfg = jobworld.config(manifest, models, tmp_path / "out", store_counts=True)
    cfg["dataset"]["hierarchy"] = str(tmp_path / "toy3.yaml")
    cfg["certify"]["procedures"] = [
        "segcertify",
        {
            "procedure": "hierarchical",
            "params": {"hierarchy": str(tmp_path / "toy3.yaml"), "thresholds": [0.5, 0]},
        },
    ]
    assert cli.main(["run", "--config", str(jobworld.write_config(tmp_path / "job.yaml", cfg))]) == 0
    assert votes.check_schema_version(str(tmp_path / "out" / "votes")) == 2
    recs = votes.read_votes(str(tmp_path / "out" / "votes"))
    node = class_tree.load(str(tmp_path / "toy3.yaml")).node[1]
    for rec in recs:  # each level's k is the S votes under its node (the stored full counts of S)
        assert rec.hierarchy.startswith("toy3-") and rec.c_hat_levels.shape == (1, rec.height, rec.width)
        under = np.stack([rec.counts[node == v].sum(0) for v in range(2)])
        np.testing.assert_array_equal(
            rec.k_levels[0], np.take_along_axis(under, rec.c_hat_levels[0:1].astype(int), 0)[0]
        )
        assert (rec.margin <= rec.n0).all()
    metrics = pq.read_table(tmp_path / "out" / "metrics" / "metrics.parquet").to_pandas()
    assert set(metrics["procedure"]) == {"segcertify", "hierarchical"}
    assert len(metrics) == 2 * 2 * 2 * 2  # methods x sigmas x corrections x procedures
    assert "hierarchical" in (tmp_path / "out" / "metrics" / "summary.md").read_text()
    assert json.loads(metrics[metrics["procedure"] == "hierarchical"]["params"].iloc[0])["thresholds"] == [
        0.5,
        0.0,
    ]
    plots = tmp_path / "out" / "plots"
    assert (plots / "procedures_vs_radius.png").is_file()
    assert sorted(
        plots.glob("examples/*_levels.png")
    )  # the certified map coloured by level, per example image
    assert set(pd.read_csv(plots / "procedures_vs_radius.csv")["procedure"]) == {"segcertify", "hierarchical"}
    # from the stored votes, by the CLI: other threshold functions (the run's hierarchy), and the sweep
    out = str(tmp_path / "out")
    assert cli.main(["reduce", out, "--procedure", "hierarchical", "--thresholds", "0.5,0", "1,0"]) == 0
    (folder,) = (tmp_path / "out" / "reductions").glob("tau0.6_alpha0.1_holm-bonferroni_hierarchical_*")
    again = pd.read_parquet(folder / "metrics.parquet")
    assert {tuple(json.loads(p)["thresholds"]) for p in again["params"]} == {(0.5, 0.0), (1.0, 0.0)}
    assert cli.main(["sweep", out, "--thresholds", "0,0", "0.5,0", "--tau", "0.6", "--alpha", "0.1"]) == 0


# --- the statistical self-test ----------------------------------------------------------------------------


def test_the_hierarchical_guarantee_holds_on_an_analytic_model_under_both_corrections():
    """300 images with known per-node probabilities: the rate of images holding a false certificate stays
    within alpha (one-sided binomial test at 0.001), for Holm and Bonferroni."""
    from ray_certseg.selftest import run_hierarchical_selftest

    report = run_hierarchical_selftest(images=300, alpha=0.2, seed=1)
    assert report.passed, report.to_markdown()
    for result in report.results:
        assert result.certified_pixels > 0.3 * result.pixels  # not vacuous: a third of the pixels certify
        assert result.failures > 0  # the boundary is reached: false certificates do happen, within alpha


def test_choosing_the_level_from_s_gives_more_false_certificates_than_from_s0():
    """The wrong variant on the same seeds of the boundary model: more images with a false certificate (within
    alpha there; the model where it fails is the next test's)."""
    from ray_certseg.selftest import run_hierarchical_selftest

    right = run_hierarchical_selftest(images=300, alpha=0.2, seed=2, corrections=("holm",))
    wrong = run_hierarchical_selftest(images=300, alpha=0.2, seed=2, corrections=("holm",), level_from_s=True)
    assert wrong.results[0].failures > right.results[0].failures
    assert wrong.results[0].false_pixels > right.results[0].false_pixels


def test_choosing_the_level_from_s_fails_under_holm_where_s0_holds():
    """The coarse-sure model (every top node sure, every top class just below tau): choosing the level from S
    lets only the nulls that S favours into Holm's family, and the self-test must fail; the procedure's S0
    rule holds on the same seeds under both corrections. Bonferroni's fixed threshold survives the mistake
    (docs/hierarchical.md)."""
    from ray_certseg.selftest import run_hierarchical_selftest

    right = run_hierarchical_selftest(images=300, alpha=0.2, seed=3, model="coarse-sure")
    assert right.passed, right.to_markdown()
    assert all(r.certified_pixels > 0.5 * r.pixels for r in right.results)  # the coarse level certifies
    wrong = run_hierarchical_selftest(images=300, alpha=0.2, seed=3, model="coarse-sure", level_from_s=True)
    by_correction = {r.correction: r for r in wrong.results}
    assert not by_correction["holm"].passed, wrong.to_markdown()
    assert by_correction["holm"].rate > 0.5
    assert by_correction["bonferroni"].passed


@pytest.mark.parametrize(("tree", "levels"), [("demo", 3), ("pascal_context59", 4), ("cityscapes", 3)])
def test_the_levels_picture_has_a_legend_entry_for_every_level_of_its_hierarchy(tree, levels):
    """plots/examples/*_levels.png: pascal_context59 has 4 levels (the legend used to stop at 3); each gets one."""
    import pandas as pd

    h = class_tree.load(tree)
    assert h.num_levels == levels
    rec = _record(3, h)
    frame = pd.DataFrame([{f: getattr(rec, f) for f in rec.__dataclass_fields__}])
    point = HierarchicalParams(hierarchy=tree, thresholds=(0.9,) * (levels - 1) + (0,), tau=0.6, alpha=0.05)
    fig = examples.plot_levels(frame, point)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [f"level {lv}" for lv in range(levels)] + ["abstain"]
