"""Train a segmenter (clean or Gaussian-noise augmented) or a DDPM denoiser with Ray Train.

Examples:
  python jobs/train.py --config configs/train_demo_ddpm.yaml
  python jobs/train.py --config configs/train_demo_segmenter_clean.yaml --num-workers 4 --use-gpu
Connects to RAY_ADDRESS when set (e.g. under `ray job submit --working-dir . -- python jobs/train.py ...`),
otherwise starts a local 2-CPU Ray instance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working_dir under `ray job submit`

from ray_certseg.train import TrainConfig, fit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML file with TrainConfig fields")
    parser.add_argument("--out", help="override: output folder for the trained artefacts")
    parser.add_argument("--steps", type=int, help="override: optimiser steps")
    parser.add_argument("--seed", type=int, help="override: seed")
    parser.add_argument(
        "--num-workers", type=int, help="override: Ray Train workers (0 = local mode, in-process)"
    )
    parser.add_argument("--use-gpu", action="store_true", help="override: one GPU per worker")
    args = parser.parse_args(argv)
    with open(args.config) as fh:
        raw = yaml.safe_load(fh)
    if not isinstance(raw, dict):
        raise TypeError(f"{args.config} must hold a mapping of TrainConfig fields, got {type(raw).__name__}")
    overrides = {"out": args.out, "steps": args.steps, "seed": args.seed, "num_workers": args.num_workers}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if args.use_gpu:
        raw["use_gpu"] = True
    cfg = TrainConfig.from_dict(raw)

    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(address="local", num_cpus=2, include_dashboard=False)
    start = time.perf_counter()
    metrics = fit(cfg)
    print(json.dumps({**metrics, "fit_seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
