"""GPU benchmark: what fraction of the roofline the sampler reaches on the job's own shapes, in one 5-minute run.

1. The machine first: its bf16 matmul peak (TFLOP/s, square matmuls) and its copy bandwidth (GB/s moved by a
   device-to-device copy, read + write).
2. Then the job's shapes, with random weights (nothing downloaded): the project's ``ADMUNet`` with
   guided-diffusion's 256x256_uncond flags (``ADM_PRESETS``, 552 M parameters) inside ``DiffusionDenoiser`` and a
   full-resolution segmenter of HRNet's size class (torchvision ``deeplabv3_resnet50``, 19 classes; the cost
   model's ``TinySegNet`` width 40 without torchvision), prepared as the job's actor prepares them
   (``prepare_model``, ``convert_blocks_to`` as ``load_adm_denoiser`` on CUDA):

   * ``cityscapes-tile``: one 1024 x 2048 image, the denoiser in tile mode (256 x 256 tiles, overlap 32:
     45 tiles per sample), as configs/paper_cityscapes.yaml;
   * ``pascal-tile``: one 480 x 480 image (configs/paper_pascal_context.yaml: 4 tiles).

   Per option and workload (``OPTIONS``, in this order, each option on every workload before the next: fp16
   autocast, one tile position of every sample per network call; fp16 with the tiles of all samples batched
   up to ``sampling.tile_pixels: auto`` (half the free memory, at most 32 tiles a call); the ADM fp16 blocks,
   the job's default on CUDA; bf16 autocast; fp32; last, fp16 with batched tiles and ``torch.compile``, the
   paper configs' setting) one ``count_votes`` call warms up (compiles, autotunes; inside the
   budget), then the best of ``--repeats`` timed calls of n0 + n samples gives a row, printed as soon as it is
   measured and appended to ``OUT/gpu.jsonl``: samples/s, achieved TFLOP/s (the cost model's FLOPs per sample x
   samples/s), the fraction of the measured peak, the cost model's predicted time at the measured peaks against
   the measured one, peak memory, the synchronising CUDA calls of one ``count_votes`` call
   (``torch.cuda.set_sync_debug_mode``; by design a few per image, none per batch) and the self-checks (finite
   logits, counts summing to n0, the same votes from two calls with one seed).

Each (workload, option) runs in its own try block: an out-of-memory or compile error is recorded in its row and
the run goes on. A row that would start past ``--budget`` seconds is recorded as skipped (compile options need
``--compile-reserve`` seconds left). ``--cpu-smoke``: tiny models and images on the CPU, the same code paths.

Run on a GPU machine through ``bench/gpu.sh OUT`` (installs nothing; needs python3 with torch, numpy, scipy).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cost_model

from ray_certseg.models.adm import ADM_PRESETS, ADMUNet
from ray_certseg.models.denoisers import DiffusionDenoiser
from ray_certseg.models.schedule import adm_alphas_cumprod
from ray_certseg.models.segmenters import IMAGENET_MEAN, IMAGENET_STD, Segmenter, _OutputKey
from ray_certseg.models.tiny import TinySegNet
from ray_certseg.models.util import resolve_dtype
from ray_certseg.sampling import count_votes, prepare_model

SMOKE_ADM = {
    **ADM_PRESETS["256x256_uncond"],
    "image_size": 32,
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": "1,2,2",
    "attention_resolutions": "16,8",
    "num_head_channels": 16,
}
OPTIONS = {
    # name: (ADM block dtype or None, autocast dtype or None, compile, tiles batched (sampling.tile_pixels auto)),
    # in the order a run measures them (each on every workload before the next; compile options last): the
    # answers a short GPU lease most needs first, fp32 (the slowest, least used) last of the eager ones
    "fp16": ("float16", "float16", False, False),  # sampling.dtype: float16, one tile position per call
    "fp16+tiles": ("float16", "float16", False, True),  # + tile_pixels auto: tiles of all samples together
    "adm-fp16-blocks": ("float16", None, False, False),  # the job's default on CUDA (flags use_fp16)
    "bf16": ("bfloat16", "bfloat16", False, False),  # sampling.dtype: bfloat16
    "fp32": (None, None, False, False),
    "fp16+tiles+compile": ("float16", "float16", True, True),  # the paper configs: sampling.compile: true
}
SMOKE_TILES = 4  # --cpu-smoke: tiles per call of the batched options (auto sizes from CUDA memory only)
WORKLOADS = {
    # name: (height, width, tile overlap); the denoiser tiles at the ADM's image size
    "cityscapes-tile": (1024, 2048, 32),
    "pascal-tile": (480, 480, 32),
}
SMOKE_WORKLOADS = {"cityscapes-tile": (32, 64, 8), "pascal-tile": (40, 40, 8)}


@dataclass
class Row:
    kind: str  # "peak" | "workload"
    name: str
    option: str = ""
    samples_per_s: float = math.nan
    achieved_tflops: float = math.nan
    fraction_of_peak: float = math.nan
    predicted_s: float = math.nan
    measured_s: float = math.nan
    first_call_s: float = math.nan
    peak_gib: float = math.nan
    host_syncs: int = -1  # synchronising CUDA calls in one count_votes call (-1: not on CUDA)
    tiles_per_call: int = 0  # ADM tiles per network call (the batch size: one tile position per call)
    value: float = math.nan  # peaks: TFLOP/s or GB/s
    checks: list[str] = field(default_factory=list)
    error: str = ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device, repeats: int) -> float:
    """Best of ``repeats`` synchronised calls, after one untimed call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_peaks(device: torch.device, smoke: bool, repeats: int) -> tuple[Row, Row]:
    """(bf16 matmul TFLOP/s, copy GB/s moved) of this device."""
    n = 256 if smoke else 8192
    dtype = torch.bfloat16
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = timed(lambda: a @ b, device, repeats)
    matmul = Row("peak", "bf16 matmul", value=2 * n**3 / seconds / 1e12)
    src = torch.empty((4 if smoke else 1024) * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, repeats)
    copy = Row("peak", "copy", value=2 * src.numel() / seconds / 1e9)
    return matmul, copy


def build_segmenter(smoke: bool, num_classes: int, device: torch.device | str) -> tuple[nn.Module, str]:
    with torch.device(device):
        if not smoke:
            try:
                from torchvision.models.segmentation import deeplabv3_resnet50

                net = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes)
                return Segmenter(
                    _OutputKey(net, "out"), num_classes=num_classes, mean=IMAGENET_MEAN, std=IMAGENET_STD
                ), "deeplabv3_resnet50"
            except ImportError:
                pass
        width = 8 if smoke else 40
        return Segmenter(
            TinySegNet(num_classes, width=width), num_classes=num_classes, mean=[0.5] * 3, std=[0.25] * 3
        ), f"TinySegNet width {width}"


def build_adm(smoke: bool, block: str | None, device: torch.device | str) -> ADMUNet:
    with torch.device(device):
        unet = ADMUNet(**(SMOKE_ADM if smoke else ADM_PRESETS["256x256_uncond"])).eval()
    return unet.convert_blocks_to(resolve_dtype(block)) if block is not None else unet


def build(option: str, workload: str, args: argparse.Namespace, device: torch.device) -> tuple[Any, Any]:
    """Fresh models for one (workload, option), prepared as the job's actor prepares them."""
    block, amp, compile_, batched = OPTIONS[option]
    torch.manual_seed(args.seed)
    unet = build_adm(args.cpu_smoke, block, device)
    overlap = (SMOKE_WORKLOADS if args.cpu_smoke else WORKLOADS)[workload][2]
    den = DiffusionDenoiser(
        unet,
        adm_alphas_cumprod(),
        resolution="tile",
        sample_size=unet.image_size,
        tile_overlap=overlap,
        multiple_of=unet.multiple_of,
        name="adm-random",
    )
    if batched:  # as the actor does for sampling.tile_pixels: auto (which the CPU smoke run cannot size)
        den.fit_tile_pixels_to(device, resolve_dtype(amp))
        den.tile_pixels = den.tile_pixels or SMOKE_TILES * unet.image_size**2
    seg, _ = build_segmenter(args.cpu_smoke, args.num_classes, device)
    prep = {"device": device, "compile": compile_}
    return prepare_model(seg, **prep), prepare_model(den, **prep)


def predicted(
    option: str, workload: str, args: argparse.Namespace, tiles_per_call: int | None = None
) -> tuple[float, Any]:
    """The cost model's tally of one sample of (workload, option), counted on the meta device: the denoiser's
    tiles (``tiles_per_call`` per network call, default the batch size: the weights are read once a call)
    and the segmenter at full resolution, convolutions in the option's half dtype (autocast counted as half
    models)."""
    block, amp, _, _ = OPTIONS[option]
    height, width, overlap = (SMOKE_WORKLOADS if args.cpu_smoke else WORKLOADS)[workload]
    unet = build_adm(args.cpu_smoke, block, "meta")
    size = unet.image_size
    tiles = len(cost_model._tile_starts(height, size, overlap)) * len(
        cost_model._tile_starts(width, size, overlap)
    )
    b, k = args.batch_size, tiles_per_call or args.batch_size
    x = torch.empty(k, 3, size, size, device="meta")
    t = torch.full((k,), 145, dtype=torch.long, device="meta")
    den = cost_model.count(unet, x, t).scaled(tiles / k)
    seg, _ = build_segmenter(args.cpu_smoke, args.num_classes, "meta")
    half = resolve_dtype(amp)
    seg = seg.to(half) if half is not None else seg
    images = torch.empty(b, 3, height, width, device="meta", dtype=half or torch.float32)
    return tiles, den.add(cost_model.count(seg, images).scaled(1 / b))


def run_workload(
    option: str, workload: str, args: argparse.Namespace, device: torch.device, peaks: tuple[Row, Row]
) -> Row:
    row = Row("workload", workload, option)
    height, width, _ = (SMOKE_WORKLOADS if args.cpu_smoke else WORKLOADS)[workload]
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.rand(3, height, width, generator=gen).to(device)
    seg, den = build(option, workload, args, device)
    row.tiles_per_call = den.tiles_per_call(args.batch_size)
    _, tally = predicted(option, workload, args, row.tiles_per_call)
    amp = resolve_dtype(OPTIONS[option][1])
    votes = lambda counts=False: count_votes(
        x,
        seg,
        denoiser=den,
        sigma=args.sigma,
        n0=args.n0,
        n=args.n,
        num_classes=args.num_classes,
        batch_size=args.batch_size,
        seed=args.seed,
        image_id="bench",
        device=device,
        autocast_dtype=amp,
        return_counts=counts,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    first = votes(True)  # warm-up: compilation, autotuning, allocator; with the counts to check
    row.first_call_s = time.perf_counter() - start
    best, again = math.inf, first
    for _ in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        again = votes()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    row.host_syncs = count_host_syncs(votes, device)
    samples = args.n0 + args.n + 1  # the clean image is one more segmenter call; counted as a sample
    flops = sum(tally.flops.values()) * samples
    matmul, copy = peaks
    row.measured_s, row.samples_per_s = best, (args.n0 + args.n) / best
    row.achieved_tflops = flops / best / 1e12
    row.fraction_of_peak = row.achieved_tflops / matmul.value
    row.predicted_s = sum(tally.seconds(matmul.value * 1e12, copy.value * 1e9).values()) * samples
    if device.type == "cuda":
        row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    if not ((first.counts0.sum(0) == args.n0).all() and (first.k <= args.n).all()):
        row.checks.append("counts do not sum to n0 / k > n")
    if not ((first.c_hat == again.c_hat).all() and (first.k == again.k).all()):
        row.checks.append("not reproducible (same seed, different votes)")
    return row


def count_host_syncs(votes: Any, device: torch.device) -> int:
    """Synchronising CUDA calls in one ``count_votes`` call (``torch.cuda.set_sync_debug_mode``: each one warns).
    The sampler's design has one per image (the finiteness flag and the copy of c_hat, k, the clean
    prediction), none per batch; -1 off CUDA."""
    if device.type != "cuda":
        return -1
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            votes()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def show(row: Row) -> str:
    if row.kind == "peak":
        unit = "TFLOP/s" if "matmul" in row.name else "GB/s"
        return f"peak  {row.name:12s} {row.value:10.1f} {unit}" + (
            f"  ERROR {row.error}" if row.error else ""
        )
    if row.error:
        return f"{row.name:16s} {row.option:18s} {row.error}"
    return (
        f"{row.name:16s} {row.option:18s} {row.samples_per_s:9.2f} samples/s  {row.tiles_per_call:3d} tiles/call  "
        f"{row.achieved_tflops:8.2f} TFLOP/s  "
        f"{row.fraction_of_peak:6.3f} of peak  predicted {row.predicted_s:8.3f} s / measured {row.measured_s:8.3f} s"
        f"  first call {row.first_call_s:6.1f} s  peak {row.peak_gib:6.2f} GiB  syncs {row.host_syncs}  "
        f"{'ok' if not row.checks else 'FAILED: ' + '; '.join(row.checks)}"
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "out", type=Path, help="folder for gpu.jsonl (one JSON row per line, appended as measured)"
    )
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU (tests the logic)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    p.add_argument("--batch-size", type=int, default=10, help="sampling.batch_size (the paper configs: 10)")
    p.add_argument("--n0", type=int, default=2, help="selection samples per timed call")
    p.add_argument("-n", type=int, default=8, help="estimation samples per timed call")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--num-classes", type=int, default=19)
    p.add_argument("--repeats", type=int, default=2, help="best-of repeats for each timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=270.0, help="seconds; later rows are recorded as skipped")
    p.add_argument("--compile-reserve", type=float, default=90.0, help="seconds a compile option needs left")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.batch_size, args.n0, args.n, args.repeats, args.compile_reserve = 2, 1, 2, 1, 0.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke to test the logic on the CPU", file=sys.stderr)
        return 2
    if args.cpu_smoke:
        torch.set_num_threads(1)  # a shared CPU: more threads than free cores multiply the time per op
    else:
        torch.backends.cudnn.benchmark = False  # fixed algorithms: reproducible votes
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "gpu.jsonl"
    start = time.perf_counter()

    def record(row: Row) -> None:
        print(show(row), flush=True)
        with log.open("a") as f:
            f.write(json.dumps(asdict(row)) + "\n")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(
        f"device: {name}; torch {torch.__version__}; n0={args.n0}, n={args.n}, B={args.batch_size}",
        flush=True,
    )
    try:
        peaks = measure_peaks(device, args.cpu_smoke, args.repeats)
    except Exception as exc:  # noqa: BLE001 - a broken device is reported, not a traceback
        record(Row("peak", "bf16 matmul", error=f"{type(exc).__name__}: {exc}"))
        return 1
    for row in peaks:
        record(row)
    failed = False
    runs = [(workload, option) for option in args.options for workload in args.workloads]
    for workload, option in sorted(runs, key=lambda run: OPTIONS[run[1]][2]):  # compile last: long warm-up
        left = args.budget - (time.perf_counter() - start)
        if left < (args.compile_reserve if OPTIONS[option][2] else 0) or left <= 0:
            record(Row("workload", workload, option, error=f"skipped: {left:.0f} s of budget left"))
            continue
        try:
            row = run_workload(option, workload, args, device, peaks)
        except Exception as exc:  # noqa: BLE001 - OOM, compile errors, anything: recorded, the run goes on
            row = Row("workload", workload, option, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc(limit=3)
            failed = True
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        failed |= bool(row.checks)
        record(row)
    print(f"rows in {log} ({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
