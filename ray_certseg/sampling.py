"""Monte Carlo vote counting for SegCertify with a denoise-then-segment base classifier.

The base classifier is, per pixel i,

    f_i(x + delta) = argmax_c segment(denoise(x + delta, sigma))_{c,i},   delta ~ N(0, sigma^2 I),

with x in [0,1] pixel space at the image resolution (where the certificate is stated). CERTIFY
(Fischer et al. 2021, Alg. 1) needs two independent sample sets per image:

* the selection set S0 (n0 draws): counts0[c, i] = #{j : f_i(x + delta_j) = c};  c_hat_i = select(counts0)
* the estimation set S  (n draws):  k_i = #{j : f_i(x + delta'_j) = c_hat_i}

Every draw has its own noise, from its own ``torch.Generator`` seeded by (seed, image id, sigma, stage,
index), so the votes are bit-identical whatever the batch size, worker or processing order, and no two draws
of one image share noise (the released SegCertify code reused one draw per batch, which voids the binomial
test).
Votes accumulate as integer counts on the model's device; per-sample label maps never leave it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ray_certseg.dtypes import class_dtype
from ray_certseg.models.util import resolve_dtype

SELECTION, ESTIMATION = 0, 1
"""Stage tags of the two sample sets S0 and S; they enter the per-draw seed."""

Denoiser = Callable[[Tensor, float], Tensor]
SegmenterFn = Callable[[Tensor], Tensor]


@dataclass
class Votes:
    """Vote counts of one (image, sigma).

    c_hat: (H, W) ``certify.select(counts0)`` (argmax, ties to the lowest class; uint8 when C <= 256); k: (H, W)
    votes for c_hat among the n estimation draws (uint16 when n < 2**16, else int32), both computed on the
    device; counts0, counts: (C, H, W) int32 selection (n0 draws) and estimation votes, copied to the host only
    with ``return_counts=True`` (else None); clean_pred: (H, W) argmax of
    the segmenter on the clean image, dtype of c_hat: no noise and no denoising (a denoiser is the identity at
    sigma = 0), so methods sharing a segmenter share it; seconds: wall time of the sampling.
    """

    counts0: np.ndarray | None
    c_hat: np.ndarray
    k: np.ndarray
    clean_pred: np.ndarray
    seconds: float
    counts: np.ndarray | None = None
    margin: np.ndarray | None = None
    c_hat_levels: np.ndarray | None = None
    k_levels: np.ndarray | None = None


def noise_seed(seed: int, image_id: str, sigma: float) -> int:
    """32-bit base seed of one (seed, image id, sigma): ``zlib.crc32`` of their text (never Python ``hash()``,
    which is salted per process)."""
    return zlib.crc32(f"{int(seed)}|{image_id}|{float(sigma)!r}".encode())


def sample_seed(base: int, stage: int, index: int) -> int:
    """Seed of draw ``index`` of ``stage`` (SELECTION/ESTIMATION): ``(base + 2 index + stage) mod 2**32``.

    Distinct for every (stage, index) of one image (index < 2**31). Kept below 2**32 because the CPU
    generator (mt19937) uses only the low 32 bits of its seed.
    """
    if stage not in (SELECTION, ESTIMATION) or index < 0:
        raise ValueError(
            f"stage must be SELECTION or ESTIMATION and index >= 0, got stage={stage}, index={index}"
        )
    return (base + 2 * index + stage) % 2**32


def to_tensor_image(array: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) RGB array -> float32 (3, H, W) tensor in [0, 1] (x / 255)."""
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        desc = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"image must be a uint8 H x W x 3 RGB array, got {desc}")
    # torch.as_tensor copies a read-only array (Arrow/PIL buffers) instead of warning about it
    tensor = torch.as_tensor(array) if array.flags.writeable else torch.tensor(array)
    return tensor.permute(2, 0, 1).float().div_(255.0).contiguous()


def _as_image(image: Tensor | np.ndarray) -> Tensor:
    """Validate the sampler's image argument: float (3, H, W) in [0, 1], or a uint8 H x W x 3 array."""
    if isinstance(image, np.ndarray):
        return to_tensor_image(image)
    if not isinstance(image, Tensor):
        raise TypeError(
            f"image must be a float tensor (3, H, W) or a uint8 H x W x 3 array, got {type(image).__name__}"
        )
    if not image.is_floating_point() or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"image tensor must be float (3, H, W) in [0, 1], got {image.dtype} {tuple(image.shape)}"
        )
    lo, hi = float(image.min()), float(image.max())
    if not (0.0 <= lo and hi <= 1.0):
        raise ValueError(f"image values must lie in [0, 1], got [{lo:g}, {hi:g}]; divide uint8 images by 255")
    return image.float()


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def prepare_model(
    module: nn.Module,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    channels_last: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Move a model to ``device``/``dtype`` once per worker: eval mode, no gradients, optionally channels_last
    memory format and ``torch.compile`` (first call compiles: tens of seconds; a GPU-job option).

    Compiled in place with ``module.compile`` (a ``DiffusionDenoiser`` compiles its network only, see its
    ``compile``), with static shapes (``dynamic=False``): one graph per batch shape (count_votes uses at most
    three: the clean image, the batch size and the remainder), so a shape always runs the same kernels. With
    automatic dynamic shapes the first calls run shape-specialised graphs and later ones a dynamic graph, whose
    low-precision results differ: an actor's first image would get other votes than the same image later.
    """
    dtype = resolve_dtype(dtype)
    module = module.to(device=device, dtype=dtype) if dtype is not None else module.to(device=device)
    module = module.eval().requires_grad_(False)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    if compile:
        module.compile(dynamic=False)
    return module


def keep_freed_host_memory(limit: int = 1 << 30) -> bool:
    """Process-wide: let glibc's malloc serve host allocations up to ``limit`` bytes from its heaps and keep
    freed memory there for reuse (``M_MMAP_THRESHOLD`` = ``limit``, ``M_TRIM_THRESHOLD`` = 2 GiB).

    PyTorch's CPU allocator has no cache, so every batch allocates its activations afresh. With glibc's
    defaults the large ones are mmap'ed and unmapped again, and the kernel zero-fills them page by page on
    every batch: about 1,500 minor page faults and 3 ms of kernel time per 64 x 64 sample through the demo DDPM
    and segmenter (``bench/malloc.py``: keeping the memory is 1.06x faster with one process, 1.09x with two
    computing at once). Keeping the memory removes both; the resident set then stays at the peak of one batch.
    Results are unchanged (allocation only). GPU sampling is unaffected (the CUDA caching allocator reuses
    device memory already).

    Returns whether the settings took effect (False with another C library: nothing is changed).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, limit)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


class _BaseClassifier:
    """f(x) = argmax segment(denoise(x, sigma)) on a batch, with autocast and output checks. At sigma = 0 (the
    clean prediction) there is nothing to denoise and the denoiser is not called: f(x) = argmax segment(x)."""

    def __init__(
        self,
        segmenter: SegmenterFn,
        denoiser: Denoiser | None,
        num_classes: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        channels_last: bool,
    ):
        self.segmenter, self.denoiser, self.num_classes = segmenter, denoiser, num_classes
        self.channels_last = channels_last
        self.autocast = (
            (lambda: torch.autocast(device.type, dtype=autocast_dtype))
            if autocast_dtype is not None
            else contextlib.nullcontext
        )

    def __call__(self, noisy: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
        """Labels (B, H, W) int64 of a batch (B, 3, H, W), and a 0-d bool tensor: every pixel's top logit is
        finite.

        One reduction over the classes gives both: ``max`` returns the first maximum (ties to the lowest class,
        as ``argmax``) and its value, which is NaN when any class is NaN and +Inf when any is +Inf, so checking
        the (B, H, W) maxima catches what makes a label undefined without reading the logits a second time.
        (A -Inf beside a finite top logit passes: that class loses the vote whatever its value.) On the CPU
        ``max(dim=1)`` is also about 3-9x faster than ``argmax(dim=1)`` over the strided class dimension
        (``bench/votes.py``)."""
        if self.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            images = noisy if self.denoiser is None or sigma == 0 else self.denoiser(noisy, sigma)
            logits = self.segmenter(images)
        b, _, h, w = noisy.shape
        if not isinstance(logits, Tensor) or tuple(logits.shape) != (b, self.num_classes, h, w):
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"segmenter must return logits (B, num_classes, H, W) = {(b, self.num_classes, h, w)} "
                f"at the input size, got {got}; wrap it in ray_certseg.models.segmenters.Segmenter "
                "(upsamples) or check num_classes"
            )
        top, labels = logits.max(dim=1)
        return labels, torch.isfinite(top).all()


def _vote(classify: _BaseClassifier, x: Tensor, spec: SamplingSpec, base: int) -> tuple[Tensor, Tensor]:
    """Both sample sets in one stream of n0 + n draws, in ceil((n0 + n) / batch_size) batches:

        counts[0, c, i] = #{j < n0 : f_i(x + sigma eps_j^(0)) = c}      (S0, selection)
        counts[1, c, i] = #{j < n  : f_i(x + sigma eps_j^(1)) = c}      (S, estimation)

    with eps_j^(s) ~ N(0, I) drawn from seed sample_seed(base, s, j). Stream position p < n0 is S0's draw p,
    position n0 + j is S's draw j. A batch may hold draws of both sets: each draw still has its own noise and
    its vote goes to its own set's counts, so S0 and S stay independent and apart (no partial batch between
    them: one batch call fewer per image than drawing the sets one after the other).

    Returns (counts (2 C, H*W) int32 on x's device, S0's then S's; 0-d bool: all logits were finite).
    """
    _, h, w = x.shape
    sigma, n0, batch_size, num_classes = spec.sigma, spec.n0, spec.batch_size, spec.num_classes
    total = n0 + spec.n
    b_max = min(batch_size, total)
    counts = torch.zeros(2 * num_classes, h * w, dtype=torch.int32, device=x.device)
    ones = torch.ones(b_max, h * w, dtype=torch.int32, device=x.device)
    # row offset of each stream position's set in `counts`, made once on the device (no copy per batch)
    offset = (torch.arange(total, device=x.device) >= n0).to(torch.int64)[:, None] * num_classes
    finite = torch.ones((), dtype=torch.bool, device=x.device)
    generator = torch.Generator(device=x.device)
    noise = torch.empty(b_max, *x.shape, device=x.device)
    for start in range(0, total, batch_size):
        b = min(batch_size, total - start)
        for row, p in enumerate(range(start, start + b)):
            stage, j = (SELECTION, p) if p < n0 else (ESTIMATION, p - n0)
            noise[row].normal_(generator=generator.manual_seed(sample_seed(base, stage, j)))
        labels, ok = classify(x + sigma * noise[:b], sigma)
        counts.scatter_add_(0, labels.reshape(b, h * w) + offset[start : start + b], ones[:b])
        finite &= ok
    return counts, finite


@dataclass(frozen=True)
class SamplingSpec:
    """How one image is sampled at one sigma: n0 selection and n estimation draws of f(x + delta),
    delta ~ N(0, sigma^2 I), ``batch_size`` draws per model call, noise seeded from ``seed`` (per image and
    draw, :func:`sample_seed`), C = ``num_classes``. ``device`` (default CPU) holds the models' inputs and the
    counts; ``autocast_dtype`` (bf16/fp16) runs the models under ``torch.autocast``; ``channels_last`` feeds
    channels_last batches; ``return_counts`` copies the (C, H, W) counts to the host; ``hierarchy_index``
    (:func:`level_index` of ``Hierarchy.node[1:]``) also counts the votes of every level. Checked when made."""

    sigma: float
    n0: int
    n: int
    num_classes: int
    batch_size: int
    seed: int
    device: torch.device | str | None = None
    autocast_dtype: torch.dtype | str | None = None
    channels_last: bool = False
    return_counts: bool = False
    hierarchy_index: Sequence[tuple[Tensor, int]] | None = None

    def __post_init__(self) -> None:
        sigma = float(self.sigma)
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
        object.__setattr__(self, "sigma", sigma)
        for name in ("n0", "n", "num_classes", "batch_size"):
            object.__setattr__(self, name, _check_count(name, getattr(self, name), 1))

    def at(self, sigma: float) -> SamplingSpec:
        """The same sampling at another sigma."""
        return dataclasses.replace(self, sigma=sigma)


def count_votes(
    image: Tensor | np.ndarray,
    segmenter: SegmenterFn,
    spec: SamplingSpec | None = None,
    *,
    denoiser: Denoiser | None = None,
    image_id: str = "",
    **fields: Any,
) -> Votes:
    """Draw n0 selection and n estimation samples of f(x + delta), delta ~ N(0, sigma^2 I), and count votes.

    image: float (3, H, W) in [0, 1] or uint8 H x W x 3. segmenter: (B, 3, H, W) in [0, 1] -> logits
    (B, num_classes, H, W). denoiser: ``(noisy, sigma) -> denoised`` or None (no denoising, SegCertify).
    ``spec``: the :class:`SamplingSpec`, or its fields as keywords (``sigma=0.25, n0=10, ...``).
    The noise is added here, in [0, 1] space at the image resolution; the denoiser gets sigma to pick its
    timestep. Exactly n0 and n draws whatever ``batch_size``, in 1 + ceil((n0 + n) / batch_size) model calls
    (the clean image, then both sets in one stream); memory O(C H W + batch_size H W). With
    ``hierarchy_index`` the S0 margin and every level's c_hat and k are counted on the device
    (:func:`level_votes`) and returned as ``margin``, ``c_hat_levels``, ``k_levels``.
    Raises ValueError if the segmenter produces non-finite (NaN/Inf) logits.
    """
    if spec is None:
        spec = SamplingSpec(**fields)
    elif fields:
        spec = dataclasses.replace(spec, **fields)
    C = spec.num_classes
    dev = torch.device(spec.device) if spec.device is not None else torch.device("cpu")
    classify = _BaseClassifier(
        segmenter, denoiser, C, dev, resolve_dtype(spec.autocast_dtype), spec.channels_last
    )
    base = noise_seed(spec.seed, image_id, spec.sigma)
    start = time.perf_counter()
    with torch.inference_mode():
        x = _as_image(image).to(dev)
        clean, clean_ok = classify(x[None], 0.0)
        both, ok = _vote(classify, x, spec, base)
        if not bool(clean_ok & ok):
            raise ValueError(
                f"the segmenter produced non-finite logits (NaN/Inf) for image {image_id!r} at "
                f"sigma={spec.sigma}; check the model weights, the autocast dtype (fp16 overflow) and its input"
            )
        _, h, w = x.shape
        levels = None
        if spec.hierarchy_index is not None:
            levels = [
                a.reshape(-1, h, w).cpu().numpy()
                for a in level_votes(both[:C], both[C:], spec.hierarchy_index)
            ]
        counts0, counts = both.reshape(2, C, h, w)
        c_hat_t, k_t = select_on_device(counts0, counts)
        # (H, W) maps are what reaches the host, narrowed on the device first (1 byte per pixel for c_hat and
        # the clean prediction when C <= 256, instead of int64's 8)
        small = getattr(torch, np.dtype(class_dtype(C)).name)
        c_hat = c_hat_t.to(small).cpu().numpy()
        k = k_t.cpu().numpy()
        clean_np = clean[0].to(small).cpu().numpy()
        kept = (counts0.cpu().numpy(), counts.cpu().numpy()) if spec.return_counts else (None, None)
    return Votes(
        counts0=kept[0],
        c_hat=c_hat,
        k=k.astype(np.uint16 if spec.n < 2**16 else np.int32),
        clean_pred=clean_np.astype(c_hat.dtype),
        seconds=time.perf_counter() - start,
        counts=kept[1],
        margin=None if levels is None else levels[0][0].astype(np.uint16),
        c_hat_levels=None if levels is None else levels[1].astype(c_hat.dtype),
        k_levels=None if levels is None else levels[2].astype(np.uint16),
    )


def select_on_device(counts0: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """c_hat = argmax_c counts0[c] (ties to the lowest class, as :func:`ray_certseg.certify.select`: torch's
    argmax returns the first maximum) and k = counts[c_hat], on the counts' device, so that only two (H, W)
    maps are copied to the host instead of both (C, H, W) count tensors."""
    c_hat = counts0.argmax(dim=0)
    return c_hat, counts.gather(0, c_hat[None])[0]


def level_index(
    nodes: Sequence[np.ndarray], device: torch.device | str | None = None
) -> tuple[tuple[Tensor, int], ...]:
    """Per level l = 1..L, the class -> node map ``nodes[l - 1]`` as an int64 tensor on ``device`` and the
    level's node count: made once (per actor), so counting an image copies nothing to the device."""
    return tuple(
        (torch.tensor(np.asarray(node, dtype=np.int64), device=device), int(np.max(node)) + 1)
        for node in nodes
    )


def level_votes(
    counts0: Tensor, counts: Tensor, index: Sequence[tuple[Tensor, int]]
) -> tuple[Tensor, Tensor, Tensor]:
    """From the (C, P) selection and estimation counts, on their device:

        margin_i       = first - second largest of counts0[:, i]          (n0 when C = 1)
        c_l[i]         = argmax_v sum_{c in v} counts0[c, i]             (ties: lowest node id)
        k_l[i]         = sum_{c in c_l[i]} counts[c, i]                  for every level l = 1..L

    ``index``: :func:`level_index` of the levels' class -> node maps. Returns (margin (1, P), c (L, P),
    k (L, P)), int64."""
    if counts0.shape[0] >= 2:
        top = counts0.topk(2, dim=0).values
        margin = (top[0] - top[1])[None].long()
    else:
        margin = counts0[:1].long()
    c_levels, k_levels = [], []
    for node, size in index:
        node0 = counts0.new_zeros(size, counts0.shape[1]).index_add_(0, node, counts0)
        node1 = counts.new_zeros(size, counts.shape[1]).index_add_(0, node, counts)
        c = node0.argmax(dim=0)  # the first maximum: the lowest node id
        c_levels.append(c)
        k_levels.append(node1.gather(0, c[None])[0].long())
    return margin, torch.stack(c_levels), torch.stack(k_levels)
