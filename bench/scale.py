"""Benchmark 6, scale with the work: many tiny images through the whole job, at 1e3, 1e4 (and 1e5) images.

Workload (where the job's own per-row costs decide the bill): N random 16 x 16 images (PNG, with labels, in
a manifest), one method with a near-free model (``tiny_segnet`` width 8, random weights, no denoiser), one
sigma, n0 = 1 and n = 20 (n = 20 rather than 2 so that the reducer has pixels to certify at tau = 0.6,
alpha = 0.1), two actors of 0.875 CPU, the job's defaults for batching (``ray.batch_size``/``rows_per_file``:
``auto``). Each size runs in its own process (its driver peak memory is its own), which reports:

* wall time split into Ray start-up, planning (``prepare_run``: listing, probe, resume scan), sampling and
  writing (``run_sampling``, one stage: Ray Data writes while it samples) and reducing (``reduce_output``);
* vote files, bytes per row, driver peak RSS (``ru_maxrss``) after planning and at the end;
* the sampler's rows/s, the actors' CPU per row and the share of it spent outside ``count_votes`` (the
  per-row overhead), and the reducer's rows/s;
* two reruns of ``jobs/certify.py`` on the finished output, each a new process, start-up included: the first
  certifies and plots (the stages above write no plots), the second finds metrics/ and plots/ up to date.

Run: ``python bench/scale.py`` (1e3 and 1e4), ``--sizes 1000,3000``, ``--with-1e5``, ``--per-image 1000,3000``
(those sizes also with one image per Ray batch and per vote file: the layout before issue 17); ``--quick``: 40
images.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ray_certseg.results import image_records

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as B

ROOT = Path(__file__).resolve().parents[1]
SIZE, CLASSES = 16, 4


def write_dataset(root: Path, count: int) -> Path:
    """``count`` random 16 x 16 RGB PNGs and their labels, and a manifest (paths relative to it)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    lines = ["image_path,label_path,image_id"]
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / f"i{i}.png")
        Image.fromarray(rng.integers(0, CLASSES, (SIZE, SIZE), dtype=np.uint8)).save(root / f"l{i}.png")
        lines.append(f"i{i}.png,l{i}.png,img{i:06d}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def config(manifest: Path, weights: Path, output: Path, images: int) -> dict[str, Any]:
    return {
        "name": "scale",
        "output": str(output),
        "dataset": {
            "kind": "manifest",
            "manifest": str(manifest),
            "name": "scale",
            "num_classes": CLASSES,
            "limit": images,
        },
        "models": {
            "segmenters": {
                "seg": {
                    "kind": "module",
                    "factory": "ray_certseg.models.tiny:tiny_segnet",
                    "kwargs": {"num_classes": CLASSES, "width": 8},
                    "weights": str(weights),
                    "num_classes": CLASSES,
                }
            }
        },
        "methods": {"plain": {"segmenter": "seg"}},
        "sampling": {"sigmas": [0.25], "n0": 1, "n": 20, "batch_size": 21, "seed": 0, "device": "cpu"},
        "certify": {"taus": [0.6], "alphas": [0.1], "corrections": ["holm"]},
        "ray": {"actors": 2, "num_cpus_per_actor": 0.875},
    }


def one_size(config_path: str) -> dict[str, Any]:
    """Runs in its own process: the job's stages on a fresh output, timed one by one."""
    import pyarrow.parquet as pq

    from ray_certseg.config import load_config
    from ray_certseg.job import pipeline
    from ray_certseg.job.rundir import RunDir
    from ray_certseg.results import reduce

    cfg = load_config(config_path)
    t = time.perf_counter()
    startup = B.init_ray(2)
    t = time.perf_counter()
    job_plan = pipeline.prepare_run(cfg, overwrite=True)
    planning = time.perf_counter() - t
    rss_planned = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    with B.CpuMonitor() as monitor:
        pipeline.run_sampling(cfg, progress_interval=0, job_plan=job_plan)
    sampling = time.perf_counter() - t
    (_, _, actors0), (_, _, actors1) = monitor.samples[0], monitor.samples[-1]
    run = RunDir.of_config(cfg)
    fs, files = run.vote_files()
    rows = sum(pq.ParquetFile(f, filesystem=fs).metadata.num_rows for f in files)
    nbytes = sum(fs.get_file_info(f).size for f in files)
    seconds = pq.read_table(files, filesystem=fs, columns=["sample_seconds"])["sample_seconds"].to_numpy()
    t = time.perf_counter()
    reduce.reduce_output(run, engine="local")
    reducing = time.perf_counter() - t
    return {
        "images": cfg.dataset.limit,
        "rows": rows,
        "startup_s": startup,
        "planning_s": planning,
        "sampling_s": sampling,
        "reducing_s": reducing,
        "files": len(files),
        "bytes_per_row": nbytes / rows,
        "rss_planned_mib": rss_planned,
        "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "actor_cpu_per_row_ms": 1000 * (actors1 - actors0) / rows,
        "count_votes_per_row_ms": 1000 * float(seconds.mean()),
    }


REDUCER_GRID = {
    "taus": [0.55, 0.6, 0.7, 0.8, 0.9],
    "alphas": [0.1, 0.01, 0.001],
    "corrections": ["holm", "bonferroni"],
}


def reduce_one(output: str, mode: str) -> dict[str, Any]:
    """Runs in its own process: the reducer over a finished output at the 30 points of REDUCER_GRID, streamed
    (``reduce_output``: chunks into sums) or in memory (every per-image record gathered, then pooled: the
    reducer before issue 17's item 4); its driver memory above the process after imports."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_certseg.job.rundir import RunDir
    from ray_certseg.results import reduce

    run = RunDir(output)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    if mode == "stream":
        reduce.reduce_output(run, **REDUCER_GRID, engine="local", into="reductions/bench")
    else:
        grid = image_records.Grid(*(tuple(REDUCER_GRID[k]) for k in ("taus", "alphas", "corrections")))
        fs, files = run.vote_files()
        tables = [
            image_records.certify_table(pq.read_table(f, filesystem=fs, partitioning=None), grid)
            for f in files
        ]
        reduce.reduce_table(pa.concat_tables(tables))
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "grown_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0}


def measure_reducer(output: Path) -> dict[str, dict[str, Any]]:
    """:func:`reduce_one` in both modes, each in a new process, side by side on the same votes."""
    out = {}
    for mode in ("stream", "memory"):
        done = subprocess.run(
            [sys.executable, __file__, "--reduce-one", str(output), mode],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"reducer ({mode}) failed:\n{done.stderr[-3000:]}")
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def measure(size: int, tmp: Path, data: Path, weights: Path, per_image: bool = False) -> dict[str, Any]:
    tag = f"{size}{'-per-image' if per_image else ''}"
    out, path = tmp / f"out{tag}", tmp / f"job{tag}.yaml"
    cfg = config(data, weights, out, size)
    if per_image:  # the layout before issue 17: one image per Ray batch, one vote file per block
        cfg["ray"].update(batch_size=1, rows_per_file=1)
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, __file__, "--one", str(path)], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"size {size} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name, skipped in (("rerun_s", False), ("noop_rerun_s", True)):
        # the first rerun certifies and plots (the timed stages above made no plots), the second has nothing to do
        start = time.perf_counter()
        rerun = subprocess.run(
            [sys.executable, str(ROOT / "jobs" / "certify.py"), "--config", str(path)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        result[name] = time.perf_counter() - start
        as_expected = "0 to sample" in rerun.stderr and ("up to date with votes/" in rerun.stderr) == skipped
        if rerun.returncode != 0 or not as_expected:
            raise RuntimeError(f"rerun {name} of size {size} did something else:\n{rerun.stderr[-3000:]}")
    return result


def seconds(x: float) -> str:
    """A duration for the table: one decimal from 10 s up, two significant digits below, so that a step of a
    smoke run (a 40-row reduction takes well under 0.05 s on a fast machine) never prints as 0.0."""
    return f"{x:.1f}" if x >= 10 else f"{x:.2g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--with-1e5", action="store_true", help="also 100,000 images (about an hour here)")
    ap.add_argument("--quick", action="store_true", help="40 images: a smoke run")
    ap.add_argument(
        "--per-image",
        default="",
        help="sizes (comma-separated) also run with one image per batch and per file, the layout before",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--reduce-one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one_size(args.one)))
        return 0
    if args.reduce_one:
        print(json.dumps(reduce_one(*args.reduce_one)))
        return 0
    sizes = (
        [40] if args.quick else [int(s) for s in args.sizes.split(",")] + ([100_000] if args.with_1e5 else [])
    )
    import torch
    from safetensors.torch import save_file

    from ray_certseg.models.tiny import tiny_segnet

    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp_name:
        tmp = Path(tmp_name)
        torch.manual_seed(0)
        save_file(tiny_segnet(CLASSES, width=8).state_dict(), str(tmp / "seg.safetensors"))
        start = time.perf_counter()
        data = write_dataset(tmp / "data", max(sizes))
        print(
            f"{B.machine()}\n{max(sizes)} images written in {time.perf_counter() - start:.0f} s\n", flush=True
        )
        headers = [
            "images",
            "rows",
            "ray start s",
            "plan s",
            "sample+write s",
            "reduce s",
            "vote files",
            "bytes/row",
            "driver MiB (planned / peak)",
            "sampler rows/s",
            "actor ms/row",
            "of which count_votes",
            "reducer rows/s",
            "rerun s (certify + plot / no-op)",
        ]
        print("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers), flush=True)
        before = {int(s) for s in args.per_image.split(",") if s}
        reducers: dict[int, dict[str, Any]] = {}
        for size, per_image in [(s, p) for s in sizes for p in ((True, False) if s in before else (False,))]:
            r = measure(size, tmp, data, tmp / "seg.safetensors", per_image)
            cells = [
                f"{r['images']}{' (per image)' if per_image else ''}",
                r["rows"],
                seconds(r["startup_s"]),
                seconds(r["planning_s"]),
                seconds(r["sampling_s"]),
                seconds(r["reducing_s"]),
                r["files"],
                f"{r['bytes_per_row']:.0f}",
                f"{r['rss_planned_mib']:.0f} / {r['rss_peak_mib']:.0f}",
                f"{r['rows'] / r['sampling_s']:.1f}",
                f"{r['actor_cpu_per_row_ms']:.1f}",
                f"{r['count_votes_per_row_ms']:.1f}",
                f"{r['rows'] / r['reducing_s']:.0f}",
                f"{seconds(r['rerun_s'])} / {seconds(r['noop_rerun_s'])}",
            ]
            print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
            if not per_image:
                reducers[size] = measure_reducer(tmp / f"out{size}")
        points = len(REDUCER_GRID["taus"]) * len(REDUCER_GRID["alphas"]) * len(REDUCER_GRID["corrections"])
        headers = [
            "grid points",
            "images",
            "streamed: driver MiB grown / s",
            "in memory: driver MiB grown / s",
            "memory ratio (in memory / streamed)",
        ]
        print("\nReducer alone, in its own process per mode, side by side on the same votes:\n")
        print("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers), flush=True)
        for size, r in reducers.items():
            s, m = r["stream"], r["memory"]
            cells = [
                points,
                size,
                f"{s['grown_mib']:.0f} / {seconds(s['seconds'])}",
                f"{m['grown_mib']:.0f} / {seconds(m['seconds'])}",
                f"{m['grown_mib'] / max(1.0, s['grown_mib']):.1f}",
            ]
            print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
