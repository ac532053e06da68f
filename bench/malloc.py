"""Fast path on CPU: ``sampling.keep_freed_host_memory`` (glibc keeps freed memory) against glibc's defaults.

PyTorch's CPU allocator has no cache: every batch allocates its activations afresh, and with glibc's defaults
the large ones are mmap'ed and unmapped, so the kernel zero-fills them again page by page on every batch. The
job's actors call ``keep_freed_host_memory`` (``sampling.keep_host_memory: true``); this compares the two
settings on the job's unit of work, ``count_votes`` on one demo image (tiny DDPM + segmenter at demo size,
random weights, one torch thread), side by side: fresh processes, the two settings alternating, in rounds, with
1 process and with 2 processes computing at once (a file barrier starts them together; the 2-actor job's
situation). Reported per sample: wall and CPU time (user and kernel) and minor page faults, from
``getrusage`` around ``--repeats`` calls after a warm-up call; votes asserted identical across settings.

Run: ``python bench/malloc.py`` (``--quick``: a tiny smoke run).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as B

SETTINGS = ("default", "kept")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Load (with or without keep_freed_host_memory), warm up, wait at the barrier, time ``repeats`` calls."""
    import torch

    from ray_certseg.config import JobConfig
    from ray_certseg.sampling import count_votes

    torch.set_num_threads(1)
    cfg = JobConfig.from_dict(spec["config"])
    w = B.Workload(**spec["workload"])
    seg, den = B.load_models(cfg, keep_host_memory=spec["setting"] == "kept")
    image_id, image = B.demo_images(cfg)[0]
    votes = lambda: count_votes(
        image,
        seg,
        denoiser=den,
        sigma=w.sigma,
        n0=w.n0,
        n=w.n,
        num_classes=B.DEMO_CLASSES,
        batch_size=w.batch_size,
        seed=0,
        image_id=image_id,
    )
    first = votes()
    B.wait_at_barrier(spec)
    r0, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(spec["repeats"]):
        votes()
    wall, r1 = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    samples = spec["repeats"] * w.samples_per_image
    return {
        "wall": wall / samples,
        "user": (r1.ru_utime - r0.ru_utime) / samples,
        "sys": (r1.ru_stime - r0.ru_stime) / samples,
        "faults": (r1.ru_minflt - r0.ru_minflt) / samples,
        "votes": [int(first.c_hat.sum()), int(first.k.sum())],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timed count_votes calls per process")
    p.add_argument("--quick", action="store_true", help="tiny models and sample counts (a smoke run)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    w = (
        B.Workload(images=1, n0=2, n=6, batch_size=4, seg_width=8, den_width=8)
        if args.quick
        else B.Workload(images=1, n0=10, n=100, batch_size=16)
    )
    rounds, repeats = (1, 1) if args.quick else (args.rounds, args.repeats)
    got: dict[tuple[str, int], list[dict[str, Any]]] = {(s, k): [] for s in SETTINGS for k in (1, 2)}
    with tempfile.TemporaryDirectory(prefix="bench-malloc-") as tmp:
        root = Path(tmp)
        models = B.write_models(root / "models", w)
        spec = {"config": B.job_config(models, root / "out", w), "workload": w.__dict__, "repeats": repeats}
        for r in range(rounds):
            for k in (1, 2):
                for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
                    setting_spec = {**spec, "setting": setting}
                    got[(setting, k)] += B.run_concurrently(__file__, "--worker", setting_spec, k, root)
            print(f"round {r + 1}/{rounds} done, load average {B.load_average()}", file=sys.stderr)
    if len({json.dumps(x["votes"]) for runs in got.values() for x in runs}) != 1:
        raise AssertionError("the votes differ between settings")
    print(report(w, got, rounds, repeats))
    return 0


def report(w: B.Workload, got: dict[tuple[str, int], list[dict[str, Any]]], rounds: int, repeats: int) -> str:
    med = lambda k, s, f: B.median([x[f] for x in got[(s, k)]])
    lines = [
        B.machine(),
        (
            f"count_votes on one 64x64 demo image, n0={w.n0}, n={w.n}, batch {w.batch_size}, DDPM width "
            f"{w.den_width} + segmenter width {w.seg_width}, 1 torch thread; {rounds} rounds x {repeats} calls "
            "per process, settings alternating; medians over rounds and processes"
        ),
        "",
    ]
    rows = []
    for k in (1, 2):
        for s in SETTINGS:
            rows.append(
                [
                    f"{k} process{'es' if k > 1 else ''}, {s}",
                    f"{1e3 * med(k, s, 'wall'):.1f}",
                    f"{1e3 * med(k, s, 'user'):.1f}",
                    f"{1e3 * med(k, s, 'sys'):.2f}",
                    f"{med(k, s, 'faults'):.0f}",
                    f"{med(k, 'default', 'wall') / med(k, s, 'wall'):.3f}",
                ]
            )
    lines.append(
        B.table(
            ["", "wall ms/sample", "user ms", "kernel ms", "minor faults/sample", "speed-up vs default"], rows
        )
    )
    lines += [
        "",
        "; ".join(
            f"{k} process{'es' if k > 1 else ''}: kept/default speed-up = "
            f"{med(k, 'default', 'wall') / med(k, 'kept', 'wall'):.3f}"
            for k in (1, 2)
        )
        + "; votes identical (asserted)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
