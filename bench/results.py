"""Benchmark 9, the results stage at the paper's shape, without a GPU: memory and time of every step after
sampling, on synthetic vote files shaped like the paper's Cityscapes run.

Votes: N images of 1024 x 2048 (``--size`` to change), 19 classes with the Cityscapes hierarchy (3 levels),
3 sigmas x 2 methods per image (6 rows an image; schema 2 with the per-level votes; files of as many rows as
fit 64 MiB in memory, as the job's ``ray.rows_per_file: auto`` writes them: 2 rows at 1024 x 2048),
n0 = 10, n = 100. Per pixel a mix that makes certification non-trivial at tau = 0.75, alpha = 0.001: 60 % of
the pixels have k = n (certified by any procedure), 25 % k ~ Binomial(n, 0.9), 15 % k ~ Binomial(n, 0.6)
(mostly abstain); c_hat is the label on 90 % of the pixels, per-level votes are those of c_hat's nodes with
k at least as large, the S0 margin spread over 0..n0.

Steps, each in a fresh process (its peak RSS its own), in this order:

* ``reduce``: ``reduce_output`` at the config's grid, SegCertify and hierarchical x Holm and Bonferroni;
* ``plots``: ``plots.write_plots`` (the certified-accuracy curve at 32 radii, the procedure curve, the bars,
  3 example strips and their level maps; the images themselves are absent, so strips have no image panel);
* ``sweep``: ``analysis.sweep_thresholds`` over 20 threshold candidates (what ``ray-certseg sweep`` runs);
* ``report``: ``report.write_report`` (plots present: the Markdown only);
* ``recertify``: ``analysis.recertify`` of the folder in Python at the same grid as ``reduce``.

Per step: wall seconds, peak RSS (``ru_maxrss``) and the ratio of its wall time to its I/O floor: one plain
``pyarrow.parquet.read_table`` of the vote columns that the step needs (also in a fresh process). With
``--before REV`` the ``plots`` and ``sweep`` steps also run on the package at git revision REV (a temporary
worktree), side by side on the same files (04bf494: they load every vote row into memory; c36d5c8: they stream,
but certify every hierarchical point with a pass over the pixels).

Run: ``python bench/results.py --images 10`` (``--quick``: 2 images of 64 x 128, every step in this process,
a smoke run).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SIGMAS, METHODS, N0, N = (0.25, 0.33, 0.5), ("segcertify", "diffusion"), 10, 100
TREE = "cityscapes"
HIERARCHICAL = {"procedure": "hierarchical", "params": {"hierarchy": TREE, "thresholds": [0.25, 0.0, 0.0]}}
CANDIDATES = [(a, b, 0.0) for a in (0.05, 0.1, 0.2, 0.3, 0.5) for b in (0.0, 0.05, 0.1, 0.2) if b <= a]
MAPS = ["label", "c_hat", "k", "clean_pred"]
LEVELS = ["margin", "c_hat_levels", "k_levels"]
COLUMNS = {  # the vote columns each step reads (its I/O floor)
    "reduce": MAPS + LEVELS,
    "plots": MAPS + LEVELS,
    "sweep": MAPS + LEVELS,
    "report": [],
    "recertify": MAPS + LEVELS,
}


def write_run(root: Path, images: int, height: int, width: int) -> None:
    """The synthetic vote files (one per image) and a config.json with the paper's certify section."""
    from ray_certseg import votes
    from ray_certseg.certify import class_tree

    h = class_tree.load(TREE)
    rng = np.random.default_rng(0)
    shape = (height, width)
    # files as the job writes them (ray.rows_per_file auto): as many rows as fit 64 MiB in memory
    per_file = max(1, (64 << 20) // votes.row_nbytes(height * width, 19, levels=h.num_levels - 1))
    pending: list = []
    for i in range(images):
        label = rng.integers(0, 19, shape, dtype=np.uint8)
        recs = []
        for method in METHODS:
            for sigma in SIGMAS:
                u = rng.random(shape)
                c_hat = np.where(u < 0.9, label, rng.integers(0, 19, shape)).astype(np.uint8)
                k = np.where(
                    u < 0.6,
                    N,
                    np.where(u < 0.85, rng.binomial(N, 0.9, shape), rng.binomial(N, 0.6, shape)),
                ).astype(np.uint16)
                levels = np.stack([h.node[lv][c_hat] for lv in range(1, h.num_levels)]).astype(np.uint8)
                extra = rng.integers(0, 6, (h.num_levels - 1, *shape))
                k_levels = np.minimum(N, k[None] + extra).astype(np.uint16)
                recs.append(
                    votes.VoteRecord(
                        image_id=f"img{i:04d}",
                        dataset="cityscapes",
                        method=method,
                        denoiser="ddpm" if method == "diffusion" else "",
                        segmenter="hrnet",
                        sigma=sigma,
                        n0=N0,
                        n=N,
                        seed=0,
                        num_classes=19,
                        ignore_index=255,
                        height=height,
                        width=width,
                        label=label,
                        c_hat=c_hat,
                        k=k,
                        clean_pred=label,
                        sample_seconds=1.0,
                        hierarchy=h.digest,
                        margin=rng.integers(0, N0 + 1, shape).astype(np.uint16),
                        c_hat_levels=levels,
                        k_levels=k_levels,
                    )
                )
        pending += recs
        while len(pending) >= per_file or (i == images - 1 and pending):
            part, pending = pending[:per_file], pending[per_file:]
            votes.write_votes(part, str(root / "votes" / f"part-{i:05d}-{len(pending):02d}.parquet"))
    config = {
        "name": "bench-results",
        "output": str(root),
        "dataset": {
            "kind": "manifest",
            "manifest": str(root / "absent.csv"),
            "name": "cityscapes",
            "num_classes": 19,
            "hierarchy": TREE,
        },
        "models": {
            "segmenters": {"hrnet": {"kind": "torchscript", "path": str(root / "absent.pt")}},
            "denoisers": {"ddpm": {"kind": "diffusers", "path": str(root / "absent")}},
        },
        "methods": {
            "segcertify": {"segmenter": "hrnet"},
            "diffusion": {"segmenter": "hrnet", "denoiser": "ddpm"},
        },
        "sampling": {"sigmas": list(SIGMAS), "n0": N0, "n": N},
        "certify": {
            "taus": [0.75],
            "alphas": [0.001],
            "corrections": ["holm", "bonferroni"],
            "procedures": ["segcertify", HIERARCHICAL],
        },
    }
    (root / "config.json").write_text(json.dumps(config))
    (root / "absent.csv").write_text(
        "image_path,label_path,image_id\nabsent.png,absent.png,absent\n"
    )  # no images


def step(name: str, out: str, before: bool) -> float:
    """One step in this process (its own peak RSS); the seconds it took, imports excluded."""
    import pyarrow.parquet as pq

    from ray_certseg import analysis
    from ray_certseg.results import plots, reduce, report

    procedures = ["segcertify", HIERARCHICAL]
    start = time.perf_counter()
    if name == "reduce":
        reduce.reduce_output(out, engine="local")
    elif name == "plots":
        plots.write_plots(out, engine="local")
    elif name == "sweep":
        takes_frame = "votes_frame" in inspect.signature(analysis.sweep_thresholds).parameters  # 04bf494
        source = analysis.load_votes(out) if before and takes_frame else out
        analysis.sweep_thresholds(source, CANDIDATES, hierarchy=TREE, tau=0.75, alpha=0.001)
    elif name == "report":
        report.write_report(out)
    elif name == "recertify":
        analysis.recertify(
            out, tau=0.75, alpha=0.001, correction=["holm", "bonferroni"], procedures=procedures
        )
    elif name == "floor":
        columns = json.loads(os.environ["BENCH_COLUMNS"])
        for f in sorted(Path(out, "votes").glob("*.parquet")):
            pq.read_table(f, columns=["image_id", *columns])
    else:
        raise ValueError(name)
    return time.perf_counter() - start


def run_step(
    name: str, out: Path, src: Path = REPO, before: bool = False, columns: list[str] = (), quick: bool = False
) -> dict:
    """The step in a fresh process (its own peak RSS); in this process with ``quick`` (a smoke run: the
    peak is then this process's)."""
    if quick:
        os.environ["BENCH_COLUMNS"] = json.dumps(list(columns))
        seconds = step(name, str(out), before)
        return {"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    env = {**os.environ, "PYTHONPATH": str(src), "BENCH_COLUMNS": json.dumps(list(columns))}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--out", str(out)]
    done = subprocess.run(
        cmd + (["--before-step"] if before else []),
        env=env,
        cwd=src,
        text=True,
        capture_output=True,
        check=False,
    )
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--size", default="1024x2048", help="H x W of every map")
    p.add_argument("--before", help="git revision whose plots and sweep run side by side")
    p.add_argument("--quick", action="store_true", help="2 images of 64 x 128 (a smoke run)")
    p.add_argument("--keep", help="write the votes here and keep them (default: a temporary folder)")
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--before-step", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step:
        seconds = step(args.step, args.out, args.before_step)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"seconds": seconds, "peak_mib": peak}))
        return 0
    images, (height, width) = (2, (64, 128)) if args.quick else (args.images, map(int, args.size.split("x")))
    with tempfile.TemporaryDirectory(prefix="bench-results-") as tmp:
        out = Path(args.keep) if args.keep else Path(tmp) / "run"
        start = time.perf_counter()
        write_run(out, images, height, width)
        written = time.perf_counter() - start
        vote_bytes = sum(f.stat().st_size for f in (out / "votes").glob("*.parquet"))
        rows = []
        floors: dict[tuple[str, ...], dict] = {}
        for name, columns in COLUMNS.items():
            key = tuple(columns)
            if key not in floors:
                floors[key] = (
                    run_step("floor", out, columns=columns, quick=args.quick) if columns else {"seconds": 0.0}
                )
            rows.append((name, "now", run_step(name, out, quick=args.quick), floors[key]))
        if args.before:
            worktree = Path(tmp) / "before"
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(worktree), args.before],
                check=True,
            )
            try:
                for name in ("plots", "sweep"):
                    rows.append(
                        (
                            name,
                            f"before ({args.before})",
                            run_step(name, out, worktree, True),
                            floors[tuple(COLUMNS[name])],
                        )
                    )
            finally:
                subprocess.run(
                    ["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=True
                )
    print(report(rows, images, height, width, vote_bytes, written, args.quick))
    return 0 if all("error" not in r[2] for r in rows if r[1] == "now") else 1


def report(
    rows: list, images: int, height: int, width: int, vote_bytes: int, written: float, quick: bool
) -> str:
    sys.path.insert(0, str(BENCH))
    import benchlib as B

    table = []
    for name, code, r, floor in rows:
        if "error" in r:
            table.append([name, code, "failed", "", "", r["error"][:60]])
            continue
        ratio = f"{r['seconds'] / floor['seconds']:.1f}" if floor["seconds"] else "-"
        table.append(
            [name, code, f"{r['seconds']:.1f}", f"{r['peak_mib']:.0f}", f"{floor['seconds']:.1f}", ratio]
        )
    head = (
        f"{'quick: ' if quick else ''}{images} images x {len(METHODS)} methods x {len(SIGMAS)} sigmas = "
        f"{images * len(METHODS) * len(SIGMAS)} vote rows of {height} x {width}, {TREE} hierarchy; vote files "
        f"{vote_bytes / 2**20:.0f} MiB, written in {written:.0f} s"
    )
    headers = ["step", "code", "wall s", "peak RSS MiB", "I/O floor s", "wall / floor"]
    return "\n".join([head, B.machine(), "", B.table(headers, table)])


if __name__ == "__main__":
    sys.exit(main())
