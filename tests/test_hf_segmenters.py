"""``kind: transformers``: semantic (UperNet) and universal (Mask2Former) folders built from tiny random configs,
no hub; the label maps equal transformers' own ``post_process_semantic_segmentation``; the driver-side check."""

from __future__ import annotations

import json

import pytest
import torch

from ray_certseg.models.hf_segmenters import check_transformers
from ray_certseg.models.registry import load_segmenter

transformers = pytest.importorskip("transformers")
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def save(model, folder, processor_mean=MEAN, processor_std=STD):
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": processor_mean, "image_std": processor_std})
    )
    return {"kind": "transformers", "path": str(folder)}


def normalised(x):
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def upernet(num_labels=4):
    torch.manual_seed(0)
    backbone = transformers.ConvNextConfig(
        hidden_sizes=[8, 16, 16, 16],
        depths=[1, 1, 1, 1],
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = transformers.UperNetConfig(
        backbone_config=backbone,
        hidden_size=16,
        use_auxiliary_head=False,
        num_labels=num_labels,
        pool_scales=[1, 2],
    )
    return transformers.UperNetForSemanticSegmentation(config).eval()


def mask2former():
    torch.manual_seed(0)
    backbone = transformers.SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = transformers.Mask2FormerConfig(
        backbone_config=backbone,
        num_labels=3,
        hidden_dim=32,
        num_queries=5,
        encoder_layers=1,
        decoder_layers=2,
        dim_feedforward=32,
        encoder_feedforward_dim=32,
        mask_feature_size=32,
        feature_size=32,
        num_attention_heads=2,
        use_timm_backbone=False,
    )
    return transformers.Mask2FormerForUniversalSegmentation(config).eval()


def label_maps(net, folder, x, post_process, num_classes):
    """(the segmenter's argmax, the processor's label maps) for images x, after the driver-side check."""
    spec = save(net, folder)
    check_transformers(spec)
    seg = load_segmenter(spec)
    with torch.no_grad():
        scores = seg(x)
        outputs = net(pixel_values=normalised(x))
    assert seg.num_classes == num_classes and scores.shape == (x.shape[0], num_classes, *x.shape[-2:])
    return scores.argmax(1), torch.stack(post_process(outputs))


def test_a_semantic_folder_gives_logits_whose_argmax_is_the_processors(tmp_path):
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    processor = transformers.SegformerImageProcessor()
    post = lambda outputs: processor.post_process_semantic_segmentation(outputs, target_sizes=[(64, 48)] * 2)
    got, expected = label_maps(upernet(), tmp_path / "upernet", x, post, num_classes=4)
    assert torch.equal(got, expected)


def test_a_universal_folder_gives_class_scores_whose_argmax_is_the_processors(tmp_path):
    """Mask2Former at its processor's 384 x 384 input: softmax classes (no null class) times sigmoid masks,
    summed over queries; the argmax is post_process_semantic_segmentation's map."""
    x = torch.rand(1, 3, 384, 384, generator=torch.Generator().manual_seed(2))
    post = transformers.Mask2FormerImageProcessorPil().post_process_semantic_segmentation
    got, expected = label_maps(mask2former(), tmp_path / "m2f", x, post, num_classes=3)
    assert torch.equal(got, expected)


def test_segformer_is_an_alias_and_the_driver_check_finds_weights_of_another_config(tmp_path):
    spec = save(upernet(num_labels=4), tmp_path / "a")
    alias = load_segmenter({**spec, "kind": "segformer"})
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(alias(x), load_segmenter(spec)(x))
    other = upernet(num_labels=6).config
    other.save_pretrained(tmp_path / "a")  # config.json of a 6-class head beside 4-class weights
    with pytest.raises(ValueError, match="does not fit its config.json"):
        check_transformers(spec)
