"""Model kinds: each spec checked against its kind's pydantic model on the driver (key path, expected, given,
"did you mean"), and a kind registered from outside the package validated and built like the shipped ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import Field
from torch import nn

from ray_certseg.config import ConfigError, load_config
from ray_certseg.models import registry, specs

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo.yaml"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "models.segmenters.clean.weigths=x",
            "unknown key 'models.segmenters.clean.weigths' (did you mean 'weights'?)",
        ),
        (
            "models.segmenters.clean.num_classes=0",
            "models.segmenters.clean.num_classes: input should be greater than or equal to 1, got 0",
        ),
        (
            "models.denoisers.ddpm.multistep='2'",
            "models.denoisers.ddpm.multistep: input should be a valid integer, got '2'",
        ),
        (
            "models.denoisers.ddpm.resolution=tiles",
            "models.denoisers.ddpm.resolution: input should be 'native', 'tile' or 'resize', got 'tiles'",
        ),
        (
            "models.segmenters.clean.mean=[0.5,0.5]",
            "models.segmenters.clean.mean: list should have at least 3 items after validation, not 2, got [0.5, 0.5]",
        ),
    ],
)
def test_a_bad_model_spec_is_named_on_the_driver(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    assert str(err.value) == message


def test_every_shipped_config_passes_its_spec_models():
    for name in ("demo.yaml", "paper_cityscapes.yaml", "paper_pascal_context.yaml"):
        cfg = load_config(REPO / "configs" / name)
        for group in registry.GROUPS:
            for key, spec in getattr(cfg.models, group).items():
                assert registry.check_spec(group, f"models.{group}.{key}", spec).kind == spec["kind"]


class ThresholdSpec(specs.SegmenterSpec):
    kind: str = "toy-threshold"
    num_classes: int = Field(2, ge=2, le=2)
    level: float = 0.5


class Threshold(nn.Module):
    """Two classes: the mean channel above ``level`` or not."""

    def __init__(self, level: float) -> None:
        super().__init__()
        self.level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        above = (x.mean(1, keepdim=True) > self.level).float()
        return torch.cat([1 - above, above], dim=1)


def build_threshold(spec):
    return Threshold(spec.get("level", 0.5)), 2, (None, None)


def test_a_kind_registered_from_a_test_file_validates_and_builds(monkeypatch):
    monkeypatch.setitem(
        registry.KINDS["segmenters"], "toy-threshold", registry.Kind(ThresholdSpec, build_threshold)
    )
    with pytest.raises(ValueError, match=r"models\.segmenters\.toy\.levle' \(did you mean 'level'\?\)"):
        registry.check_spec("segmenters", "models.segmenters.toy", {"kind": "toy-threshold", "levle": 0.2})
    seg = registry.load_segmenter({"kind": "toy-threshold", "level": 0.25, "name": "toy"})
    x = torch.full((1, 3, 4, 4), 0.3)
    assert seg.name == "toy" and seg(x).argmax(1).eq(1).all()
    with pytest.raises(ValueError, match="unknown keys"):
        registry.load_segmenter({"kind": "toy-threshold", "levle": 0.2})
    monkeypatch.delitem(registry.KINDS["segmenters"], "toy-threshold")
    with pytest.raises(ValueError, match="unknown segmenter kind 'toy-threshold'"):
        registry.load_segmenter({"kind": "toy-threshold"})


def test_the_job_refuses_a_misspelled_model_key_before_ray_starts(tmp_path):
    done = _job(tmp_path, "models.segmenters.clean.weigths=x")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "ray-certseg: error: unknown key 'models.segmenters.clean.weigths' (did you mean 'weights'?)"
    ]
    assert not (tmp_path / "out").exists()  # nothing was started or written


def test_the_job_refuses_a_missing_weights_file_before_ray_starts(tmp_path):
    done = _job(tmp_path, f"models.segmenters.clean.weights={tmp_path / 'nowhere.safetensors'}")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(
        f"ray-certseg: error: models.segmenters.clean.weights: '{tmp_path}/nowhere.safetensors' "
        "does not exist"
    )
    assert not (tmp_path / "out").exists()


# --- models built on the driver without their weights (meta device, checkpoint headers) ----------------


def _job(tmp_path, *overrides):
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "certify.py"), "--config", str(DEMO)]
        + ["--output", str(tmp_path / "out")]
        + [arg for override in overrides for arg in ("--set", override)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_job_refuses_a_model_that_cannot_be_built_before_ray_starts(tmp_path):
    done = _job(tmp_path, "models.segmenters.clean.kwargs.width=4")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "ray-certseg: error: models.segmenters.clean: ValueError: width (4) must be divisible by groups (8)"
    ]
    assert not (tmp_path / "out").exists()


def test_the_job_refuses_weights_that_do_not_fit_the_model_before_ray_starts(tmp_path):
    done = _job(tmp_path, "models.segmenters.noise.kwargs.width=16")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("ray-certseg: error: models.segmenters.noise: ValueError: weights ")
    assert "segmenter_noise/model.safetensors do not fit the module model: 31 mis-shaped (first: " in line
    assert "dec1.0.weight: (24, 72, 3, 3) in the file, (16, 48, 3, 3) in the model" in line
    assert not (tmp_path / "out").exists()


def _module_spec(weights, **kwargs):
    return {
        "kind": "module",
        "factory": "ray_certseg.models.tiny:tiny_segnet",
        "kwargs": {"num_classes": 3, "width": 8, **kwargs},
        "weights": str(weights),
        "num_classes": 3,
    }


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_the_module_check_reads_names_and_shapes_as_the_build_does(tmp_path, suffix):
    from safetensors.torch import save_file

    from ray_certseg.models.segmenters import build_module
    from ray_certseg.models.tiny import tiny_segnet

    state = tiny_segnet(3, width=8).state_dict()
    path = tmp_path / f"w{suffix}"
    (torch.save if suffix == ".pt" else save_file)({"model." + k: v for k, v in state.items()}, str(path))
    kind = registry.KINDS["segmenters"]["module"]
    good = {**_module_spec(path), "strip_prefix": "model."}
    kind.preflight(good)
    build_module(good)  # what the check passed, the build loads
    for bad, pattern in [
        (
            _module_spec(path),
            r"3\d missing keys \(first: dec1\.0\.weight.*3\d unexpected keys \(first: model\.",
        ),
        (
            {**good, "kwargs": {"num_classes": 4, "width": 8}},
            r"2 mis-shaped \(first: head\.bias: \(3,\) in the file, \(4,\)",
        ),
    ]:
        with pytest.raises(ValueError, match=pattern):
            kind.preflight(bad)
        with pytest.raises(ValueError, match="do not fit"):
            build_module(bad)


def test_the_adm_check_finds_what_the_loader_refuses_without_reading_tensors():
    import json

    data = REPO / "tests" / "data" / "adm"
    flags = json.loads((data / "adm_small_flags.json").read_text())
    spec = {"kind": "adm", "checkpoint": str(data / "adm_small.pt"), "flags": flags}
    kind = registry.KINDS["denoisers"]["adm"]
    kind.preflight(spec)
    wrong = {**spec, "flags": {**flags, "learn_sigma": False}}
    with pytest.raises(
        ValueError, match=r"out\.2\.weight: checkpoint \(6, 32, 3, 3\) vs model \(3, 32, 3, 3\)"
    ):
        kind.preflight(wrong)
    with pytest.raises(ValueError, match="class_cond ADM checkpoints need class labels"):
        kind.preflight({**spec, "flags": {**flags, "class_cond": True}})


def test_the_diffusers_check_finds_a_config_that_does_not_fit_its_weights(tmp_path):
    import json
    import shutil

    folder = tmp_path / "ddpm"
    shutil.copytree(REPO / "assets" / "demo" / "models" / "ddpm", folder)
    kind = registry.KINDS["denoisers"]["diffusers"]
    kind.preflight({"kind": "diffusers", "path": str(folder)})
    config = folder / "unet" / "config.json"
    saved = config.read_text()
    config.write_text(json.dumps({**json.loads(saved), "block_out_channels": [16, 32, 32]}))
    with pytest.raises(
        ValueError, match=r"weights do not fit its config\.json: 0 missing tensors .*mis-shaped"
    ):
        kind.preflight({"kind": "diffusers", "path": str(folder)})
    config.write_text(saved)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no diffusion_pytorch_model.safetensors"):
        kind.preflight({"kind": "diffusers", "path": str(folder)})
