"""Benchmark 4, storage: bytes per pixel of the vote Parquet (default schema) and reducer throughput.

Votes: by default the demo job itself (``configs/demo.yaml``: trained demo models, 64 x 64 demo images, its
three methods and two sigmas, n0 = 10, n = 100, the demo hierarchy: 2 levels above the classes) on ``--images`` images, 2 actors; or any run's votes with
``--votes DIR``. Bytes per pixel = the vote files' total size / (rows x H x W), with the share of each
per-pixel column (label, c_hat, k, clean_pred; compressed column-chunk sizes from the Parquet metadata) and
of everything else (per-row scalars, footers); the hierarchy columns of vote schema 2 (margin, c_hat_levels,
k_levels) are reported apart, what a job naming ``dataset.hierarchy`` adds. Target: <= 1.5 B/pixel (raw: 1 + 1 + 2 + 1 = 5 B/pixel).

Reducer: the map of ``reduce.reduce_output`` (``stream.chunks`` in this process: read, CERTIFY for every
grid point, confusion matrices; the reducer's unit of work in or out of Ray) on those votes and on a Cityscapes-sized table (1024 x 2048
maps tiled from the demo votes; for throughput only: tiling makes it compress unrealistically well), in
pixels per second, counting each pixel once per grid point (tau 0.75, alpha 1e-3, Holm and Bonferroni).

Run: ``python bench/storage.py`` (``--quick``: random tiny models, a smoke run).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ray_certseg.results import image_records, stream

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as B

PIXEL_COLUMNS = ("label", "c_hat", "k", "clean_pred")
HIERARCHY_COLUMNS = ("margin", "c_hat_levels", "k_levels")  # vote schema 2, with dataset.hierarchy
DEMO_CONFIG = B.REPO / "configs" / "demo.yaml"


def demo_votes(out: Path, images: int) -> Path:
    """Run the demo job's sampling stage on ``images`` images into ``out``; returns the votes folder."""
    from ray_certseg.config import load_config
    from ray_certseg.job import pipeline

    cfg = load_config(
        DEMO_CONFIG,
        [
            f"output={out}",
            f"dataset.limit={images}",
            "sampling.device=cpu",
            "ray.actors=2",
            "ray.num_cpus_per_actor=0.5",
        ],
    )
    missing = [
        m
        for kind in ("segmenters", "denoisers")
        for m in getattr(cfg.models, kind).values()
        if not Path(m.get("weights") or m.get("path")).exists()
    ]
    if missing:
        raise FileNotFoundError(
            f"demo models missing ({missing}); train them first (see README) or pass "
            "--votes DIR of an existing run, or --quick"
        )
    B.init_ray()
    pipeline.run_sampling(cfg, overwrite=True, progress_interval=0)
    return out / "votes"


def quick_votes(root: Path) -> Path:
    w = B.Workload(images=2, n0=2, n=6, batch_size=4, seg_width=8, den_width=8)
    cfg = B.job_config(B.write_models(root / "models", w), root / "out", w, cpus_per_actor=0.5)
    B.init_ray()
    B.run_job(cfg)
    return root / "out" / "votes"


def sizes(votes: Path) -> dict[str, float]:
    """Total file bytes, pixels, rows and per-column compressed bytes of the vote files."""
    import pyarrow.parquet as pq

    out = {"file": 0, "pixels": 0, "rows": 0, **{c: 0 for c in PIXEL_COLUMNS + HIERARCHY_COLUMNS}}
    for path in sorted(votes.rglob("*.parquet")):
        out["file"] += path.stat().st_size
        meta = pq.ParquetFile(path).metadata
        t = pq.read_table(path, columns=["height", "width"])
        out["pixels"] += sum(h * w for h, w in zip(t["height"].to_pylist(), t["width"].to_pylist()))
        out["rows"] += meta.num_rows
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                name = col.path_in_schema.split(".")[0]
                if name in PIXEL_COLUMNS + HIERARCHY_COLUMNS:
                    out[name] += col.total_compressed_size
    return out


def tiled_table(votes: Path, height: int, width: int, rows: int):
    """Vote rows with (height, width) maps tiled from the first demo rows (reducer throughput only)."""
    import numpy as np

    from ray_certseg import votes as V

    records = V.read_votes(str(votes))[:rows]
    big = []
    for r in records:
        reps = (-(-height // r.height), -(-width // r.width))
        maps = {c: np.tile(np.asarray(getattr(r, c)), reps)[:height, :width] for c in PIXEL_COLUMNS}
        big.append(
            {
                **{f: getattr(r, f) for f in V.SCALAR_COLUMNS},
                "height": height,
                "width": width,
                **maps,
                "counts": None,
                "hierarchy": None,  # the tiled maps are for reducer throughput; the levels are not tiled
            }
        )
    return V.make_table(big)


def reducer_rate(votes: Path, grid) -> tuple[float, float]:
    """(seconds, pixel-grid-points per second) of one pass of the reducer's map over ``votes`` (best of 3)."""
    from ray_certseg.job.rundir import RunDir

    run = RunDir(str(votes.parent))  # the run folder whose votes/ this is
    records = image_records.GridRecords(grid)

    def one_pass() -> None:
        for _ in stream.chunks(run, stream.plan_run(run, records.per_row), records):
            pass

    seconds = min(B.timed(one_pass) for _ in range(3))
    s = sizes(votes)
    return seconds, s["pixels"] * len(list(grid)) / seconds


def main(argv: list[str] | None = None) -> int:
    from ray_certseg import votes as V

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--votes", type=Path, help="measure this votes folder instead of running the demo job")
    p.add_argument("--images", type=int, default=8, help="demo images to sample (without --votes)")
    p.add_argument("--quick", action="store_true", help="random tiny models, 2 images (a smoke run)")
    args = p.parse_args(argv)
    grid = image_records.Grid(taus=(0.75,), alphas=(0.001,), corrections=("holm", "bonferroni"))
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        if args.votes:  # seen as <tmp>/given/votes, the layout of a run folder
            shutil.copytree(args.votes, root / "given" / "votes")
            votes, source = root / "given" / "votes", f"votes of {args.votes}"
        elif args.quick:
            votes, source = quick_votes(root), "quick: random tiny models, 2 images, n0=2, n=6"
        else:
            votes = demo_votes(root / "demo", args.images)
            source = f"demo job (configs/demo.yaml, trained demo models), {args.images} images, 3 methods x 2 sigmas"
        sample_s = time.perf_counter() - start
        s = sizes(votes)
        demo_s, demo_rate = reducer_rate(votes, grid)
        big_dir = root / "big" / "votes"
        big_dir.mkdir(parents=True)
        h, w = (128, 256) if args.quick else (1024, 2048)
        V.write_votes(tiled_table(votes, h, w, 2 if args.quick else 4), str(big_dir / "tiled.parquet"))
        big_s, big_rate = reducer_rate(big_dir, grid)
        big_rows = sizes(big_dir)["rows"]
    px = s["pixels"]
    measured = PIXEL_COLUMNS + HIERARCHY_COLUMNS
    other = s["file"] - sum(s[c] for c in measured)
    rows = [[c, f"{s[c] / px:.3f}"] for c in measured]
    rows += [["other (scalars, footers)", f"{other / px:.3f}"], ["total", f"{s['file'] / px:.3f}"]]
    what = f"votes: {source}; {s['rows']} rows, {px} pixels, {s['file'] / 1024:.1f} KiB"
    reducer = [
        [f"demo votes ({s['rows']} rows)", s["rows"], f"{demo_s:.3f}", f"{demo_rate / 1e6:.2f}"],
        [f"tiled {h}x{w} ({big_rows} rows)", big_rows, f"{big_s:.3f}", f"{big_rate / 1e6:.2f}"],
    ]
    lines = [
        B.machine(),
        f"{what} (sampling took {sample_s:.0f} s)",
        "",
        B.table(["column", "bytes/pixel"], rows),
        "",
        (
            f"bytes/pixel = {s['file'] / px:.3f} (target <= 1.5; raw per-pixel columns 5 B); of which the "
            f"hierarchy columns (dataset.hierarchy; raw 2 + 3 L B) {sum(s[c] for c in HIERARCHY_COLUMNS) / px:.3f}"
        ),
        "",
        B.table(["reducer: stream.chunks, 1 process", "rows", "seconds", "Mpixel-gridpoints/s"], reducer),
        f"grid: {len(list(grid))} points (tau 0.75, alpha 0.001, holm + bonferroni)",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
