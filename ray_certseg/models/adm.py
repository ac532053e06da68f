"""OpenAI guided-diffusion (ADM) UNet, written from its published description, and a checkpoint loader.

The seed paper (Laousy et al. 2023), Carlini et al. 2023 and DensePure denoise with guided-diffusion's
256x256 unconditional model ``256x256_diffusion_uncond.pt``, which diffusers cannot load. :class:`ADMUNet`
rebuilds that architecture (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis",
section 3 and appendix) with guided-diffusion's own flag and parameter names, so the official ``state_dict``
loads strictly::

    model = ADMUNet(**flags)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

Architecture (ds = downsampling factor of the current feature map, attention where ds is in
``{image_size // r for r in attention_resolutions}``):

- timestep embedding: sinusoidal features [cos(t w_i), sin(t w_i)], w_i = 10000^(-i/half), then
  Linear(C, 4C) -> SiLU -> Linear(4C, 4C), C = ``num_channels``;
- encoder: a 3x3 conv, then per level ``num_res_blocks`` residual blocks (+ attention), and between levels a
  down-sampling residual block (``resblock_updown``) or a strided 3x3 conv;
- middle: residual block, attention, residual block;
- decoder: per level ``num_res_blocks + 1`` residual blocks on [h, skip] concatenations (+ attention), with an
  up-sampling residual block (or nearest x2 + 3x3 conv) closing every level but the last;
- output: GroupNorm -> SiLU -> 3x3 conv to 3 channels (epsilon), or 6 with ``learn_sigma`` (epsilon,
  variance).

Residual block: h = conv(SiLU(GN(x))); with ``use_scale_shift_norm`` h = GN(h) (1 + s) + b where (s, b) =
Linear(SiLU(emb)), else h = GN(h + Linear(SiLU(emb))); then conv(Dropout(SiLU(.))); output skip(x) + h.
GroupNorm (32 groups) always computes in float32. The forward pass computes these functions with fewer
kernels than guided-diffusion's code (the scale-shift inside the GroupNorm kernel, residual adds inside the
skip convolution's matrix product or broadcast over up-sampled blocks: ``GroupNorm32.modulated``,
``ResBlock._residual``); the same state_dict gives the same outputs to float32 rounding.
Attention: softmax(q^T k / sqrt(d)) v per head, d = head channels; ``use_new_attention_order=False`` (the
released checkpoints) lays the 1x1-conv qkv channels out per head as [q_h, k_h, v_h], ``True`` as
[q_1..q_H, k_1..k_H, v_1..v_H].

Weights are not initialised as in training (the zero-initialised output convolutions of the paper are
irrelevant here): every parameter comes from a checkpoint.
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ADM_PRESETS",
    "ADMUNet",
    "load_adm_checkpoint",
    "load_adm_unet",
]

#: Flags of the released checkpoints (guided-diffusion README, "MODEL_FLAGS").
ADM_PRESETS: dict[str, dict[str, Any]] = {
    "256x256_uncond": {
        "image_size": 256,
        "num_channels": 256,
        "num_res_blocks": 2,
        "channel_mult": "",
        "attention_resolutions": "32,16,8",
        "num_heads": 1,  # overridden by num_head_channels
        "num_head_channels": 64,
        "num_heads_upsample": -1,
        "use_scale_shift_norm": True,
        "resblock_updown": True,
        "learn_sigma": True,
        "class_cond": False,
        "use_new_attention_order": False,
        "dropout": 0.0,
        "use_fp16": True,
        "use_checkpoint": False,
    },
}

#: guided-diffusion's default channel multipliers when ``channel_mult`` is "".
_DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

#: Diffusion-process flags of guided-diffusion's scripts that may sit beside the model flags in a flags file.
_DIFFUSION_FLAGS = frozenset(
    {
        "diffusion_steps",
        "noise_schedule",
        "timestep_respacing",
        "use_kl",
        "predict_xstart",
        "rescale_timesteps",
        "rescale_learned_sigmas",
    }
)

_NUM_CLASSES = 1000  # ImageNet, for class_cond checkpoints

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colour codes in torch's error messages


def parse_channel_mult(
    channel_mult: str | tuple[float, ...] | list[float], image_size: int
) -> tuple[float, ...]:
    """Channel multipliers per level: "1,1,2,2,4,4", a tuple, or "" for guided-diffusion's default."""
    if isinstance(channel_mult, str):
        if channel_mult.strip() == "":
            if image_size not in _DEFAULT_CHANNEL_MULT:
                raise ValueError(
                    f"channel_mult='' has no default for image_size={image_size} (defaults exist for "
                    f"{sorted(_DEFAULT_CHANNEL_MULT)}); give channel_mult explicitly, e.g. '1,1,2,2,4,4'"
                )
            return _DEFAULT_CHANNEL_MULT[image_size]
        try:
            mult = tuple(float(m) if "." in m else int(m) for m in channel_mult.split(","))
        except ValueError as err:
            raise ValueError(
                f"channel_mult={channel_mult!r} must be comma-separated numbers like '1,2,2'"
            ) from err
    else:
        mult = tuple(channel_mult)
    if not mult or any(m <= 0 for m in mult):
        raise ValueError(f"channel_mult={channel_mult!r} must hold at least one positive multiplier")
    return mult


def parse_attention_resolutions(
    attention_resolutions: str | tuple[int, ...] | list[int], image_size: int
) -> frozenset[int]:
    """Downsampling factors ds = image_size // r with attention, for resolutions r as "32,16,8" or a tuple."""
    if isinstance(attention_resolutions, str):
        parts = [p for p in attention_resolutions.split(",") if p.strip()]
        try:
            resolutions = [int(p) for p in parts]
        except ValueError as err:
            raise ValueError(
                f"attention_resolutions={attention_resolutions!r} must be comma-separated integers "
                "like '32,16,8'"
            ) from err
    else:
        resolutions = [int(r) for r in attention_resolutions]
    if any(r <= 0 or image_size % r for r in resolutions):
        raise ValueError(
            f"attention_resolutions={attention_resolutions!r}: every resolution must divide "
            f"image_size={image_size}"
        )
    return frozenset(image_size // r for r in resolutions)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): [cos(t w_i), sin(t w_i)], w_i = max_period^(-i/half).

    i < half = dim // 2; an odd ``dim`` gets a trailing zero column.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, statistics in float32, returned in the input's dtype.

    guided-diffusion casts a half input to float32, normalises and casts back: two extra kernels and float32
    traffic. On the devices of ``NATIVE_HALF_DEVICES`` (CUDA, whose group_norm kernel accumulates half inputs
    in float32: its ``acc_type``) a half input goes to the kernel as is, with the affine parameters in its
    dtype; the output is rounded to half once either way. Elsewhere (CPU) the float32 round trip stays."""

    NATIVE_HALF_DEVICES: frozenset[str] = frozenset({"cuda"})

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float16, torch.bfloat16) and x.device.type in self.NATIVE_HALF_DEVICES:
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(
            x.dtype
        )

    def modulated(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """GN(x) (1 + scale) + shift with per-sample scale, shift (B, C), in one group_norm kernel.

        Group normalisation of the (1, B C, ...) view with 32 B groups is group normalisation of each sample (a
        group never spans two samples), and its per-channel affine then is per (sample, channel):

            GN(x)_bc (1 + s_bc) + t_bc = xhat_bc gamma_c (1 + s_bc) + beta_c (1 + s_bc) + t_bc

        so weight = gamma (1 + s) and bias = beta (1 + s) + t, made in float32 (B C numbers). That saves
        the separate scale-shift kernel, a read and a write of the whole activation. The output is rounded to
        x's dtype once (guided-diffusion rounds GN(x) first, then computes the scale-shift in that dtype)."""
        b, c = x.shape[:2]
        one_plus = 1 + scale.float()
        weight = (self.weight.float() * one_plus).reshape(-1)
        bias = (self.bias.float() * one_plus + shift.float()).reshape(-1)
        grouped = x.reshape(1, b * c, *x.shape[2:])
        if x.dtype in (torch.float16, torch.bfloat16) and x.device.type in self.NATIVE_HALF_DEVICES:
            y = F.group_norm(grouped, b * self.num_groups, weight.to(x.dtype), bias.to(x.dtype), self.eps)
        else:
            y = F.group_norm(grouped.float(), b * self.num_groups, weight, bias, self.eps).to(x.dtype)
        return y.view_as(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, optionally followed by a 3x3 conv (parameter name ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """Halve H and W: a strided 3x3 conv, or 2x2 average pooling (parameter name ``op``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.op: nn.Module = (
            nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)
            if use_conv
            else nn.AvgPool2d(kernel_size=2, stride=2)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding, optionally resampling (up or down) both paths."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int,
        *,
        use_scale_shift_norm: bool,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.resample: nn.Module | None = (
            Upsample(channels, use_conv=False)
            if up
            else Downsample(channels, use_conv=False)
            if down
            else None
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.resample is None:
            h = self.in_layers(x)
        else:  # resample after norm + SiLU, before the conv; the skip path is resampled alike (in _residual)
            h = self.in_layers[-1](self.resample(self.in_layers[:-1](x)))
        emb_out = self.emb_layers(emb)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0].modulated(h, scale, shift)  # GN(h) (1 + scale) + shift: one kernel
        else:
            h = self.out_layers[0](h + emb_out.to(h.dtype)[:, :, None, None])
        return self._residual(x, self.out_layers[2](self.out_layers[1](h)))

    def _residual(self, x: Tensor, h: Tensor) -> Tensor:
        """skip(resample(x)) + conv_out(h), the last convolution and the residual add without a kernel of
        their own for the add where eager allows:

        * a 1x1 skip convolution W_s: one batched matrix product with the add as its input,
          baddbmm(conv(h; W, b + b_s), W_s, x) = conv(h; W, b) + (W_s x + b_s);
        * nearest-neighbour up-sampling of an identity skip: the add broadcasts x over each 2 x 2 block of the
          output instead of materialising up(x) (the same sums);
        * otherwise (identity, or an average-pooled identity) an add.
        """
        conv = self.out_layers[3]
        skip = self.skip_connection
        if isinstance(skip, nn.Conv2d) and self.resample is None and x.is_contiguous():
            out = F.conv2d(h, conv.weight, conv.bias + skip.bias, padding=1)
            b, c_out = out.shape[:2]
            weight = skip.weight.reshape(1, c_out, -1).expand(b, -1, -1)
            return torch.baddbmm(out.reshape(b, c_out, -1), weight, x.reshape(b, x.shape[1], -1)).view_as(out)
        out = conv(h)
        if isinstance(self.resample, Upsample) and isinstance(skip, nn.Identity):
            b, c, height, width = x.shape
            blocks = out.view(b, c, height, 2, width, 2) + x[:, :, :, None, :, None]
            return blocks.view_as(out)
        if self.resample is not None:
            x = self.resample(x)
        return skip(x) + out


class AttentionBlock(nn.Module):
    """Spatial self-attention over the H*W positions: x + proj_out(Attention(qkv(GN(x))))."""

    def __init__(
        self, channels: int, num_heads: int, num_head_channels: int, use_new_attention_order: bool
    ) -> None:
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"num_head_channels={num_head_channels} must divide the {channels} channels of an "
                    "attention block"
                )
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide the {channels} channels of an attention block"
            )
        self.new_order = use_new_attention_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def attention(self, qkv: Tensor) -> Tensor:
        """(B, 3*H*d, L) -> (B, H*d, L): softmax(q^T k / sqrt(d)) v per head, in either channel layout.

        q, k and v reach ``scaled_dot_product_attention`` as (B, H, L, d) with unit stride in d (one copy of qkv
        into positions-major order): the fused flash and memory-efficient kernels require that, and with a
        d-stride of L (the 1x1 conv's channels-major output transposed) attention falls back to the math path."""
        b, width, length = qkv.shape
        h = self.num_heads
        d = width // (3 * h)
        rows = qkv.transpose(1, 2)  # (B, L, 3*H*d)
        if self.new_order:  # [q_1..q_H, k_1..k_H, v_1..v_H]
            q, k, v = rows.reshape(b, length, 3, h, d).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
        else:  # per head [q_h, k_h, v_h]
            q, k, v = rows.reshape(b, length, h, 3, d).permute(3, 0, 2, 1, 4).contiguous().unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, d)
        return a.permute(0, 1, 3, 2).reshape(b, h * d, length)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class EmbedSequential(nn.Sequential):
    """A sequence of layers; residual blocks also receive the timestep embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADMUNet(nn.Module):
    """guided-diffusion's ``UNetModel`` as built by its ``create_model(**flags)``; ``forward(x, t)``.

    Flags keep guided-diffusion's names and meanings. ``use_fp16`` is recorded (see
    :meth:`convert_blocks_to`) and ``use_checkpoint`` (gradient checkpointing, a training option) is accepted
    and ignored. Input: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (B, 3, H, W), x_0 in [-1, 1]; H and W
    must be multiples of ``2 ** (len(channel_mult) - 1)`` (:attr:`multiple_of`). Output: (B, 3, H, W)
    predicted epsilon, or (B, 6, H, W) (epsilon, variance interpolation) with ``learn_sigma``.
    """

    def __init__(
        self,
        image_size: int,
        num_channels: int,
        num_res_blocks: int,
        channel_mult: str | tuple[float, ...] = "",
        learn_sigma: bool = False,
        class_cond: bool = False,
        use_checkpoint: bool = False,
        attention_resolutions: str | tuple[int, ...] = "16",
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        dropout: float = 0.0,
        resblock_updown: bool = False,
        use_fp16: bool = False,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        del use_checkpoint  # training-time memory option; no effect on the function computed
        self.image_size = int(image_size)
        self.model_channels = int(num_channels)
        self.channel_mult = parse_channel_mult(channel_mult, self.image_size)
        self.attention_ds = parse_attention_resolutions(attention_resolutions, self.image_size)
        self.out_channels = 6 if learn_sigma else 3
        self.num_classes = _NUM_CLASSES if class_cond else None
        self.use_fp16 = bool(use_fp16)
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        emb_ch = 4 * self.model_channels

        def res(ch_in: int, ch_out: int, **resample: bool) -> ResBlock:
            return ResBlock(
                ch_in, emb_ch, dropout, ch_out, use_scale_shift_norm=use_scale_shift_norm, **resample
            )

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, num_head_channels, use_new_attention_order)

        self.time_embed = nn.Sequential(
            nn.Linear(self.model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)
        )
        if self.num_classes is not None:
            self.label_emb = nn.Embedding(self.num_classes, emb_ch)

        ch = input_ch = int(self.channel_mult[0] * self.model_channels)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(3, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * self.model_channels))]
                ch = int(mult * self.model_channels)
                if ds in self.attention_ds:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, use_conv=True)
                self.input_blocks.append(EmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(mult * self.model_channels))]
                ch = int(mult * self.model_channels)
                if ds in self.attention_ds:
                    layers.append(attn(ch, heads_up))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, use_conv=True))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), nn.Conv2d(input_ch, self.out_channels, 3, padding=1)
        )

    @property
    def multiple_of(self) -> int:
        """H and W must be multiples of this: 2 ** (number of down-sampling steps)."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def block_dtype(self) -> torch.dtype:
        """dtype of the input, middle and output blocks (float32 unless :meth:`convert_blocks_to` ran)."""
        return self.input_blocks[0][0].weight.dtype

    def convert_blocks_to(self, dtype: torch.dtype) -> ADMUNet:
        """guided-diffusion's ``convert_to_fp16``: cast the convolutions of the input, middle, output blocks.

        Timestep embedding, linear layers, GroupNorm parameters and the output head stay float32; GroupNorm
        computes in float32 whatever the block dtype.
        """
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            for module in blocks.modules():
                if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                    module.to(dtype)
        return self

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict epsilon (and the variance channels) for x_t (B, 3, H, W) at timesteps (B,) or a scalar.

        ``y`` (B,) are the class labels of a ``class_cond`` model. The output has the dtype of ``x``.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"ADMUNet expects x of shape (B, 3, H, W); got {tuple(x.shape)}")
        if x.shape[-2] % self.multiple_of or x.shape[-1] % self.multiple_of:
            raise ValueError(
                f"ADMUNet input size {tuple(x.shape[-2:])} must be a multiple of {self.multiple_of} "
                f"(2 ** number of down-sampling levels); pad or tile the image"
            )
        if (y is None) != (self.num_classes is None):
            raise ValueError("y (class labels) is required for class_cond models and not accepted otherwise")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(
            timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype)
        )
        if y is not None:
            emb = emb + self.label_emb(y)
        h = x.to(self.block_dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(self.out[2].weight.dtype)).to(x.dtype)


def load_adm_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Tensor]:
    """The ``state_dict`` in ``path``, read with ``torch.load(weights_only=True)``: no pickled code runs.
    ``mmap``: map the file instead of reading it (for its names and shapes only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ADM checkpoint {path} not found: download guided-diffusion's checkpoint (e.g. "
            "256x256_diffusion_uncond.pt) and set the denoiser's 'checkpoint' to its path"
        )
    try:
        state = torch.load(
            path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path)
        )
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {path}: it is not a plain state_dict and unpickling it would execute code "
            f"(weights_only=True failed: {re.sub(_ANSI, '', str(err).splitlines()[0])}). Re-save only the "
            "weights, torch.save(model.state_dict(), path), in a trusted environment."
        ) from err
    except RuntimeError as err:
        raise ValueError(f"could not read {path} as a torch checkpoint: {err}") from err
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"{path} does not hold a state_dict (a mapping of parameter names to tensors) as "
            f"guided-diffusion's checkpoints do; got {type(state).__name__}"
            + (f" with keys {list(state)[:5]}" if isinstance(state, Mapping) else "")
        )
    return dict(state)


def _mismatch_report(expected: dict[str, torch.Size], state: Mapping[str, Tensor], first: int = 5) -> str:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in state and state[k].shape != expected[k]
    ]
    parts = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", wrong),
    ):
        if items:
            more = f" (+{len(items) - first} more)" if len(items) > first else ""
            parts.append(f"{len(items)} {label}: {items[:first]}{more}")
    return "; ".join(parts)


def load_adm_unet(checkpoint: str | Path, flags: Mapping[str, Any]) -> ADMUNet:
    """:class:`ADMUNet` from ``flags`` with the weights of ``checkpoint`` (strict): float32, CPU, eval mode.

    The model is built on the meta device and takes the checkpoint's tensors, so no memory is spent on a
    random initialisation. Missing, unexpected or mis-shaped keys raise a ValueError naming the file and the
    first few keys.
    """
    state = load_adm_checkpoint(checkpoint)
    model = _fitting_meta_unet(checkpoint, flags, state)
    model.load_state_dict(state, strict=True, assign=True)
    return model.float().eval().requires_grad_(False)


def check_adm_unet(checkpoint: str | Path, flags: Mapping[str, Any]) -> None:
    """What :func:`load_adm_unet` would refuse, found with the checkpoint memory-mapped and the model on the
    meta device: no tensor is read into memory."""
    _fitting_meta_unet(checkpoint, flags, load_adm_checkpoint(checkpoint, mmap=True))


def _fitting_meta_unet(
    checkpoint: str | Path, flags: Mapping[str, Any], state: Mapping[str, Tensor]
) -> ADMUNet:
    """``ADMUNet(**flags)`` on the meta device, if ``state``'s names and shapes fit it (else ValueError)."""
    with torch.device("meta"):
        model = ADMUNet(**flags)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    report = _mismatch_report(expected, state)
    if report:
        raise ValueError(
            f"{checkpoint} does not fit ADMUNet({dict(flags)}): {report}. Likely cause: wrong flags; they "
            "must be those the checkpoint was trained with (num_channels, channel_mult, num_res_blocks, "
            "attention_resolutions, num_head_channels, learn_sigma, class_cond, resblock_updown, "
            "use_scale_shift_norm); for 256x256_diffusion_uncond.pt use preset: 256x256_uncond"
        )
    return model
