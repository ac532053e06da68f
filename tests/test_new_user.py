"""What a new user with their own data and model hits, point by point (each test failed before its fix): images
decoded right or refused, duplicate ids named, infeasible (n, tau, alpha) grids explained, their own code's import
error pointing at runtime_env, quiet model loading, and plots that draw a class "red" red."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ray_certseg.certify import can_certify, certify, max_tau, min_n
from ray_certseg.config import ConfigError, DatasetConfig, JobConfig
from ray_certseg.data import ItemError, list_items, load_item
from ray_certseg.data.load import decode_image
from ray_certseg.results import aggregate, drawing, examples, image_records, tables


def png_bytes(array: np.ndarray, path: Path) -> bytes:
    Image.fromarray(array).save(path)
    return path.read_bytes()


# ------------------------------------------------------------------------------------------------- decoding
def test_16bit_grayscale_is_scaled_not_clipped_to_white(tmp_path):
    grey16 = np.array([[0, 257, 32896], [65535, 1000, 20000]], dtype=np.uint16)
    rgb = decode_image(png_bytes(grey16, tmp_path / "g16.png"), "g16.png", "g16")
    expected = np.round(grey16 / 257.0).astype(np.uint8)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], expected)
    np.testing.assert_array_equal(rgb[..., 1], rgb[..., 2])
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) > 2  # not all white


@pytest.mark.parametrize("dtype,mode", [(np.int32, "I"), (np.float32, "F")])
def test_32bit_images_of_unknown_range_are_refused(tmp_path, dtype, mode):
    path = tmp_path / "deep.tif"
    Image.fromarray(np.full((4, 4), 70000, dtype=dtype)).save(path)
    with pytest.raises(ItemError, match=f"mode {mode}.*convert it to 8-bit RGB"):
        decode_image(path.read_bytes(), str(path), "deep")


def test_dropped_alpha_channel_is_logged(tmp_path, caplog):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    with caplog.at_level(logging.WARNING, logger="ray_certseg"):
        rgb = decode_image(png_bytes(rgba, tmp_path / "a.png"), "a.png", "with_alpha")
    assert (rgb[..., 0] == 200).all()
    assert "'with_alpha'" in caplog.text and "alpha channel (mode RGBA): dropped" in caplog.text


# ------------------------------------------------------------------------------------------------ manifests
def two_images_one_id(root: Path) -> Path:
    for name, value in (("a.png", 10), ("b.png", 200)):
        Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(root / name)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / f"lab_{name}")
    manifest = root / "list.csv"
    manifest.write_text("image_path,label_path,image_id\na.png,lab_a.png,mine-1\nb.png,lab_b.png,mine-1\n")
    return manifest


def test_two_images_under_one_image_id_fail_naming_the_rows(tmp_path):
    manifest = two_images_one_id(tmp_path)
    with pytest.raises(ValueError, match=r"rows 1 \(.*a.png\) and 2 \(.*b.png\).*same image_id 'mine-1'"):
        list_items({"kind": "manifest", "manifest": str(manifest), "num_classes": 2})


def test_duplicate_ids_renamed_only_when_asked_and_loudly(tmp_path, caplog):
    manifest = two_images_one_id(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ray_certseg"):
        refs = list_items(
            {"kind": "manifest", "manifest": str(manifest), "num_classes": 2, "duplicate_ids": "rename"}
        )
    ids = [r["image_id"] for r in refs]
    assert len(set(ids)) == 2 and all(i.startswith("mine-1-") for i in ids)
    assert "renamed" in caplog.text and "mine-1" in caplog.text
    with pytest.raises(ConfigError, match="dataset.duplicate_ids: must be one of error, rename"):
        DatasetConfig.from_dict(
            {"kind": "manifest", "manifest": str(manifest), "num_classes": 2, "duplicate_ids": "keep"}
        )


# ------------------------------------------------------------------------------------------------ feasibility
def test_feasibility_matches_what_certify_can_do():
    pixels, alpha = 96 * 128, 0.001
    assert not can_certify(50, 0.75, alpha, pixels)
    assert max_tau(50, alpha, pixels) == pytest.approx(0.7215, abs=1e-4)  # the 0.722
    n = min_n(0.75, alpha, pixels)
    assert can_certify(n, 0.75, alpha, pixels) and not can_certify(n - 1, 0.75, alpha, pixels)
    # a perfect vote map (k = n everywhere) certifies every pixel exactly when feasible, none otherwise
    c_hat = np.zeros((96, 128), np.uint8)
    for m in (n - 1, n):
        k = np.full((96, 128), m, np.uint16)
        cert = certify(c_hat, k, n=m, sigma=0.25, tau=0.75, alpha=alpha, correction="holm")
        assert cert.num_certified == (pixels if can_certify(m, 0.75, alpha, pixels) else 0)


def test_summary_marks_infeasible_rows_and_says_what_would_certify():
    rec = {
        "image_id": "x",
        "dataset": "d",
        "method": "m",
        "denoiser": "",
        "segmenter": "s",
        "sigma": 0.25,
        "n0": 10,
        "num_classes": 2,
        "ignore_index": 255,
        "height": 96,
        "width": 128,
    }
    from ray_certseg.votes import VoteRecord

    label = np.zeros((96, 128), np.uint8)
    rows = []
    for n in (50, 100):
        vr = VoteRecord(
            **rec,
            n=n,
            seed=0,
            label=label,
            c_hat=label,
            k=np.full((96, 128), n, np.uint16),
            clean_pred=label,
            sample_seconds=1.0,
        )
        rows += image_records.image_rows(vr, image_records.Grid((0.75,), (0.001,), ("holm",)))
    per_image = pd.DataFrame(rows)
    assert per_image["certifiable"].tolist() == [False, True]
    metrics = aggregate.pool_records(per_image)
    assert metrics["infeasible_images"].tolist() == [1, 0]
    text = tables.summary_markdown(metrics)
    assert "0.000 (infeasible)" in text and "1.000 |" in text
    assert "n = 50, tau = 0.75, alpha = 0.001, N = 12288 pixels" in text
    assert "Needs n >= 57" in text and "tau <= 0.721" in text


def test_infeasible_grid_is_named_when_the_config_loads(tmp_path, caplog):
    from ray_certseg.job import preflight

    cfg = JobConfig.from_dict(
        {
            "dataset": {"kind": "manifest", "manifest": "m.csv", "num_classes": 2},
            "models": {"segmenters": {"s": {"kind": "torchscript", "path": "s.pt"}}},
            "methods": {"m": {"segmenter": "s"}},
            "sampling": {"n": 50},
            "certify": {"taus": [0.7, 0.75], "alphas": [0.001]},
        }
    )
    with caplog.at_level(logging.WARNING, logger="ray_certseg"):
        found = preflight.check_feasible(cfg, 96, 128)
    assert len(found) == 1 and "tau=0.75, alpha=0.001: that needs n >= 57, or tau <= 0.721" in found[0]
    assert found[0] in caplog.text


# ----------------------------------------------------------------------------------------------- own code
def test_missing_factory_package_points_at_runtime_env():
    from ray_certseg.models.registry import load_segmenter

    with pytest.raises(ValueError, match=r"No module named 'mine_nets'.*py_modules: \[path/to/mine_nets\]"):
        load_segmenter({"kind": "module", "factory": "mine_nets.net:build", "num_classes": 2})


def test_runtime_env_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    from ray_certseg.config import load_config
    from ray_certseg.job import preflight

    (tmp_path / "mine_nets").mkdir()
    (tmp_path / "mine_nets" / "__init__.py").write_text("")
    config = {
        "dataset": {"kind": "manifest", "manifest": "m.csv", "num_classes": 2},
        "models": {"segmenters": {"s": {"kind": "module", "factory": "mine_nets:build", "num_classes": 2}}},
        "methods": {"m": {"segmenter": "s"}},
        "ray": {"runtime_env": {"py_modules": ["mine_nets"], "env_vars": {"A": 1}}},
    }
    (tmp_path / "job.yaml").write_text(json.dumps(config))
    monkeypatch.chdir("/")
    cfg = load_config(tmp_path / "job.yaml")
    assert cfg.ray.runtime_env == {"py_modules": [str(tmp_path / "mine_nets")], "env_vars": {"A": "1"}}
    preflight.check_runtime_env(cfg)
    assert JobConfig.from_dict(cfg.to_dict(redact=False)).ray.runtime_env == cfg.ray.runtime_env
    config["ray"]["runtime_env"] = {"py_modules": ["not_there"]}
    (tmp_path / "job.yaml").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"ray.runtime_env.py_modules\[0\]: 'not_there' does not exist"):
        preflight.check_runtime_env(load_config(tmp_path / "job.yaml"))
    config["ray"]["runtime_env"] = {"py_module": ["mine_nets"]}
    (tmp_path / "job.yaml").write_text(json.dumps(config))
    with pytest.raises(
        ConfigError, match="unknown key 'ray.runtime_env.py_module' .did you mean 'py_modules'"
    ):
        load_config(tmp_path / "job.yaml")


def test_segformer_loads_without_progress_bars(tmp_path, capfd):
    transformers = pytest.importorskip("transformers")
    from ray_certseg.models.registry import load_segmenter

    config = transformers.SegformerConfig(
        num_labels=3,
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 16, 16],
        num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=16,
    )
    transformers.SegformerForSemanticSegmentation(config).save_pretrained(tmp_path / "sf")
    capfd.readouterr()
    load_segmenter({"kind": "segformer", "path": str(tmp_path / "sf")})
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out


# -------------------------------------------------------------------------------------------------- colours
def test_plots_draw_a_class_named_red_in_red_and_honour_a_palette():
    from matplotlib.colors import to_rgb

    base = {
        "dataset": {
            "kind": "manifest",
            "manifest": "m.csv",
            "num_classes": 3,
            "class_names": ["red", "blue", "road"],
        },
        "models": {"segmenters": {"s": {"kind": "torchscript", "path": "s.pt"}}},
        "methods": {"m": {"segmenter": "s"}},
    }
    assert drawing.palette_of(JobConfig.from_dict(base)) is None  # "road" is no colour: the defaults
    base["dataset"]["class_names"] = ["red", "blue", "green"]
    cfg = JobConfig.from_dict(base)
    rgb = drawing.colourize(np.array([[0, 1, 2]]), 3, 255, drawing.palette_of(cfg))
    np.testing.assert_allclose(rgb[0], [to_rgb("red"), to_rgb("blue"), to_rgb("green")])
    base["dataset"]["palette"] = ["#ff8800", [0, 0, 255], "tab:olive"]
    cfg = JobConfig.from_dict(base)
    assert cfg.dataset.palette == ("#ff8800", "#0000ff", "tab:olive")
    np.testing.assert_allclose(drawing.class_colours(3, drawing.palette_of(cfg))[1], [0, 0, 1])
    base["dataset"]["palette"] = ["red", "blue"]
    with pytest.raises(ConfigError, match="dataset.palette: must be null or a list of 3 colours"):
        JobConfig.from_dict(base)
    base["dataset"]["palette"] = ["red", "blue", "no-such-colour"]
    with pytest.raises(ConfigError, match=r"dataset.palette\[2\]: must be a matplotlib colour"):
        JobConfig.from_dict(base)


def test_example_strip_legend_uses_the_palette():
    label = np.array([[0, 1], [1, 0]], np.uint8)
    row = {
        "image_id": "x",
        "method": "m",
        "sigma": 0.25,
        "n": 10,
        "num_classes": 2,
        "ignore_index": 255,
        "height": 2,
        "width": 2,
        "label": label,
        "clean_pred": label,
        "c_hat": label,
        "k": np.full((2, 2), 10, np.uint16),
    }
    fig = examples.plot_example(
        pd.DataFrame([row]),
        None,
        names=["red", "blue"],
        tau=0.6,
        alpha=0.1,
        correction="holm",
        palette=("red", "blue"),
    )
    handles = fig.legends[0].legend_handles
    assert [h.get_label() for h in handles[:2]] == ["red", "blue"]
    np.testing.assert_allclose(handles[0].get_facecolor()[:3], [1, 0, 0])
    np.testing.assert_allclose(handles[1].get_facecolor()[:3], [0, 0, 1])


def test_load_item_of_a_16bit_image_end_to_end(tmp_path):
    grey16 = np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000
    Image.fromarray(grey16).save(tmp_path / "scan.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "lab.png")
    (tmp_path / "m.csv").write_text("image_path,label_path\nscan.png,lab.png\n")
    cfg = {"kind": "manifest", "manifest": str(tmp_path / "m.csv"), "num_classes": 2}
    item = load_item(list_items(cfg)[0], cfg)
    np.testing.assert_array_equal(item["image"][..., 0], np.round(grey16 / 257.0).astype(np.uint8))


def test_pyproject_license_is_an_spdx_expression():
    """setuptools deprecates the `license = {text = ...}` table (a BuildBackendWarning on every install);
    PEP 639's SPDX string needs setuptools >= 77 in the build requirements."""
    import tomllib

    data = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert isinstance(data["project"]["license"], str) and data["project"]["license"] == "Apache-2.0"
    assert any(r.replace(" ", "").startswith("setuptools>=77") for r in data["build-system"]["requires"])
