"""GPU benchmark of the sampler's fast path: samples/s per option against the forward-only roofline.

Models (random weights, nothing downloaded): the project's ``ADMUNet`` with guided-diffusion's
256x256_uncond flags (``ADM_PRESETS``, about 550 M parameters) inside ``DiffusionDenoiser``, and a segmenter
of HRNet's size class (torchvision ``deeplabv3_resnet50``, 19 classes; a wide ``TinySegNet`` when torchvision
is missing). Options mirror the job's (``VoteSampler``): ADM blocks in half precision via
``ADMUNet.convert_blocks_to`` (as ``load_adm_denoiser`` does on CUDA), bf16/fp16 under ``torch.autocast``
(``sampling.dtype``), ``channels_last`` and ``torch.compile`` via ``sampling.prepare_model``.

Per option and batch size B, timed with device synchronisation:

* roofline: only ``segment(denoise(x))`` on full batches of B noisy images (noise drawn beforehand);
* roofline + clean: count_votes' batch structure, the same forwards plus the clean image alone through the
  segmenter first (count_votes draws S0 and S in one stream of ceil((n0 + n)/B) batches);
* count_votes: ``sampling.count_votes`` for one image, n0 + n samples (noise on device, votes counted on
  device, one host copy): samples/s and its ratio to the roofline.

Self-checks (exit code 1 when one fails): finite outputs; count_votes run twice with one seed gives identical
votes (reproducible) for every option; counts sum to n0 and n. Reported beside: agreement of c_hat with the
fp32 option, peak device memory. Options that would overrun ``--budget`` seconds are skipped and listed.

``--cpu-smoke``: a tiny ADM (32 x 32) and TinySegNet on the CPU, to test this script's logic anywhere.
Run on a GPU machine through ``bench/gpu.sh`` (installs nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ray_certseg.models.adm import ADM_PRESETS, ADMUNet
from ray_certseg.models.denoisers import DiffusionDenoiser
from ray_certseg.models.schedule import adm_alphas_cumprod
from ray_certseg.models.segmenters import IMAGENET_MEAN, IMAGENET_STD, Segmenter
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
    # name: (ADM block dtype or None, autocast dtype or None, channels_last, compile)
    "fp32": (None, None, False, False),
    "adm-fp16-blocks": ("float16", None, False, False),  # the job's default on CUDA (flags use_fp16)
    "bf16": ("bfloat16", "bfloat16", False, False),  # sampling.dtype: bfloat16
    "fp16": ("float16", "float16", False, False),  # sampling.dtype: float16
    "bf16+channels_last": ("bfloat16", "bfloat16", True, False),
    "bf16+compile": ("bfloat16", "bfloat16", False, True),
}


@dataclass
class Result:
    option: str
    batch: int
    roofline: float = math.nan  # samples/s, full batches
    with_clean: float = math.nan  # samples/s, count_votes' batch structure (clean image first)
    count_votes: float = math.nan  # samples/s
    first_call_s: float = math.nan  # first count_votes call (compilation included)
    peak_gib: float = math.nan
    agree_fp32: float = math.nan
    checks: list[str] = field(default_factory=list)


class _Out(nn.Module):
    """torchvision segmentation models return a dict; the logits are under "out"."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)["out"]


def build_segmenter(smoke: bool, num_classes: int) -> tuple[Segmenter, str]:
    from ray_certseg.models.tiny import tiny_segnet

    if not smoke:
        try:
            from torchvision.models.segmentation import deeplabv3_resnet50

            net = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes)
            return Segmenter(
                _Out(net),
                num_classes=num_classes,
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                name="deeplabv3_resnet50",
            ), "deeplabv3_resnet50 (torchvision, random weights)"
        except ImportError:
            pass
    width = 8 if smoke else 64
    return (
        Segmenter(
            tiny_segnet(num_classes, width=width),
            num_classes=num_classes,
            mean=[0.5] * 3,
            std=[0.25] * 3,
            name="tiny",
        ),
        f"TinySegNet width {width} (random weights)",
    )


def build_models(option: str, smoke: bool, device: torch.device, num_classes: int, seed: int):
    """Fresh models for one option, prepared as the job's actor prepares them."""
    block, _, channels_last, compile_ = OPTIONS[option]
    torch.manual_seed(seed)
    with device:  # initialise the weights on the device: seconds saved per option for 550 M parameters
        unet = ADMUNet(**(SMOKE_ADM if smoke else ADM_PRESETS["256x256_uncond"])).eval()
        seg, _ = build_segmenter(smoke, num_classes)
    if block is not None:
        unet.convert_blocks_to(resolve_dtype(block))
    den = DiffusionDenoiser(
        unet,
        adm_alphas_cumprod(),
        sample_size=unet.image_size,
        multiple_of=unet.multiple_of,
        name="adm-random",
    )
    prep = {"device": device, "channels_last": channels_last, "compile": compile_}
    return prepare_model(seg, **prep), prepare_model(den, **prep)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_seconds(
    seg, den, x: Tensor, sizes: list[int], sigma: float, autocast, device, repeats: int, channels_last: bool
) -> float:
    """Seconds of segment(denoise(.)) over batches of ``sizes`` (best of ``repeats`` passes after an untimed
    one: recompilation, autotuning); the clean image (size marked 0) goes through the segmenter alone, as in
    count_votes."""
    gen = torch.Generator(device=device).manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    batches = {
        b: (x + sigma * torch.randn(max(b, 1), *x.shape, generator=gen, device=device)).contiguous(
            memory_format=fmt
        )
        for b in set(sizes)
    }
    times = []
    with torch.inference_mode(), autocast():
        for _ in range(repeats + 1):
            sync(device)
            start = time.perf_counter()
            for b in sizes:
                seg(batches[b]) if b == 0 else seg(den(batches[b], sigma))
            sync(device)
            times.append(time.perf_counter() - start)
    return min(times[1:])


def run_option(
    option: str,
    batch: int,
    args: argparse.Namespace,
    device: torch.device,
    x: Tensor,
    fp32_c_hat: dict[int, Any],
) -> Result:
    _, amp, channels_last, _ = OPTIONS[option]
    r = Result(option, batch)
    seg, den = build_models(option, args.cpu_smoke, device, args.num_classes, args.seed)
    amp_dtype = resolve_dtype(amp)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    votes = lambda counts=False: count_votes(
        x,
        seg,
        denoiser=den,
        sigma=args.sigma,
        n0=args.n0,
        n=args.n,
        num_classes=args.num_classes,
        batch_size=batch,
        seed=args.seed,
        image_id="bench",
        device=device,
        autocast_dtype=amp_dtype,
        channels_last=channels_last,
        return_counts=counts,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        first = votes(True)  # warm-up (compilation, cuDNN autotuning, allocator), with the counts to check
    except ValueError as exc:  # non-finite logits
        r.checks.append(f"FAILED: {exc}")
        return r
    r.first_call_s = time.perf_counter() - start
    full = [min(batch, args.n0 + args.n - s) for s in range(0, args.n0 + args.n, batch)]
    with_clean = [0, *full]  # 0: the clean image, segmenter alone
    rate = lambda sizes: (
        (args.n0 + args.n)
        / forward_seconds(seg, den, x, sizes, args.sigma, autocast, device, args.repeats, channels_last)
    )
    r.roofline, r.with_clean = rate(full), rate(with_clean)  # both in noisy samples/s, as count_votes
    times = []
    for _ in range(args.repeats):
        sync(device)
        t = time.perf_counter()
        again = votes()
        sync(device)
        times.append(time.perf_counter() - t)
    r.count_votes = (args.n0 + args.n) / min(times)
    if device.type == "cuda":
        r.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    if not ((first.counts0.sum(0) == args.n0).all() and (first.k <= args.n).all()):
        r.checks.append("FAILED: counts do not sum to n0 / k > n")
    if not ((first.c_hat == again.c_hat).all() and (first.k == again.k).all()):
        r.checks.append("FAILED: not reproducible (same seed, different votes)")
    if option == "fp32":
        fp32_c_hat[batch] = first.c_hat
    if batch in fp32_c_hat:
        r.agree_fp32 = float((first.c_hat == fp32_c_hat[batch]).mean())
    return r


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU (tests the logic)")
    p.add_argument("--image-size", type=int, default=256, help="H = W of the test image")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 55])
    p.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    p.add_argument("--n0", type=int, default=10)
    p.add_argument("-n", type=int, default=100)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--num-classes", type=int, default=19)
    p.add_argument("--repeats", type=int, default=3, help="best-of repeats for each timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=270.0, help="seconds; later measurements are skipped")
    p.add_argument(
        "--compile-reserve",
        type=float,
        default=120.0,
        help="seconds of budget a torch.compile option needs left to start",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.image_size = min(args.image_size, 32)
        args.batch_sizes = [b for b in args.batch_sizes if b <= 8] or [4]
        args.n0, args.n, args.repeats, args.compile_reserve = min(args.n0, 2), min(args.n, 6), 1, 0.0
        if "--options" not in (sys.argv[1:] if argv is None else argv):
            args.options = ["fp32", "bf16", "bf16+channels_last"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if args.cpu_smoke:
        torch.set_num_threads(1)  # a shared CPU: more threads than free cores multiply the time per op
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke to test the logic on the CPU", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # fixed algorithms: reproducible votes
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.rand(3, args.image_size, args.image_size, generator=gen).to(device)
    with torch.device("meta"):
        params = sum(
            p.numel()
            for p in ADMUNet(**(SMOKE_ADM if args.cpu_smoke else ADM_PRESETS["256x256_uncond"])).parameters()
        )
    with torch.device("meta"):
        seg_desc = build_segmenter(args.cpu_smoke, args.num_classes)[1]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(
        f"device: {name}; torch {torch.__version__}; image {args.image_size}x{args.image_size}, "
        f"n0={args.n0}, n={args.n}, sigma={args.sigma}; ADM {'smoke' if args.cpu_smoke else '256x256_uncond'} "
        f"{params / 1e6:.0f}M params, {seg_desc}",
        flush=True,
    )
    results, skipped, fp32_c_hat = [], [], {}
    # fp32 first (the reference of the agreement column), torch.compile last (its first call is long)
    order = sorted(args.options, key=lambda o: (o != "fp32", OPTIONS[o][3]))
    for option in order:
        for batch in args.batch_sizes:
            elapsed = time.perf_counter() - start
            spent = [r for r in results if r.option == option]
            # compile pays its first call again per batch size: one batch size only, and only with time left
            compiling = OPTIONS[option][3]
            if elapsed > args.budget - (args.compile_reserve if compiling else 0) or (compiling and spent):
                skipped.append(f"{option}@{batch}")
                continue
            r = run_option(option, batch, args, device, x, fp32_c_hat)
            results.append(r)
            print(
                f"  {option:20s} B={batch:3d}: roofline {r.roofline:8.1f}  count_votes {r.count_votes:8.1f} "
                f"samples/s  ({time.perf_counter() - start:.0f} s){' ' + '; '.join(r.checks) if r.checks else ''}",
                flush=True,
            )
    print(report(results, skipped, args))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 1 if any(r.checks for r in results) else 0


def report(results: list[Result], skipped: list[str], args: argparse.Namespace) -> str:
    rows = []
    for r in results:
        rows.append(
            [
                r.option,
                r.batch,
                f"{r.roofline:.1f}",
                f"{r.with_clean:.1f}",
                f"{r.count_votes:.1f}",
                f"{r.count_votes / r.roofline:.3f}",
                f"{r.with_clean / r.roofline:.3f}",
                f"{(args.n0 + args.n) / r.count_votes:.3f}",
                f"{r.first_call_s:.1f}",
                f"{r.peak_gib:.1f}",
                f"{r.agree_fp32:.4f}",
                "ok" if not r.checks else "FAILED",
            ]
        )
    headers = [
        "option",
        "B",
        "roofline samples/s",
        "roofline + clean",
        "count_votes samples/s",
        "count_votes/roofline",
        "+clean/roofline",
        "s per image",
        "first call s",
        "peak GiB",
        "c_hat = fp32",
        "checks",
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    fmt = lambda row: "  ".join(str(c).rjust(w) for c, w in zip(row, widths))
    lines = ["", fmt(headers), "-" * len(fmt(headers))] + [fmt(row) for row in rows]
    if skipped:
        lines.append(
            f"skipped (time budget {args.budget:.0f} s, or compile at a second batch size): "
            + ", ".join(skipped)
        )
    best = max(results, key=lambda r: r.count_votes, default=None)
    if best is not None:
        lines.append(
            f"best: {best.option} at B={best.batch}: {best.count_votes:.1f} samples/s = "
            f"{best.count_votes / (args.n0 + args.n):.2f} images/s of {args.image_size}x{args.image_size} "
            f"at n0+n={args.n0 + args.n}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
