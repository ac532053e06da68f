"""Benchmark 7, a per-op cost model of the base classifier, counted on the meta device (no GPU, no weights).

The job's base classifier f(denoise(x + delta)) runs once per noisy sample. This script builds it as the job does
on CUDA and runs one sample through it on ``meta`` tensors under a ``TorchDispatchMode``, which sees every aten op
that eager PyTorch would launch as a kernel. Per op it counts

* FLOPs: convolutions 2 x output elements x C_in/groups x kernel size; matrix products 2 M N K; fused attention
  4 B H L S D; one FLOP per output element for everything else;
* bytes: every tensor read (inputs) and written (outputs) by the op, at its dtype, a broadcast (stride 0)
  dimension once; views and metadata ops (reshape, transpose, split, ...) and allocations (empty) launch no
  kernel and cost nothing,

and predicts the op's time as max(FLOPs / peak_flops, bytes / peak_bw) (a roofline per op, kernels in
sequence). The sums, per op class (conv, matmul/attention, norm, elementwise, copies/casts), give the predicted
time of one sample and the fraction of the FLOP roofline it reaches (time at peak FLOP/s / predicted time).

Models, as the paper configs run them on CUDA, on a batch of ``sampling.batch_size`` samples (counts divided
by it: the weights are read once per batch):

* denoiser: ``ADMUNet`` with guided-diffusion's 256x256_uncond flags (``ADM_PRESETS``), its blocks in float16
  (``convert_blocks_to``, as ``load_adm_denoiser`` does on CUDA); GroupNorm32 computes in float32. Tile mode
  (configs/paper_cityscapes.yaml): one 256 x 256 forward per tile, ``_tile_starts`` tiles with the config's
  overlap; Pascal-Context (configs/paper_pascal_context.yaml): its ``resolution`` setting, one forward;
* segmenter: the paper's HRNet-W48 is a TorchScript file the project does not ship, so a stand-in of its size
  class is counted: ``TinySegNet`` at width 40 (about 0.6 TFLOP per 1024 x 2048 forward, the order of HRNet-W48's
  published 0.7), in float16 (``sampling.dtype: float16`` runs it under autocast).

Run: ``python bench/cost_model.py`` (defaults: H200 peaks, bf16/fp16 dense 989 TFLOP/s, 4.8 TB/s);
``--peak-tflops``, ``--peak-tbps`` for another device; ``--json PATH`` writes the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ray_certseg.models.adm import ADM_PRESETS, ADMUNet, GroupNorm32
from ray_certseg.models.resolution import _tile_starts
from ray_certseg.models.tiny import TinySegNet

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("conv", "matmul/attention", "norm", "elementwise", "copies/casts")
aten = torch.ops.aten
VIEWS = {
    "view",
    "_unsafe_view",
    "reshape",
    "transpose",
    "permute",
    "expand",
    "slice",
    "split",
    "split_with_sizes",
    "chunk",
    "unsqueeze",
    "squeeze",
    "t",
    "alias",
    "as_strided",
    "detach",
    "select",
    "unbind",
    "lift_fresh",
    "_reshape_alias",
    "unflatten",
    "flatten",
    "narrow",
}
NORMS = {
    "native_group_norm",
    "native_layer_norm",
    "native_batch_norm",
    "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit",
    "group_norm",
    "layer_norm",
}
ALLOCATIONS = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"}  # no kernel
COPIES = {
    "_to_copy",
    "copy_",
    "clone",
    "cat",
    "contiguous",
    "constant_pad_nd",
    "reflection_pad2d",
    "replication_pad2d",
    "stack",
    "zeros_like",
    "fill_",
}
MATMULS = {
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "matmul",
    "_softmax",
    "_safe_softmax",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_cudnn_attention",
    "scaled_dot_product_attention",
}


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t``: a broadcast dimension (stride 0, e.g. one weight matrix
    expanded over a batch) is read once."""
    return math.prod(n for n, stride in zip(t.shape, t.stride(), strict=True) if stride) * t.element_size()


def op_flops(name: str, args: tuple, out: Any) -> float:
    """FLOPs of one aten op (see the module docstring)."""
    outs = _tensors(out)
    if name == "convolution":
        weight = args[1]
        per_output = weight.shape[1] * math.prod(weight.shape[2:])  # C_in / groups x kernel elements
        return 2.0 * outs[0].numel() * per_output
    if name in ("mm", "addmm"):
        a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
        return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    if name in ("bmm", "baddbmm"):
        a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
        return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if name.startswith("_scaled_dot_product") or name == "scaled_dot_product_attention":
        q, k = args[0], args[1]
        return 4.0 * math.prod(q.shape[:-2]) * q.shape[-2] * k.shape[-2] * q.shape[-1]
    return float(sum(t.numel() for t in outs))


def op_class(name: str) -> str | None:
    """The op class of an aten op name; None for a view or an allocation (no kernel)."""
    if name in VIEWS or name in ALLOCATIONS:
        return None
    if name == "convolution":
        return "conv"
    if name in MATMULS:
        return "matmul/attention"
    if name in NORMS:
        return "norm"
    if name in COPIES:
        return "copies/casts"
    return "elementwise"


@dataclass
class Tally:
    """FLOPs, bytes and launches per op class, and per aten op name."""

    flops: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    bytes: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    launches: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    ops: list[tuple[str, str, float, float]] = field(default_factory=list)  # (class, name, flops, bytes)

    def scaled(self, factor: float) -> Tally:
        out = Tally()
        for d_in, d_out in ((self.flops, out.flops), (self.bytes, out.bytes), (self.launches, out.launches)):
            for k, v in d_in.items():
                d_out[k] = v * factor
        out.ops = [(c, n, f * factor, b * factor) for c, n, f, b in self.ops]
        return out

    def add(self, other: Tally) -> Tally:
        out = Tally()
        for src in (self, other):
            for d_in, d_out in ((src.flops, out.flops), (src.bytes, out.bytes), (src.launches, out.launches)):
                for k, v in d_in.items():
                    d_out[k] += v
            out.ops += src.ops
        return out

    def seconds(self, peak_flops: float, peak_bw: float) -> dict[str, float]:
        """Predicted seconds per op class: sum over its ops of max(FLOPs / peak, bytes / bandwidth)."""
        out: dict[str, float] = defaultdict(float)
        for cls, _, f, b in self.ops:
            out[cls] += max(f / peak_flops, b / peak_bw)
        return out


class Counter(TorchDispatchMode):
    """Records every aten op run under it into a :class:`Tally`."""

    def __init__(self) -> None:
        super().__init__()
        self.tally = Tally()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = (
            func.overloadpacket.__name__.rstrip("_") if func.overloadpacket.__name__ != "copy_" else "copy_"
        )
        cls = op_class(name)
        if cls is not None:
            moved = sum(_nbytes(t) for t in _tensors((args, kwargs))) + sum(_nbytes(t) for t in _tensors(out))
            flops = op_flops(name, args, out)
            t = self.tally
            t.flops[cls] += flops
            t.bytes[cls] += moved
            t.launches[cls] += 1
            t.ops.append((cls, name, flops, moved))
        return out


def fused_eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether CUDA's SDPA could take a fused kernel (flash / memory-efficient) for these inputs: half
    precision, (B, H, L, d), unit stride in d, d <= 256 (``torch.backends.cuda`` checks these, among others)."""
    return all(
        t.dim() == 4
        and t.stride(-1) == 1
        and t.dtype in (torch.float16, torch.bfloat16)
        and t.shape[-1] <= 256
        for t in (q, k, v)
    )


@contextlib.contextmanager
def as_cuda_runs(tally: Tally) -> Iterator[None]:
    """Count the meta device as CUDA would run the model: GroupNorm32's native half path where the model has
    one, and SDPA as one fused kernel where its inputs are eligible (:func:`fused_eligible`; on meta it would
    always decompose into the math path: bmm, softmax, bmm)."""
    real = F.scaled_dot_product_attention
    kept = getattr(GroupNorm32, "NATIVE_HALF_DEVICES", None)

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not fused_eligible(q, k, v):
            return real(q, k, v, *args, **kwargs)
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        flops = 4.0 * math.prod(q.shape[:-2]) * q.shape[-2] * k.shape[-2] * q.shape[-1]
        moved = float(sum(_nbytes(t) for t in (q, k, v, out)))
        cls = "matmul/attention"
        tally.flops[cls] += flops
        tally.bytes[cls] += moved
        tally.launches[cls] += 1
        tally.ops.append((cls, "fused_sdpa", flops, moved))
        return out

    F.scaled_dot_product_attention = sdpa
    if kept is not None:
        GroupNorm32.NATIVE_HALF_DEVICES = frozenset(kept | {"meta"})
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real
        if kept is not None:
            GroupNorm32.NATIVE_HALF_DEVICES = kept


def count(fn: Any, *inputs: torch.Tensor) -> Tally:
    counter = Counter()
    with torch.no_grad(), as_cuda_runs(counter.tally), counter:  # no_grad: the mode then sees aten kernels
        fn(*inputs)
    return counter.tally


def adm(dtype: torch.dtype = torch.float16) -> ADMUNet:
    """The 256x256_uncond ADM on the meta device, blocks in ``dtype`` (the job's CUDA setting)."""
    with torch.device("meta"):
        net = ADMUNet(**{k: v for k, v in ADM_PRESETS["256x256_uncond"].items() if k != "use_fp16"})
    return net.convert_blocks_to(dtype).eval()


def segmenter(num_classes: int, dtype: torch.dtype = torch.float16) -> TinySegNet:
    with torch.device("meta"):
        net = TinySegNet(num_classes, width=40)
    return net.to(dtype).eval()


def denoiser_tally(
    height: int, width: int, resolution: str, overlap: int, batch: int = 1
) -> tuple[Tally, int]:
    """One sample's denoiser ops (counted on a batch of ``batch`` samples, divided by it: weights are read once
    per batch) and its number of ADM forwards (tiles in tile mode)."""
    net = adm()
    size = 256
    if resolution == "tile":
        tiles = len(_tile_starts(height, size, overlap)) * len(_tile_starts(width, size, overlap))
        x = torch.empty(batch, 3, size, size, device="meta")
    else:  # native / resize: one forward at the model size, or at the padded image size
        tiles = 1
        side = (lambda v: size) if resolution == "resize" else (lambda v: -(-v // 64) * 64)
        x = torch.empty(batch, 3, side(height), side(width), device="meta")
    t = torch.full((batch,), 145, dtype=torch.long, device="meta")
    return count(net, x, t).scaled(tiles / batch), tiles


def segmenter_tally(height: int, width: int, num_classes: int, batch: int = 1) -> Tally:
    net = segmenter(num_classes)
    x = torch.empty(batch, 3, -(-height // 4) * 4, -(-width // 4) * 4, device="meta", dtype=torch.float16)
    return count(net, x).scaled(1 / batch)


def config_shape(path: Path) -> dict[str, Any]:
    """(image size, resolution, overlap, n0 + n, classes) of a paper config."""
    import yaml  # here: bench/gpu.py imports this module on machines without PyYAML

    cfg = yaml.safe_load(path.read_text())
    den = next(iter(cfg["models"]["denoisers"].values()))
    size = cfg["dataset"].get("resize") or {"cityscapes": (1024, 2048)}.get(
        cfg["dataset"]["kind"], (512, 512)
    )
    return {
        "name": cfg["name"],
        "height": size[0],
        "width": size[1],
        "resolution": den.get("resolution", "native"),
        "overlap": int(den.get("tile_overlap", 0)),
        "samples": int(cfg["sampling"]["n0"]) + int(cfg["sampling"]["n"]),
        "classes": int(cfg["dataset"]["num_classes"]),
        "batch": int(cfg["sampling"]["batch_size"]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense fp16/bf16 TFLOP/s (H200: 989)")
    ap.add_argument("--peak-tbps", type=float, default=4.8, help="memory bandwidth, TB/s (H200: 4.8)")
    ap.add_argument("--configs", default="configs/paper_cityscapes.yaml,configs/paper_pascal_context.yaml")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args(argv)
    peak_flops, peak_bw = args.peak_tflops * 1e12, args.peak_tbps * 1e12
    rows = []
    for rel in args.configs.split(","):
        shape = config_shape(ROOT / rel)
        h, w, b = shape["height"], shape["width"], shape["batch"]
        den, forwards = denoiser_tally(h, w, shape["resolution"], shape["overlap"], b)
        seg = segmenter_tally(h, w, shape["classes"], b)
        per_sample = den.add(seg)
        seconds = per_sample.seconds(peak_flops, peak_bw)
        total_flops = sum(per_sample.flops.values())
        predicted = sum(seconds.values())
        non_matmul = sum(per_sample.bytes[c] for c in ("norm", "elementwise", "copies/casts"))
        print(
            f"\n## {shape['name']}: {shape['height']}x{shape['width']}, {shape['resolution']} "
            f"({forwards} ADM forwards per sample), {shape['samples'] + 1} samples per (image, sigma)\n"
        )
        print(
            "| op class | launches | TFLOP | GB moved | predicted ms | share of time |\n|---|---|---|---|---|---|"
        )
        for c in CLASSES:
            print(
                f"| {c} | {per_sample.launches[c]:.0f} | {per_sample.flops[c] / 1e12:.3f} | "
                f"{per_sample.bytes[c] / 1e9:.2f} | {1e3 * seconds[c]:.1f} | {seconds[c] / predicted:.2f} |"
            )
        row = {
            "config": shape["name"],
            "forwards_per_sample": forwards,
            "tflop_per_sample": total_flops / 1e12,
            "adm_tflop_per_forward": sum(den.flops.values()) / forwards / 1e12,
            "non_matmul_gb_per_sample": non_matmul / 1e9,
            "adm_non_matmul_gb_per_forward": sum(
                den.bytes[c] for c in ("norm", "elementwise", "copies/casts")
            )
            / forwards
            / 1e9,
            "predicted_s_per_sample": predicted,
            "predicted_s_per_image_sigma": predicted * (shape["samples"] + 1),
            "roofline_s_per_image_sigma": total_flops / peak_flops * (shape["samples"] + 1),
            "fraction_of_flop_roofline": total_flops / peak_flops / predicted,
        }
        rows.append(row)
        print(
            f"\nper sample: {row['tflop_per_sample']:.2f} TFLOP (ADM {row['adm_tflop_per_forward']:.2f} TFLOP per "
            f"forward), non-matmul traffic {row['non_matmul_gb_per_sample']:.1f} GB "
            f"(ADM {row['adm_non_matmul_gb_per_forward']:.2f} GB per forward); predicted "
            f"{row['predicted_s_per_image_sigma']:.1f} s per (image, sigma) against {row['roofline_s_per_image_sigma']:.1f} s "
            f"at the FLOP roofline: {row['fraction_of_flop_roofline']:.2f} of it ({1 / row['fraction_of_flop_roofline']:.2f}x)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
