"""Benchmark 2, versus the reference way: SegCertify's sampling loop against ``sampling.count_votes``.

Reference (eth-sri/segmentation-smoothing ``sample()`` + ``certify``'s ``mode``, restated): every batch of
noisy label maps is copied to the host as int64 and kept; after the n0 + n draws the (n0 + n, H * W) array is
counted pixel by pixel (per pixel: the mode of its first n0 labels, ties to the lowest class, and how many
of the other n labels equal it). Vote memory O((n0 + n) H W). The noise here is independent per sample (the
released code's shared-noise bug is not reproduced: it would change the statistics, not the cost).

Ours: ``count_votes``: noise and counts on the model's device, one (C, H * W) int32 count array per sample
set, one host copy per image. Vote memory O(C H W + batch H W).

Both run the same models (demo-size tiny segmenter behind the tiny DDPM, random weights, 64 x 64 demo images,
one torch thread) in fresh processes, alternately (best of ``--repeats`` for time). Peak memory, in one more
run of each with glibc's mmap threshold fixed (so that the resident set follows live memory): the process's
resident-set high-water mark during the call above its resident set just before it (measured after a warm-up
batch, with the kernel's peak counter reset through /proc/self/clear_refs), i.e. what the call allocates beyond
the loaded models: a batch's activations plus the vote storage. Two configurations: the paper's (n0 = 10, n = 100, denoiser + segmenter) and
SegCertify's command-line defaults (n0 = 100, n = 1000, segmenter only, to keep CPU time reasonable).
The c_hat and k of both methods are asserted identical (same seeds per sample).

Run: ``python bench/reference.py`` (``--quick``: a tiny smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as B

CONFIGS = {
    "paper": {"n0": 10, "n": 100, "denoiser": True},
    "segcertify-defaults": {"n0": 100, "n": 1000, "denoiser": False},
}
QUICK = {"quick": {"n0": 4, "n": 20, "denoiser": True}}


# ------------------------------------------------------------------------------------------ the two methods
def reference_votes(
    seg, den, x, *, sigma: float, n0: int, n: int, batch_size: int, base: int, num_classes: int
):
    """SegCertify's way: host int64 label maps of all n0 + n draws, counted per pixel afterwards.

    Draw j of the selection set uses seed sample_seed(base, SELECTION, j), draw j of the estimation set
    sample_seed(base, ESTIMATION, j) (the seeds count_votes uses), so both methods see the same noise."""
    import numpy as np
    import torch

    from ray_certseg.sampling import ESTIMATION, SELECTION, sample_seed

    seeds = [sample_seed(base, SELECTION, j) for j in range(n0)] + [
        sample_seed(base, ESTIMATION, j) for j in range(n)
    ]
    gen = torch.Generator()
    maps = []
    with torch.inference_mode():
        clean = seg(x[None]).argmax(1).cpu().numpy()  # the driver's sigma = 0 baseline prediction
        for start in range(0, n0 + n, batch_size):
            chunk = seeds[start : start + batch_size]
            noise = torch.stack([torch.empty_like(x).normal_(generator=gen.manual_seed(s)) for s in chunk])
            noisy = x + sigma * noise
            logits = seg(den(noisy, sigma) if den is not None else noisy)
            maps.append(logits.argmax(1).cpu().numpy().astype(np.int64).reshape(len(chunk), -1))
    sample = np.concatenate(maps)  # (n0 + n, H * W) int64: the reference keeps every label map
    counting = time.perf_counter()
    c_hat = np.empty(sample.shape[1], np.int64)
    k = np.empty(sample.shape[1], np.int64)
    for i in range(sample.shape[1]):  # per pixel, as the reference's mode() is called per pixel
        votes = np.zeros(num_classes, np.int64)
        for label in sample[:n0, i]:
            votes[label] += 1
        c_hat[i] = int(np.argmax(votes))
        k[i] = int(np.sum(sample[n0:, i] == c_hat[i]))
    return c_hat, k, clean, sample.nbytes, time.perf_counter() - counting


def our_votes(
    seg, den, image, *, sigma: float, n0: int, n: int, batch_size: int, image_id: str, num_classes: int
):
    from ray_certseg.sampling import count_votes

    v = count_votes(
        image,
        seg,
        denoiser=den,
        sigma=sigma,
        n0=n0,
        n=n,
        num_classes=num_classes,
        batch_size=batch_size,
        seed=0,
        image_id=image_id,
    )
    return v.c_hat.reshape(-1), v.k.reshape(-1)


# ------------------------------------------------------------------------------------ one measured process
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the models, warm up, reset the peak-RSS counter, run one method on one image; report."""
    import numpy as np
    import torch

    from ray_certseg.config import JobConfig
    from ray_certseg.sampling import noise_seed, to_tensor_image

    torch.set_num_threads(1)
    cfg = JobConfig.from_dict(spec["config"])
    seg, den = B.load_models(cfg, keep_host_memory=not spec["memory"])  # memory runs: see measure()
    image_id, image = B.demo_images(cfg)[0]
    x = to_tensor_image(image)
    sigma, n0, n, bs = spec["sigma"], spec["n0"], spec["n"], spec["batch_size"]
    with torch.inference_mode():  # warm-up: the allocator holds a batch's activations before the reset
        seg(den(x.expand(bs, -1, -1, -1), sigma) if den is not None else x.expand(bs, -1, -1, -1)).argmax(1)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    rss0 = _status_kib("VmRSS")
    cpu, start = time.process_time(), time.perf_counter()
    if spec["method"] == "reference":
        c_hat, k, _, stored, counting = reference_votes(
            seg,
            den,
            x,
            sigma=sigma,
            n0=n0,
            n=n,
            batch_size=bs,
            base=noise_seed(0, image_id, sigma),
            num_classes=B.DEMO_CLASSES,
        )
    else:
        c_hat, k = our_votes(
            seg,
            den,
            image,
            sigma=sigma,
            n0=n0,
            n=n,
            batch_size=bs,
            image_id=image_id,
            num_classes=B.DEMO_CLASSES,
        )
        stored, counting = (
            2 * B.DEMO_CLASSES * c_hat.size * 4,
            0.0,
        )  # counts0 and counts, int32; counted inline
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = (_status_kib("VmHWM") - rss0) * 1024
    return {
        "wall": wall,
        "cpu": cpu,
        "peak_bytes": peak,
        "vote_bytes": int(stored),
        "counting": counting,
        "c_hat": np.asarray(c_hat).astype(int).tolist(),
        "k": np.asarray(k).astype(int).tolist(),
    }


def measure(spec: dict[str, Any], *, memory: bool) -> dict[str, Any]:
    """Run ``worker(spec)`` in a fresh Python process (a clean heap and peak counter).

    ``memory``: with glibc's mmap threshold fixed, every large block goes back to the system when freed, so
    the resident set follows live memory (the default, dynamic threshold keeps freed activations in the heap:
    noise of tens of MiB; the job's ``keep_freed_host_memory`` keeps all of them); the page faults this costs
    make such runs useless for timing. Timing runs are set up as the job's actors are."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if memory:
        env |= {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "1"}
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps({**spec, "memory": memory})],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per method (best-of for time)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--quick", action="store_true", help="tiny models and sample counts (a smoke run)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    configs = QUICK if args.quick else {name: CONFIGS[name] for name in args.configs}
    repeats = 1 if args.quick else args.repeats
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-reference-") as tmp:
        root = Path(tmp)
        base = B.Workload(
            images=1,
            sigma=args.sigma,
            batch_size=4 if args.quick else args.batch_size,
            **({"seg_width": 8, "den_width": 8} if args.quick else {}),
        )
        models = B.write_models(root / "models", base)
        for name, c in configs.items():
            w = B.Workload(**{**base.__dict__, **c})
            spec = {
                "config": B.job_config(models, root / "out", w),
                "sigma": w.sigma,
                "n0": w.n0,
                "n": w.n,
                "batch_size": w.batch_size,
            }
            runs: dict[str, list] = {"reference": [], "ours": [], "reference-memory": [], "ours-memory": []}
            for r in range(repeats + 1):  # timing runs, then one memory run of each
                for method in ("reference", "ours") if r % 2 == 0 else ("ours", "reference"):
                    got = measure({**spec, "method": method}, memory=r == repeats)
                    runs[method if r < repeats else f"{method}-memory"].append(got)
                    print(f"{name} {method} done, load average {B.load_average()}", file=sys.stderr)
            ref, ours = runs["reference"][0], runs["ours"][0]
            if ref["c_hat"] != ours["c_hat"] or ref["k"] != ours["k"]:
                raise AssertionError(f"{name}: reference and count_votes disagree on c_hat or k")
            results[name] = (w, runs)
    print(report(results, repeats))
    return 0


def report(results: dict, repeats: int) -> str:
    mib = lambda b: f"{b / 2**20:.2f}"
    lines = [
        B.machine(),
        "one 64x64 image per run, fresh process per run, 1 torch thread; time: best of "
        + f"{repeats}; peak: one more run with a fixed malloc mmap threshold (RSS follows live memory)",
        "",
    ]
    rows = []
    for name, (w, runs) in results.items():
        what = (
            f"{name} (n0={w.n0}, n={w.n}, {'DDPM + ' if w.denoiser else ''}segmenter, batch {w.batch_size})"
        )
        best = {m: min(r["wall"] for r in runs[m]) for m in ("reference", "ours")}
        cpu = {m: min(r["cpu"] for r in runs[m]) for m in ("reference", "ours")}
        peak = {m: runs[f"{m}-memory"][0]["peak_bytes"] for m in ("reference", "ours")}
        for m in ("reference", "ours"):
            counting = min(r["counting"] for r in runs[m])
            rows.append(
                [
                    f"{what} {m}",
                    f"{best[m]:.2f}",
                    f"{cpu[m]:.2f}",
                    f"{counting:.2f}",
                    f"{best[m] / best['ours']:.3f}",
                    mib(runs[m][0]["vote_bytes"]),
                    mib(peak[m]),
                    f"{peak[m] / max(peak['ours'], 1):.1f}",
                ]
            )
    lines.append(
        B.table(
            [
                "configuration / method",
                "wall s",
                "CPU s",
                "of which counting s",
                "time vs ours",
                "vote arrays MiB",
                "peak extra RSS MiB",
                "peak vs ours",
            ],
            rows,
        )
    )
    lines += [
        "",
        "vote arrays: reference (n0 + n) H W int64 host labels; ours 2 C H W int32 counts "
        + "(counts0, counts). c_hat and k identical in both methods (asserted).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
