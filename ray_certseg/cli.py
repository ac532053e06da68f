"""``ray-certseg`` command line: run the job, re-run the reducer, and the other tools.

    ray-certseg run [--config configs/demo.yaml] [--output DIR] [--set key=value ...] [--overwrite]
    ray-certseg reduce OUTPUT [--tau 0.6 0.75] [--alpha 0.001 ...] [--correction holm ...] [--procedure ENTRY ...]
                          [--name NAME]
    ray-certseg sweep OUTPUT --thresholds 0.5,0.3,0 0.3,0.1,0 ... [--held-out IDS_FILE]
    ray-certseg report OUTPUT [--replot]
    ray-certseg selftest [--images 1000] [--alpha 0.2] [--correction holm ...] [--seed 0] [--shared-noise]
                         [--procedure hierarchical [--level-from-s] [--model M]]

``python jobs/certify.py ...`` is ``ray-certseg run ...``. Run directly, the job starts a local Ray
instance; under ``ray job submit`` (``RAY_ADDRESS`` set) it attaches to that cluster.

Exit codes: 0 every row done; 1 some images failed (see ``<output>/errors.parquet``); 2 a job-level fault (bad
config or usage, a model that cannot load, an unusable object store): one error, before sampling where it can be.
``selftest`` (docs/selftest.md): 0 the false-certificate rates pass, 1 they fail.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ray_certseg.certify import CORRECTIONS

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "configs/demo.yaml"

log = logging.getLogger("ray_certseg")


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def _resolve_config_path(path: str) -> str:
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (REPO / p).exists():
        return str(REPO / p)
    return path


def cmd_run(args: argparse.Namespace) -> int:
    from ray_certseg.config import load_config
    from ray_certseg.job.run import run_job

    overrides = list(args.set or [])
    if args.output:
        overrides.append(f"output={args.output}")
    cfg = load_config(_resolve_config_path(args.config), overrides)
    result = run_job(cfg, overwrite=args.overwrite, progress_interval=args.progress_interval)
    print(result.summary())
    return result.exit_code


def cmd_reduce(args: argparse.Namespace) -> int:
    from ray_certseg.results import reduce

    procedures = [_procedure_entry(text) for text in args.procedure or []]
    result, into = reduce.reduce_again(
        args.output,
        taus=args.tau,
        alphas=args.alpha,
        corrections=args.correction,
        procedures=procedures,
        thresholds=args.thresholds,
        hierarchy=args.hierarchy,
        name=args.name,
        pooling="all" if args.all_rows else "common",
        replace_metrics=args.replace_metrics,
    )
    print(result.summary_markdown + "\n\n" + reduce.where_written(args.output, into))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from ray_certseg.results import curves
    from ray_certseg.results.reduce import run_hierarchy

    held = None
    if args.held_out:
        with open(args.held_out) as f:
            held = [line.strip() for line in f if line.strip()]
    table = curves.sweep_thresholds(
        args.output,
        args.thresholds,
        hierarchy=args.hierarchy or run_hierarchy(args.output),
        tau=args.tau,
        alpha=args.alpha,
        correction=args.correction,
        held_out=held,
    )
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if held is None:
        print(
            "\nWarning: thresholds chosen on these images are optimistic for them; pass --held-out IDS_FILE."
        )
    return 0


def _thresholds(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"thresholds look like 0.5,0.3,0 (one per level), got {text!r}"
        ) from None


def _procedure_entry(text: str) -> Any:
    """A ``--procedure`` value: a name, or a YAML mapping ``{procedure: NAME, params: {...}, grid: {...}}``."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"--procedure {text!r}: not a name or a YAML mapping ({exc})") from None


def cmd_selftest(args: argparse.Namespace) -> int:
    from ray_certseg.selftest import run_hierarchical_selftest, run_selftest

    common = {
        "images": args.images,
        "alpha": args.alpha,
        "corrections": args.correction or CORRECTIONS,
        "seed": args.seed,
        "sigma": args.sigma,
        "tau": args.tau,
        "n0": args.n0,
        "n": args.n,
        "batch_size": args.batch_size,
    }
    if args.procedure == "hierarchical":
        if args.shared_noise:
            raise ValueError(
                "--shared-noise is SegCertify's self-test; with --procedure hierarchical use --level-from-s"
            )
        model = args.model or ("coarse-sure" if args.level_from_s else "boundary")
        report = run_hierarchical_selftest(**common, level_from_s=args.level_from_s, model=model)
    else:
        if args.level_from_s or args.model:
            raise ValueError("--level-from-s and --model need --procedure hierarchical")
        report = run_selftest(**common, shared_noise=args.shared_noise)
    print(report.to_markdown())
    if args.level_from_s:
        print(
            "\nlevel chosen from S (the wrong variant): under Holm it must FAIL on the coarse-sure model; under "
            "Bonferroni it stays within alpha (docs/hierarchical.md says why)"
        )
    return 0 if report.passed else 1


def cmd_report(args: argparse.Namespace) -> int:
    from ray_certseg.results import report

    print(report.write_report(args.output, replot=args.replot))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    import json

    from ray_certseg.config import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray-certseg", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (also RAY_CERTSEG_DEBUG=1)"
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="sample votes on Ray, certify and aggregate")
    r.add_argument("--config", default=DEFAULT_CONFIG, help=f"job config YAML (default {DEFAULT_CONFIG})")
    r.add_argument("--output", help="output folder, local or s3:// (overrides the config's `output`)")
    r.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. sampling.n=500"
    )
    r.add_argument(
        "--overwrite", action="store_true", help="discard what the output folder holds and start over"
    )
    r.add_argument(
        "--progress-interval",
        type=float,
        default=None,
        help="seconds between progress log lines (default 30 without a terminal, off with one)",
    )
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("reduce", help="certify stored votes again (other tau/alpha/correction) and aggregate")
    d.add_argument("output", help="an output folder of `run`")
    d.add_argument(
        "--tau",
        type=float,
        nargs="+",
        action="extend",
        help="tau values, e.g. --tau 0.6 0.75 (default: the run's config)",
    )
    d.add_argument(
        "--alpha", type=float, nargs="+", action="extend", help="alpha values (default: the run's config)"
    )
    d.add_argument("--correction", nargs="+", action="extend", choices=CORRECTIONS)
    d.add_argument(
        "--procedure",
        action="append",
        metavar="ENTRY",
        help="a certification procedure to certify at (repeatable; default: the run's certify.procedures): "
        "a name, e.g. segcertify, or YAML such as '{procedure: pkg.module:PROC, params: {min_votes: 90}}' "
        "(docs/extending.md)",
    )
    d.add_argument(
        "--thresholds",
        type=_thresholds,
        nargs="+",
        help="with --procedure hierarchical: threshold functions t_0,...,t_L (one margin per level, "
        "non-increasing), e.g. --thresholds 0.5,0.3,0",
    )
    d.add_argument(
        "--hierarchy", help="with --thresholds: the hierarchy (default: the run's dataset.hierarchy)"
    )
    d.add_argument(
        "--name",
        help="write OUTPUT/reductions/NAME/ (default with --tau/--alpha/--correction: named "
        "after the grid, e.g. tau0.6_alpha0.001_holm-bonferroni); the run's metrics/ stay",
    )
    d.add_argument(
        "--all-rows",
        action="store_true",
        help="pool every row each method has (default: like for like, per dataset and sigma only "
        "the images every method has); written to reductions/<grid>_all-rows/ unless --name",
    )
    d.add_argument(
        "--replace-metrics",
        action="store_true",
        help="write OUTPUT/metrics/ instead (what `report` and the plots read)",
    )
    d.set_defaults(func=cmd_reduce)

    w = sub.add_parser(
        "sweep", help="hierarchical certification: CIG and abstain rate per threshold function"
    )
    w.add_argument("output", help="an output folder of `run` sampled with dataset.hierarchy")
    w.add_argument(
        "--thresholds", type=_thresholds, nargs="+", required=True, help="candidates, e.g. 0.5,0.3,0"
    )
    w.add_argument("--hierarchy", help="default: the run's dataset.hierarchy")
    w.add_argument("--tau", type=float, default=0.75)
    w.add_argument("--alpha", type=float, default=0.001)
    w.add_argument("--correction", choices=CORRECTIONS, default="holm")
    w.add_argument(
        "--held-out", help="a file of image ids (one per line) to report on; selection uses the others"
    )
    w.set_defaults(func=cmd_sweep)

    o = sub.add_parser("report", help="write OUTPUT/report.md: the metrics table and the plots")
    o.add_argument("output", help="an output folder of `run`")
    o.add_argument(
        "--replot",
        action="store_true",
        help="redraw OUTPUT/plots/ first (default: only when missing or of another tau/alpha)",
    )
    o.set_defaults(func=cmd_report)

    s = sub.add_parser(
        "selftest",
        help="check the false-certificate rate of sampling + certification "
        "against alpha on analytic segmenters (docs/selftest.md)",
    )
    s.add_argument("--images", type=int, default=1000, help="number of seeded images (default 1000)")
    s.add_argument("--alpha", type=float, default=0.2, help="family-wise error level tested (default 0.2)")
    s.add_argument("--correction", action="append", choices=CORRECTIONS, help="default: both")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--shared-noise",
        action="store_true",
        help="replay the released SegCertify bug (one noise draw per batch): the test must fail",
    )
    s.add_argument("--procedure", choices=("segcertify", "hierarchical"), default="segcertify")
    s.add_argument(
        "--level-from-s",
        action="store_true",
        help="with --procedure hierarchical: choose each pixel's level from S instead of S0 (wrong on purpose; "
        "the model defaults to coarse-sure, where it fails under Holm)",
    )
    s.add_argument(
        "--model",
        choices=("boundary", "coarse-sure"),
        help="with --procedure hierarchical: the analytic image model (default boundary; docs/selftest.md)",
    )
    s.add_argument("--sigma", type=float, default=0.25)
    s.add_argument("--tau", type=float, default=0.75)
    s.add_argument("--n0", type=int, default=10)
    s.add_argument("--n", type=int, default=100)
    s.add_argument("--batch-size", type=int, default=10)
    s.set_defaults(func=cmd_selftest)

    c = sub.add_parser(
        "schema",
        help="print the job config's JSON Schema (for an editor's YAML language server, see the README)",
    )
    c.add_argument("--output", "-o", help="write it to this file instead of stdout")
    c.set_defaults(func=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    from ray_certseg.job import session
    from ray_certseg.job.preflight import JobError
    from ray_certseg.storage import StorageError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError, StorageError, JobError) as exc:
        if args.debug or os.environ.get("RAY_CERTSEG_DEBUG"):
            raise
        session.stop_ray()
        print(f"ray-certseg: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
