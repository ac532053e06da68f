"""Where a denoiser's network runs on an image: at its size, in overlapping tiles, or on a downsampled copy.

:class:`ImageDenoiser` implements ``denoiser(noisy (B,3,H,W), sigma) -> denoised (B,3,H,W)`` in [0,1] for any
network that denoises at one noise level (:meth:`ImageDenoiser._denoise`): the DDPM one-shot denoiser
(``models.denoisers``) and the continuous-sigma EDM / consistency denoiser (``models.karras``) share it.

resolution (the noise is always added by the sampler at the image resolution):

* ``native``: at the image size, padded (reflect, or replicate for tiny images) at the bottom/right up to a
  multiple of ``multiple_of`` and cropped back; sigma_eff = sigma.
* ``tile``: ``sample_size`` x ``sample_size`` tiles overlapping by ``tile_overlap`` pixels, blended with the
  weights of ``_smooth_ramp`` (zero on the outer overlap // 4 pixels of interior tile edges). For a model whose
  receptive-field radius is <= tile_overlap // 4 (and zero padding), this equals ``native`` exactly.
  sigma_eff = sigma. The tiles of every image of a batch go through the network together,
  ``tile_pixels // sample_size**2`` tiles per call (all B images at one tile position per call when None;
  :meth:`ImageDenoiser.fit_tile_pixels` sizes it from free device memory).
* ``resize``: area-downsample by integer factors (f_h, f_w) = (H, W) / sample_size, denoise, bilinearly upsample
  back. Each model pixel is the mean of f_h * f_w i.i.d. noisy pixels, so the model sees i.i.d. noise of std
  sigma_eff = sigma / sqrt(f_h * f_w). Non-integer factors (position-dependent, correlated noise) are refused.

sigma == 0 returns the input unchanged (the clean prediction bypasses denoising).
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ray_certseg.models.util import free_cuda_bytes


def _smooth_ramp(length: int, overlap: int) -> Tensor:
    """Leading-edge blending weights w(d), d = 0..length-1 the distance from the tile edge.

    With m = overlap // 4 and u = clamp((d - m + 1/2) / (overlap - 2m), 0, 1): w = sin^2(pi u / 2). So w = 0
    for d < m, w = 1 for d >= overlap - m, and w(d) + w(overlap - 1 - d) = 1 (partition of unity across an
    overlap).
    """
    if overlap == 0:
        return torch.ones(length, dtype=torch.float64)
    m = overlap // 4
    u = ((torch.arange(length, dtype=torch.float64) - m + 0.5) / (overlap - 2 * m)).clamp(0.0, 1.0)
    return torch.sin(0.5 * math.pi * u) ** 2


def _tile_starts(length: int, size: int, overlap: int) -> list[int]:
    """Tile offsets covering [0, length): stride size - overlap, the last tile flush with the end."""
    if length <= size:
        return [0]
    return list(range(0, length - size, size - overlap)) + [length - size]


def _pad(x: Tensor, height: int, width: int) -> Tensor:
    """Pad (B,3,H,W) at the bottom/right to (height, width): reflect if large enough, else replicate."""
    ph, pw = height - x.shape[-2], width - x.shape[-1]
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


class ImageDenoiser(nn.Module):
    """The resolution strategies of the module docstring around ``_denoise(x, sigma_eff)``, which a subclass
    implements: [0,1] noisy images at the model's input size, i.i.d. noise of std sigma_eff -> [0,1] denoised."""

    RESOLUTIONS = ("native", "tile", "resize")
    BLEND_SHAPES = 8

    def __init__(
        self,
        model: Callable[..., Tensor],
        *,
        resolution: str = "native",
        sample_size: int | None = None,
        tile_overlap: int = 16,
        multiple_of: int = 8,
        tile_pixels: int | None = None,
    ):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be a callable model(x_t, t) -> Tensor, got {type(model).__name__}")
        if resolution not in self.RESOLUTIONS:
            raise ValueError(f"resolution must be one of {self.RESOLUTIONS}, got {resolution!r}")
        if resolution != "native" and not (isinstance(sample_size, int) and sample_size > 0):
            raise ValueError(
                f"resolution={resolution!r} needs the model's sample_size (a positive int), "
                f"got {sample_size!r}"
            )
        if not (isinstance(tile_overlap, int) and 0 <= tile_overlap) or (
            resolution == "tile" and tile_overlap >= sample_size
        ):
            raise ValueError(
                f"tile_overlap must be an int in [0, sample_size={sample_size}), got {tile_overlap!r}"
            )
        if not (isinstance(multiple_of, int) and multiple_of >= 1):
            raise ValueError(f"multiple_of must be an int >= 1, got {multiple_of!r}")
        if tile_pixels is not None and not (isinstance(tile_pixels, int) and tile_pixels >= 1):
            raise ValueError(f"tile_pixels must be an int >= 1 or None, got {tile_pixels!r}")
        self.model = model
        self.tile_pixels = tile_pixels
        self.resolution, self.sample_size = resolution, sample_size
        self.tile_overlap, self.multiple_of = tile_overlap, multiple_of
        self._blends: OrderedDict[tuple[int, int, str], tuple[list[tuple[int, int, Tensor]], Tensor]] = (
            OrderedDict()
        )

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``torch.compile`` the network only, in place (``nn.Module.compile``'s arguments). The schedule
        arithmetic (t*, abar_t as Python numbers, padding, tiles, resizing) stays eager: it cannot break the
        graph, and the network gets t as a tensor, so one graph per batch shape serves every sigma. (Compiled
        whole, the denoiser broke the graph at every ``.item()`` and specialised on each sigma's constants,
        running eagerly once past dynamo's recompile limit.)"""
        self.model.compile(*args, **kwargs)

    def effective_sigma(self, sigma: float, height: int, width: int) -> float:
        """Std of the i.i.d. noise the model sees: sigma, or sigma / sqrt(f_h f_w) in ``resize`` mode."""
        if self.resolution != "resize":
            return sigma
        fh, fw = self._resize_factors(height, width)
        return sigma / math.sqrt(fh * fw)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, noisy: Tensor, sigma: float) -> Tensor:
        """Denoise a batch of noisy images (B, 3, H, W) in [0,1] space (values may leave [0,1])."""
        if not isinstance(noisy, Tensor) or noisy.ndim != 4 or noisy.shape[1] != 3:
            got = tuple(noisy.shape) if isinstance(noisy, Tensor) else type(noisy).__name__
            raise ValueError(f"noisy must be a (B, 3, H, W) tensor, got {got}")
        sigma = float(sigma)
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
        if sigma == 0:
            return noisy
        noisy = noisy.float()
        if self.resolution == "native":
            return self._native(noisy, sigma)
        if self.resolution == "tile":
            return self._tiled(noisy, sigma)
        return self._resized(noisy, sigma)

    def _native(self, noisy: Tensor, sigma: float) -> Tensor:
        h, w = noisy.shape[-2:]
        m = self.multiple_of
        padded = _pad(noisy, -(-h // m) * m, -(-w // m) * m)
        return self._denoise(padded, sigma)[..., :h, :w]

    def _tiled(self, noisy: Tensor, sigma: float) -> Tensor:
        """Denoise the tiles (tile t, image b), t-major, ``tiles_per_call`` rows per network call, and blend.

        Row r = t B + b is tile t of image b; a call takes rows [r, r + K), so with K = B (``tile_pixels`` None)
        each call is one tile position of every image, and a larger K fills the device with several positions.
        Each tile is denoised by the same function whatever K (the network acts on each batch row alone)."""
        h, w = noisy.shape[-2:]
        s = self.sample_size
        padded = _pad(noisy, max(h, s), max(w, s))
        tiles, weight = self._blend(*padded.shape[-2:], noisy.device)
        b = padded.shape[0]
        per_call = self.tiles_per_call(b)
        total = torch.zeros_like(padded)
        rows = len(tiles) * b
        for start in range(0, rows, per_call):
            stop = min(start + per_call, rows)
            # (tile, first image, end image) of each tile position the rows [start, stop) touch
            parts = [
                (t, max(start - t * b, 0), min(stop - t * b, b))
                for t in range(start // b, (stop - 1) // b + 1)
            ]
            crops = [
                padded[lo:hi, :, tiles[t][0] : tiles[t][0] + s, tiles[t][1] : tiles[t][1] + s]
                for t, lo, hi in parts
            ]
            out = self._denoise(crops[0] if len(crops) == 1 else torch.cat(crops), sigma)
            for (t, lo, hi), piece in zip(parts, out.split([hi - lo for _, lo, hi in parts]), strict=True):
                y, x, wgt = tiles[t]
                total[lo:hi, :, y : y + s, x : x + s] += wgt * piece
        return (total / weight)[..., :h, :w]

    def tiles_per_call(self, batch: int) -> int:
        """Tiles per network call in ``tile`` mode: ``tile_pixels // sample_size**2`` (at least 1), or the
        batch's B images at one tile position when ``tile_pixels`` is None."""
        if self.tile_pixels is None:
            return batch
        return max(1, self.tile_pixels // self.sample_size**2)

    def fit_tile_pixels(
        self,
        free_bytes: int,
        bytes_per_tile: int,
        *,
        fraction: float = 0.5,
        max_tiles: int = 32,
    ) -> int:
        """Set and return ``tile_pixels`` for ``auto``: the tiles per call whose activations fill ``fraction``
        of ``free_bytes`` at ``bytes_per_tile`` each (:meth:`probe_tile_bytes`), at least 1 and at most
        ``max_tiles`` (then a 256 x 256 ADM's widest activation stays below 2**31 elements, the limit of
        32-bit indexing in some kernels), times sample_size**2."""
        tiles = int(min(max_tiles, max(1, fraction * free_bytes // max(bytes_per_tile, 1))))
        self.tile_pixels = tiles * self.sample_size**2
        return self.tile_pixels

    def fit_tile_pixels_to(
        self, device: torch.device, autocast_dtype: torch.dtype | None = None
    ) -> int | None:
        """``sampling.tile_pixels: auto``: on CUDA, :meth:`probe_tile_bytes` then :meth:`fit_tile_pixels` to
        the memory this process can still allocate; elsewhere None (one tile position of every sample per
        call). Sets and returns ``tile_pixels``."""
        if device.type != "cuda":
            self.tile_pixels = None
            return None
        per_tile = self.probe_tile_bytes(device, autocast_dtype)
        return self.fit_tile_pixels(free_cuda_bytes(device), per_tile)

    def probe_tile_bytes(self, device: torch.device, autocast_dtype: torch.dtype | None = None) -> int:
        """Device memory one more tile in a network call costs: the CUDA allocator's peak over a call of one
        tile and of two, their difference (activations grow with the batch; weights do not). CUDA only."""
        s = self.sample_size
        peaks = []
        amp = (
            torch.autocast(device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), amp:
            for k in (1, 2):
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                self._denoise(torch.full((k, 3, s, s), 0.5, device=device), self.probe_sigma)
                torch.cuda.synchronize(device)
                peaks.append(torch.cuda.max_memory_allocated(device) - base)
        return max(peaks[1] - peaks[0], 1)

    def _blend(self, ph: int, pw: int, device: torch.device) -> tuple[list[tuple[int, int, Tensor]], Tensor]:
        """The tiles of a (ph, pw) image, (y, x, blending weights), and the summed weights: built once per
        shape and device and kept there (a call copies nothing from the host), for the BLEND_SHAPES shapes
        used last (datasets of many image sizes would otherwise fill the device)."""
        key = (ph, pw, str(device))
        if key in self._blends:
            self._blends.move_to_end(key)
        else:
            s, o = self.sample_size, self.tile_overlap
            ramp = _smooth_ramp(s, o).to(device, torch.float32)

            def window(start: int, length: int) -> Tensor:
                lead = ramp if start > 0 else torch.ones_like(ramp)
                trail = ramp.flip(0) if start + s < length else torch.ones_like(ramp)
                return lead * trail

            tiles, weight = [], torch.zeros(ph, pw, device=device)
            for y in _tile_starts(ph, s, o):
                for x in _tile_starts(pw, s, o):
                    wgt = window(y, ph)[:, None] * window(x, pw)[None, :]
                    weight[y : y + s, x : x + s] += wgt
                    tiles.append((y, x, wgt))
            self._blends[key] = (tiles, weight)
            while len(self._blends) > self.BLEND_SHAPES:
                self._blends.popitem(last=False)
        return self._blends[key]

    def _resize_factors(self, height: int, width: int) -> tuple[int, int]:
        s = self.sample_size
        if height % s or width % s:
            raise ValueError(
                f"resolution='resize' needs image sides that are integer multiples of sample_size={s} "
                f"(exact i.i.d. noise of std sigma/sqrt(f_h f_w)), got {height}x{width}; use "
                "resolution='native' or 'tile', or images of such a size"
            )
        return height // s, width // s

    def _resized(self, noisy: Tensor, sigma: float) -> Tensor:
        h, w = noisy.shape[-2:]
        fh, fw = self._resize_factors(h, w)
        small = F.avg_pool2d(noisy, (fh, fw)) if fh * fw > 1 else noisy
        denoised = self._denoise(small, self.effective_sigma(sigma, h, w))
        return (
            F.interpolate(denoised, size=(h, w), mode="bilinear", align_corners=False)
            if fh * fw > 1
            else denoised
        )

    #: the noise level of the memory probe (the network's activations do not depend on it)
    probe_sigma = 0.25

    def _denoise(self, x: Tensor, sigma_eff: float) -> Tensor:
        """[0,1] noisy images at the model's input size (i.i.d. noise of std sigma_eff) -> [0,1] denoised."""
        raise NotImplementedError
