"""Benchmark 1, sampling efficiency: the job's steady-state throughput versus the pure forward roofline.

Workload: demo images (64 x 64), the demo-size tiny segmenter (width 24) behind the demo-size tiny DDPM UNet
(width 32), random weights; per image n0 + n = 10 + 100 noisy samples in batches of 16, sigma = 0.25; one
torch thread everywhere (the actor has 1 CPU, so Ray sets OMP_NUM_THREADS=1; this process calls
``torch.set_num_threads(1)``).

Measured side by side, in rounds (default 3); each round: in-process figures on one image, the job (twice), the
same in-process figures again:

* roofline: only the model forwards ``segment(denoise(x))`` of the n0 + n samples, in full batches (noise
  drawn beforehand; no noise generation, argmax, counting or clean prediction), in this process;
* count_votes: ``sampling.count_votes`` on the same image (what an actor runs per image), in this process;
* job: ``pipeline.run_sampling`` with 1 actor, run on 2 and on ``--images`` images: the difference of the
  two runs is the steady state (Ray Data planning, actor start-up with model loading, the first image and
  teardown cancel), in wall time and in CPU seconds of the actor and of every process of the Ray instance
  (``benchlib.CpuMonitor``, ``benchlib.Marginal``).

On a shared machine wall-clock ratios move with the load, so the headline ratio is in CPU seconds per sample:
roofline / actor (target >= 0.9; equal to the throughput ratio wherever the actor has its core), split into
the sampling overhead (roofline / count_votes, in-process) and Ray's inside the actor; and roofline / all
processes (driver, raylet, GCS, write tasks included). The wall-clock ratio is reported beside it, with the
share of a core the actor got. Ray start-up (``ray.init``) is reported separately.

Run: ``python bench/efficiency.py`` (``--quick``: a tiny smoke run).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as B

SMALL = 2  # images in the shorter of the two job runs whose difference is the steady state


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=8, help="images of the longer job run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n0", type=int, default=10)
    p.add_argument("-n", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--quick", action="store_true", help="tiny models and sample counts (a smoke run)")
    return p.parse_args(argv)


def workload(args: argparse.Namespace) -> B.Workload:
    if args.quick:
        return B.Workload(images=3, sigma=args.sigma, n0=2, n=6, batch_size=4, seg_width=8, den_width=8)
    return B.Workload(images=args.images, sigma=args.sigma, n0=args.n0, n=args.n, batch_size=args.batch_size)


def in_process(seg, den, image_id: str, image, w: B.Workload) -> dict[str, float]:
    """Roofline and count_votes on one image: wall and CPU seconds of each (CPU of this thread: torch with
    one thread computes on the calling thread; Ray's own threads in this process are not counted)."""
    out = {}
    for name, fn in (
        ("roofline", lambda: B.forward_seconds(seg, den, image, w)),
        ("count_votes", lambda: B.count_votes_seconds(seg, den, image_id, image, w)),
    ):
        cpu = time.thread_time()
        out[f"{name}_wall"] = B.timed(fn)
        out[f"{name}_cpu"] = time.thread_time() - cpu
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from ray_certseg.config import JobConfig

    args = parse(argv)
    w = workload(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-efficiency-") as tmp:
            root = Path(tmp)
            cfg_dict = B.job_config(B.write_models(root / "models", w), root / "out", w, actors=1)
            cfg = JobConfig.from_dict(cfg_dict)
            seg, den = B.load_models(cfg)
            images = B.demo_images(cfg)
            B.forward_seconds(
                seg,
                den,
                images[0][1],
                B.Workload(images=1, n0=1, n=w.batch_size - 1, batch_size=w.batch_size),
            )  # warm-up
            ray_init = B.init_ray()
            B.run_job(
                {**cfg_dict, "dataset": {**cfg_dict["dataset"], "limit": 1}}
            )  # warm-up: first-job costs
            rounds = []
            for r in range(1 if args.quick else args.rounds):
                image_id, image = images[r % len(images)]
                before = in_process(seg, den, image_id, image, w)
                job = B.marginal(cfg_dict, small=SMALL)
                after = in_process(seg, den, image_id, image, w)
                rounds.append((before, job, after))
                print(f"round {r + 1} done, load average {B.load_average()}", file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
    print(report(w, rounds, ray_init))
    return 0


def report(w: B.Workload, rounds: list, ray_init: float) -> str:
    per = w.samples_per_image
    header = (
        f"workload: job on {SMALL} and on {w.images} images 64x64 (the difference is the steady state), "
        f"n0={w.n0}, n={w.n}, batch {w.batch_size}, sigma={w.sigma}, segmenter width {w.seg_width} "
        f"behind DDPM UNet width {w.den_width}; 1 torch thread; {len(rounds)} rounds"
    )
    lines = [header, B.machine(), "", "CPU milliseconds per sample (load-independent) and their ratios:"]
    cpu_rows, wall_rows = [], []
    figures: dict[str, list[float]] = {"sampling": [], "actor": [], "job": [], "wall": [], "busy": []}
    for i, (before, job, after) in enumerate(rounds, 1):
        roof = (before["roofline_cpu"] + after["roofline_cpu"]) / (2 * per)
        votes = (before["count_votes_cpu"] + after["count_votes_cpu"]) / (2 * per)
        actor, total = job.actor_cpu_per_row / per, job.total_cpu_per_row / per
        roof_wall = 2 * per / (before["roofline_wall"] + after["roofline_wall"])
        steady = job.rows_per_s * per
        for key, value in (
            ("sampling", roof / votes),
            ("actor", roof / actor),
            ("job", roof / total),
            ("wall", steady / roof_wall),
            ("busy", job.busy_fraction),
        ):
            figures[key].append(value)
        cpu_rows.append(
            [
                f"round {i}",
                f"{1e3 * roof:.1f}",
                f"{1e3 * votes:.1f}",
                f"{1e3 * actor:.1f}",
                f"{1e3 * total:.1f}",
                f"{roof / votes:.3f}",
                f"{roof / actor:.3f}",
                f"{roof / total:.3f}",
            ]
        )
        wall_rows.append(
            [
                f"round {i}",
                f"{roof_wall:.1f}",
                f"{steady:.1f}",
                f"{steady / roof_wall:.3f}",
                f"{job.core_share:.2f}",
                f"{job.busy_fraction:.3f}",
                f"{job.small.wall:.1f} / {job.big.wall:.1f}",
            ]
        )
    lines.append(
        B.table(
            [
                "",
                "roofline",
                "count_votes",
                "job: actor",
                "job: all Ray processes",
                "roofline/count_votes",
                "roofline/actor",
                "roofline/all",
            ],
            cpu_rows,
        )
    )
    lines += ["", "wall clock (depends on the machine's load):"]
    lines.append(
        B.table(
            [
                "",
                "roofline samples/s",
                "job steady samples/s",
                "job/roofline",
                "core share of the actor",
                "actor busy in count_votes",
                f"job wall s ({SMALL} / {w.images} images)",
            ],
            wall_rows,
        )
    )
    m = {k: B.median(v) for k, v in figures.items()}
    lines += [
        "",
        (
            f"medians of rounds: roofline/actor CPU = {m['actor']:.3f} (target >= 0.9: on a machine where "
            f"the actor has its core, the job's throughput / the roofline's), of which sampling "
            f"{m['sampling']:.3f} (roofline/count_votes, in-process) and Ray inside the actor "
            f"{m['actor'] / m['sampling']:.3f}; all Ray processes (driver, raylet, GCS, writes) included: "
            f"{m['job']:.3f}"
        ),
        f"job / roofline, wall clock: {m['wall']:.3f}; actor busy in count_votes {m['busy']:.3f}",
        (
            f"Ray start-up (ray.init): {ray_init:.1f} s; the job's wall times include actor start-up (model "
            f"loading) and each actor's first image, which the difference of the two runs removes"
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
