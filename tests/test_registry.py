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
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "certify.py"),
            "--config",
            str(DEMO),
            "--output",
            str(tmp_path / "out"),
            "--set",
            "models.segmenters.clean.weigths=x",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "ray-certseg: error: unknown key 'models.segmenters.clean.weigths' (did you mean 'weights'?)"
    ]
    assert not (tmp_path / "out").exists()  # nothing was started or written


def test_the_job_refuses_a_missing_weights_file_before_ray_starts(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "certify.py"),
            "--config",
            str(DEMO),
            "--output",
            str(tmp_path / "out"),
            "--set",
            f"models.segmenters.clean.weights={tmp_path / 'nowhere.safetensors'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(
        f"ray-certseg: error: models.segmenters.clean.weights: '{tmp_path}/nowhere.safetensors' "
        "does not exist"
    )
    assert not (tmp_path / "out").exists()
