"""Segmenter wrapper and adapters: each loads a tiny model from disk; pickles needing code are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from ray_certseg.models.registry import load_segmenter
from ray_certseg.models.segmenters import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Segmenter,
    load_state_dict,
)

CONV_SPEC = {
    "kind": "module",
    "factory": "torch.nn:Conv2d",
    "num_classes": 4,
    "kwargs": {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": 1},
}


class Strided(nn.Module):
    """Logits at half resolution (like most segmentation nets before their final upsampling)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class NotWeightsOnly:
    """Any custom class makes a pickle that weights_only loading must refuse."""


def test_segmenter_normalises_and_upsamples():
    torch.manual_seed(0)
    net = Strided()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    seg = Segmenter(net, num_classes=5, mean=mean, std=std, name="strided")
    x = torch.rand(2, 3, 15, 22)
    with torch.no_grad():
        out = seg(x)
        normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        expected = F.interpolate(net(normalised), size=(15, 22), mode="bilinear", align_corners=False)
    assert out.shape == (2, 5, 15, 22)
    torch.testing.assert_close(out, expected)
    plain = Segmenter(net, num_classes=5)
    with torch.no_grad():
        assert not torch.allclose(plain(x), out)


class SeesSize(nn.Module):
    """Records the input size it sees; 1x1 conv logits at that size."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv, self.sizes = nn.Conv2d(3, num_classes, 1), []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return self.conv(x)


def test_input_scale_resizes_inside_f_as_segcertify():
    """SegCertify's scale: normalise, bilinear resize to (round(H s), round(W s)) without antialiasing, net,
    bilinear upsampling of the logits back to H x W (method.md 1.3); votes stay at full resolution."""
    torch.manual_seed(1)
    net = SeesSize()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    seg = Segmenter(net, num_classes=4, mean=mean, std=std, input_scale=0.25)
    x = torch.rand(2, 3, 16, 30)
    with torch.no_grad():
        out = seg(x)
        normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        small = F.interpolate(normalised, size=(4, 8), mode="bilinear", align_corners=False, antialias=False)
        expected = F.interpolate(net(small), size=(16, 30), mode="bilinear", align_corners=False)
    assert net.sizes[0] == (4, 8) and out.shape == (2, 4, 16, 30)  # round(30 / 4) = 8
    torch.testing.assert_close(out, expected)
    fixed = Segmenter(net, num_classes=4, input_size=(5, 7))
    with torch.no_grad():
        assert fixed(x).shape == (2, 4, 16, 30) and net.sizes[-1] == (5, 7)
    with pytest.raises(ValueError, match="not both"):
        Segmenter(net, num_classes=4, input_scale=0.5, input_size=(5, 7))
    with pytest.raises(ValueError, match="input_scale"):
        Segmenter(net, num_classes=4, input_scale=0)


def test_input_scale_spec_key_and_full_resolution_votes():
    """From a spec: the key is accepted and named in the model's hash; count_votes then certifies at the image's
    own resolution, while the network runs at the reduced one."""
    from ray_certseg.sampling import count_votes

    base = load_segmenter(CONV_SPEC)
    scaled = load_segmenter({**CONV_SPEC, "input_scale": 0.5})
    assert scaled.input_scale == 0.5 and scaled.network_size(12, 10) == (6, 5) and scaled.name != base.name
    sized = load_segmenter({**CONV_SPEC, "input_size": [3, 4]})
    assert sized.network_size(12, 10) == (3, 4)
    image = torch.rand(3, 12, 10)
    v = count_votes(image, scaled, sigma=0.25, n0=2, n=3, num_classes=4, batch_size=5, seed=0)
    assert v.c_hat.shape == (12, 10) and v.clean_pred.shape == (12, 10)


def test_segmenter_rejects_bad_shapes_and_options():
    seg = Segmenter(Strided(5), num_classes=4)
    with pytest.raises(ValueError, match=r"logits \(B, 4, h, w\)"):
        seg(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        Segmenter(Strided(), num_classes=5)(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="both mean and std"):
        Segmenter(Strided(), num_classes=5, mean=IMAGENET_MEAN)
    with pytest.raises(ValueError, match="3 values"):
        Segmenter(Strided(), num_classes=5, mean=(0.5,), std=(0.5,))
    with pytest.raises(TypeError, match="callable"):
        Segmenter("net", num_classes=5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_module_adapter_loads_weights(tmp_path, suffix):
    torch.manual_seed(1)
    ref = nn.Conv2d(3, 4, 3, padding=1)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(ref.state_dict(), str(path))
    else:
        torch.save(ref.state_dict(), path)
    seg = load_segmenter(
        {**CONV_SPEC, "weights": str(path), "mean": [0.5] * 3, "std": [0.25] * 3},
        device="cpu",
        dtype=torch.float32,
    )
    assert seg.num_classes == 4 and seg.name.startswith("w-") and not seg.training
    x = torch.rand(2, 3, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(seg(x), ref((x - 0.5) / 0.25))


def test_module_adapter_nested_checkpoint_and_mismatch(tmp_path):
    torch.manual_seed(2)
    ref = nn.Conv2d(3, 4, 3, padding=1)
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    seg = load_segmenter(
        {**CONV_SPEC, "weights": str(path), "state_dict_key": "model", "strip_prefix": "module."},
        device="cpu",
        dtype=torch.float32,
    )
    torch.testing.assert_close(seg.net.weight, ref.weight)
    with pytest.raises(ValueError, match="state_dict_key"):
        load_segmenter({**CONV_SPEC, "weights": str(path)}, device="cpu", dtype=torch.float32)
    wrong = tmp_path / "wrong.safetensors"
    save_file(nn.Conv2d(3, 2, 1).state_dict(), str(wrong))
    with pytest.raises(ValueError, match="do not fit"):
        load_segmenter({**CONV_SPEC, "weights": str(wrong)}, device="cpu", dtype=torch.float32)


def test_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(1), "extra": NotWeightsOnly()}, path)
    with pytest.raises(ValueError, match="safetensors"):
        load_state_dict(path)
    with pytest.raises(ValueError, match="needs code execution"):
        load_segmenter({**CONV_SPEC, "weights": str(path)}, device="cpu", dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict(tmp_path / "missing.safetensors")
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown extension"):
        load_state_dict(tmp_path / "model.onnx")


def test_torchscript_adapter(tmp_path):
    torch.manual_seed(3)
    net = Strided(3).eval()
    path = tmp_path / "seg.pt"
    torch.jit.save(torch.jit.trace(net, torch.rand(1, 3, 16, 16)), str(path))
    seg = load_segmenter(
        {"kind": "torchscript", "path": str(path), "num_classes": 3}, device="cpu", dtype="float32"
    )
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        expected = F.interpolate(net(x), size=(16, 16), mode="bilinear", align_corners=False)
        torch.testing.assert_close(seg(x), expected)
    with pytest.raises(ValueError, match="num_classes"):
        load_segmenter({"kind": "torchscript", "path": str(path)}, device="cpu", dtype=torch.float32)


def test_bfloat16_load_accepts_float32_images(tmp_path):
    seg = load_segmenter(CONV_SPEC, device="cpu", dtype=torch.bfloat16)
    assert seg.net.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert seg(torch.rand(1, 3, 8, 8)).shape == (1, 4, 8, 8)


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ({"kind": "onnx"}, ValueError, "unknown segmenter kind"),
        ({**CONV_SPEC, "weight": "x"}, ValueError, "unknown keys"),
        ({**CONV_SPEC, "factory": "torch.nn.Conv2d"}, ValueError, "package.module:callable"),
        ({**CONV_SPEC, "factory": "torch.nn:NoSuchLayer"}, ValueError, "cannot import"),
        ({**CONV_SPEC, "factory": "builtins:dict"}, TypeError, "not a torch.nn.Module"),
        ({**CONV_SPEC, "weights": "w.onnx"}, FileNotFoundError, "does not exist"),
        (
            {"kind": "torchscript", "path": "/nonexistent/seg.pt", "num_classes": 2},
            FileNotFoundError,
            "does not exist",
        ),
    ],
)
def test_load_segmenter_errors(spec, error, match):
    with pytest.raises(error, match=match):
        load_segmenter(spec, device="cpu", dtype=torch.float32)


def test_torchvision_adapter(tmp_path):
    models = pytest.importorskip("torchvision.models.segmentation")
    torch.manual_seed(4)
    ref = models.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3).eval()
    path = tmp_path / "lraspp.safetensors"
    save_file(ref.state_dict(), str(path))
    seg = load_segmenter(
        {"kind": "torchvision", "arch": "lraspp_mobilenet_v3_large", "num_classes": 3, "weights": str(path)},
        device="cpu",
        dtype=torch.float32,
    )
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        normalised = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
            1, 3, 1, 1
        )
        torch.testing.assert_close(seg(x), ref(normalised)["out"])


def test_segformer_adapter(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    config = transformers.SegformerConfig(
        num_labels=3,
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 16, 16],
        num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=16,
    )
    ref = transformers.SegformerForSemanticSegmentation(config).eval()
    ref.save_pretrained(tmp_path / "segformer")
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.3, 0.4]
    (tmp_path / "segformer" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": mean, "image_std": std})
    )
    seg = load_segmenter(
        {"kind": "segformer", "path": str(tmp_path / "segformer")}, device="cpu", dtype=torch.float32
    )
    assert seg.num_classes == 3
    x = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        logits = ref(
            pixel_values=(x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        ).logits
        assert logits.shape[-2:] == (16, 12)
        torch.testing.assert_close(
            seg(x), F.interpolate(logits, size=(64, 48), mode="bilinear", align_corners=False)
        )
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_segmenter({"kind": "segformer", "path": str(tmp_path)}, device="cpu", dtype=torch.float32)
