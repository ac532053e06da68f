"""Tiny demo architectures: a conv encoder-decoder segmenter and a small diffusers DDPM UNet.

Both are factories (``module:function`` strings in configs) so checkpoints are a state dict + the factory's kwargs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _block(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    """Two (3x3 conv, GroupNorm, ReLU) layers."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(inplace=True),
    )


class TinySegNet(nn.Module):
    """U-Net-style segmenter: 3 scales (w, 2w, 4w channels), bilinear upsampling with skip connections.

    Input: normalised images (B, 3, H, W), H and W divisible by 4. Output: logits (B, num_classes, H, W).
    """

    def __init__(self, num_classes: int, width: int = 24, groups: int = 8) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if width % groups:
            raise ValueError(f"width ({width}) must be divisible by groups ({groups})")
        self.enc1 = _block(3, width, groups)
        self.enc2 = _block(width, 2 * width, groups)
        self.enc3 = _block(2 * width, 4 * width, groups)
        self.dec2 = _block(4 * width + 2 * width, 2 * width, groups)
        self.dec1 = _block(2 * width + width, width, groups)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"TinySegNet needs H and W divisible by 4, got {tuple(x.shape[-2:])}")
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0, mode="bilinear"), e2], dim=1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="bilinear"), e1], dim=1))
        return self.head(d1)


def tiny_segnet(num_classes: int, width: int = 24) -> TinySegNet:
    """Factory for the demo segmenter (width 24: about 0.27M parameters for 7 classes)."""
    return TinySegNet(num_classes, width=width)


def tiny_ddpm_unet(sample_size: int = 64, width: int = 32):
    """Factory for the demo denoiser: a diffusers ``UNet2DModel`` predicting epsilon (about 1M parameters at width 32).

    Three resolutions (w, 2w, 2w channels), one ResNet layer per block, self-attention at the lowest resolution.
    """
    from diffusers import UNet2DModel

    if width % 8:
        raise ValueError(f"width must be a multiple of 8 (GroupNorm with 8 groups), got {width}")
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(width, 2 * width, 2 * width),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
    )
