"""Shared pieces of the job benchmarks: the machine line, timing, a benchmark world (demo images, demo-size
models with random weights, a job config), the in-process forward roofline and per-image job timings.

Not a library of the package: imported by the scripts in ``bench/`` (run as ``python bench/NAME.py``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parent.parent
DEMO_MANIFEST = REPO / "assets" / "demo" / "data" / "val.csv"
DEMO_CLASSES = 7
DEMO_SIZE = 64


# ------------------------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def load_average() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def machine() -> str:
    """One line: CPU, core count, load average (1/5/15 min), Python, torch, date (UTC)."""
    import torch

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, load average {load_average()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, {when}"
    )


# ------------------------------------------------------------------------------------------------- timing
def timed(fn: Callable[[], Any]) -> float:
    """Wall time of one call, in seconds."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned columns (first column left-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(cells[0]), "-" * len(fmt(cells[0]))] + [fmt(r) for r in cells[1:]])


# -------------------------------------------------------------------------------------------------- world
@dataclass(frozen=True)
class Workload:
    """What every sampled (image, sigma) costs: n0 + n noisy forwards in batches of ``batch_size``."""

    images: int
    sigma: float = 0.25
    n0: int = 10
    n: int = 100
    batch_size: int = 16
    seg_width: int = 24
    den_width: int = 32
    denoiser: bool = True

    @property
    def samples_per_image(self) -> int:
        return self.n0 + self.n


def write_models(root: Path, w: Workload, *, seed: int = 0) -> dict[str, Path]:
    """The demo architectures (``ray_certseg.models.tiny``) at 64 x 64 with random weights, saved the way
    checkpoints are (a safetensors state dict, a diffusers DDPMPipeline folder)."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler
    from safetensors.torch import save_file

    from ray_certseg.models.tiny import tiny_ddpm_unet, tiny_segnet

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    save_file(tiny_segnet(DEMO_CLASSES, width=w.seg_width).state_dict(), str(root / "seg.safetensors"))
    unet = tiny_ddpm_unet(DEMO_SIZE, width=w.den_width)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(root / "ddpm")
    return {"seg": root / "seg.safetensors", "ddpm": root / "ddpm"}


def job_config(
    models: dict[str, Path],
    output: Path,
    w: Workload,
    *,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    manifest: Path = DEMO_MANIFEST,
) -> dict[str, Any]:
    """One method (segmenter behind the DDPM, or alone), one sigma, ``w.images`` demo images; one image per
    Ray batch; one torch thread per actor (Ray sets OMP_NUM_THREADS = max(1, floor(cpus_per_actor)))."""
    return {
        "name": "bench",
        "output": str(output),
        "dataset": {
            "kind": "manifest",
            "manifest": str(manifest),
            "name": "demo",
            "num_classes": DEMO_CLASSES,
            "limit": w.images,
        },
        "models": {
            "segmenters": {
                "seg": {
                    "kind": "module",
                    "factory": "ray_certseg.models.tiny:tiny_segnet",
                    "kwargs": {"num_classes": DEMO_CLASSES, "width": w.seg_width},
                    "weights": str(models["seg"]),
                    "num_classes": DEMO_CLASSES,
                    "mean": [0.5, 0.5, 0.5],
                    "std": [0.25, 0.25, 0.25],
                }
            },
            "denoisers": {"ddpm": {"kind": "diffusers", "path": str(models["ddpm"])}},
        },
        "methods": {"m": {"segmenter": "seg", "denoiser": "ddpm" if w.denoiser else None}},
        "sampling": {
            "sigmas": [w.sigma],
            "n0": w.n0,
            "n": w.n,
            "batch_size": w.batch_size,
            "seed": 0,
            "device": "cpu",
        },
        "certify": {"taus": [0.75], "alphas": [0.001], "corrections": ["holm"]},
        "ray": {
            "actors": actors,
            "num_cpus_per_actor": cpus_per_actor,
            "batch_size": 1,
            "max_tasks_in_flight_per_actor": 2,
        },
    }


def load_models(cfg: Any, *, keep_host_memory: bool = True) -> tuple[Any, Any]:
    """The segmenter and denoiser of method ``m``, loaded with the loaders the job's actors use, in a process
    set up as the actors are (``sampling.keep_freed_host_memory`` unless ``keep_host_memory`` is False)."""
    from ray_certseg.models.registry import load_denoiser, load_segmenter
    from ray_certseg.sampling import keep_freed_host_memory, prepare_model

    if keep_host_memory:
        keep_freed_host_memory()
    method = cfg.methods["m"]
    seg = prepare_model(load_segmenter(cfg.models.segmenters[method.segmenter]))
    den = prepare_model(load_denoiser(cfg.models.denoisers[method.denoiser])) if method.denoiser else None
    return seg, den


def demo_images(cfg: Any) -> list[tuple[str, Any]]:
    """(image_id, uint8 H x W x 3) of the job's images, decoded as the actors decode them."""
    from ray_certseg.data import list_items, load_item

    return [(ref["image_id"], load_item(ref, cfg.dataset)["image"]) for ref in list_items(cfg.dataset)]


# ------------------------------------------------------------------------------------------ measurements
def run_concurrently(script: str, flag: str, spec: dict[str, Any], k: int, tmp: Path) -> list[dict[str, Any]]:
    """Start ``k`` fresh processes ``python script flag JSON`` (one torch thread each) on ``spec`` plus their
    ``k``, ``rank`` and a new barrier folder; each calls ``wait_at_barrier`` before timing and prints one JSON
    line last. Returns those results, by rank."""
    barrier = tempfile.mkdtemp(dir=tmp, prefix=f"barrier{k}-")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = lambda r: [
        sys.executable,
        script,
        flag,
        json.dumps({**spec, "k": k, "rank": r, "barrier": barrier}),
    ]
    procs = [
        subprocess.Popen(args(r), env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for r in range(k)
    ]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{Path(script).name}: one of {k} workers failed: {outs}")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def wait_at_barrier(spec: dict[str, Any]) -> None:
    """In a ``run_concurrently`` worker: report ready, return once all ``spec["k"]`` workers are."""
    barrier = Path(spec["barrier"])
    (barrier / f"ready-{spec['rank']}").touch()
    while len(list(barrier.glob("ready-*"))) < spec["k"]:
        time.sleep(0.01)


def forward_seconds(seg: Any, den: Any, image: Any, w: Workload) -> float:
    """The roofline: wall time of only the model forwards ``segment(denoise(x))`` for n0 + n noisy samples of
    one image, in batches of ``w.batch_size`` (noise drawn beforehand, no argmax, no counting)."""
    import torch

    from ray_certseg.sampling import to_tensor_image

    x = to_tensor_image(image)
    gen = torch.Generator().manual_seed(0)
    sizes = [min(w.batch_size, w.samples_per_image - s) for s in range(0, w.samples_per_image, w.batch_size)]
    batches = {b: x + w.sigma * torch.randn(b, *x.shape, generator=gen) for b in set(sizes)}
    with torch.inference_mode():
        start = time.perf_counter()
        for b in sizes:
            seg(den(batches[b], w.sigma) if den is not None else batches[b])
        return time.perf_counter() - start


def count_votes_seconds(seg: Any, den: Any, image_id: str, image: Any, w: Workload) -> float:
    """Wall time of ``sampling.count_votes`` on one image (what the actor runs), in this process."""
    from ray_certseg.sampling import count_votes

    return timed(
        lambda: count_votes(
            image,
            seg,
            denoiser=den,
            sigma=w.sigma,
            n0=w.n0,
            n=w.n,
            num_classes=DEMO_CLASSES,
            batch_size=w.batch_size,
            seed=0,
            image_id=image_id,
        )
    )


def init_ray(num_cpus: int = 2) -> float:
    """Start a private local Ray instance (workers inherit OMP_NUM_THREADS=1); returns the seconds it took."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return 0.0
    start = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=0,
        include_dashboard=False,
        object_store_memory=256 * 1024**2,
        log_to_driver=False,
        logging_level="warning",
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return time.perf_counter() - start


class CpuMonitor:
    """Cumulative CPU seconds (user + system) of this process and all its descendants (the local Ray instance
    started here: GCS, raylet, workers, actors), and of the job's actors alone (process title
    ``ray::MapWorker...``), sampled every ``interval`` seconds by a thread. CPU time counts the work done
    whatever share of a core the machine gave: the load-independent side of every measurement.

    The monitor's own CPU (reading /proc for a dozen processes: about 0.7 % of a core at the default 0.5 s,
    3 % at 0.1 s) is measured in its thread and left out of the totals; what a process does between its
    last reading and its exit (at most ``interval``) is lost."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.samples = interval, []
        self._last: dict[tuple[int, float], float] = {}  # each process's CPU seconds at its last reading
        self._total = self._actors = self.own = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Self:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            start = time.thread_time()
            self._sample()
            self.own += time.thread_time() - start

    def _sample(self) -> None:
        """Add each process's CPU since its last reading to the totals, to the actors' when it is an actor
        now (Ray reuses worker processes: a write task's worker may become an actor, or the reverse). A
        process first seen after the first sample brings all its CPU since it started."""
        import psutil

        me = psutil.Process()
        first = not self.samples
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                title = proc.cmdline()[:1]
            except psutil.Error:  # exited meanwhile: its CPU since the last reading is lost (<= interval)
                continue
            key, cpu = (proc.pid, proc.create_time()), t.user + t.system - (self.own if proc is me else 0.0)
            step = cpu - self._last.get(key, cpu if first else 0.0)
            self._last[key] = cpu
            self._total += step
            if title and title[0].startswith("ray::MapWorker"):
                self._actors += step
        self.samples.append((time.time(), self._total, self._actors))


@dataclass(frozen=True)
class JobTiming:
    """One run of the sampling stage: wall seconds, rows written, CPU seconds of every process of the Ray
    instance (driver included) and of the actors alone, and the count_votes seconds the rows record."""

    wall: float
    rows: int
    actors: int
    cpu_total: float
    cpu_actors: float
    sample_seconds: float


@dataclass(frozen=True)
class Marginal:
    """The steady-state cost of a row: the difference of two runs of one job on fewer and more images.

    Everything paid once per run (Ray Data planning, actor start-up and model loading, each actor's first
    image, teardown) cancels; what remains is what each further image costs, in wall time and in CPU."""

    small: JobTiming
    big: JobTiming

    @property
    def rows(self) -> int:
        return self.big.rows - self.small.rows

    def _delta(self, name: str) -> float:
        return getattr(self.big, name) - getattr(self.small, name)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self._delta("wall")

    @property
    def actor_cpu_per_row(self) -> float:
        return self._delta("cpu_actors") / self.rows

    @property
    def total_cpu_per_row(self) -> float:
        return self._delta("cpu_total") / self.rows

    @property
    def overhead_ratio(self) -> float:
        """o / a: CPU of every process but the actors (driver, raylet, GCS, write tasks) over the actors'."""
        return (self._delta("cpu_total") - self._delta("cpu_actors")) / self._delta("cpu_actors")

    @property
    def core_share(self) -> float:
        """Share of a core each actor got (1 on an otherwise idle machine)."""
        return self._delta("cpu_actors") / (self._delta("wall") * self.big.actors)

    @property
    def busy_fraction(self) -> float:
        """Share of the actors' wall time spent inside count_votes; the rest is Ray in the actor (decoding,
        Arrow conversion, transfers) or waiting for work."""
        return self._delta("sample_seconds") / (self._delta("wall") * self.big.actors)


def run_job(cfg_dict: dict[str, Any]) -> JobTiming:
    """``pipeline.run_sampling`` into a fresh output folder (``overwrite``), timed, CPU monitored."""
    import pyarrow.parquet as pq

    from ray_certseg.config import JobConfig
    from ray_certseg.job import pipeline

    cfg = JobConfig.from_dict(cfg_dict)
    start = time.perf_counter()
    with CpuMonitor() as monitor:
        pipeline.run_sampling(cfg, overwrite=True, progress_interval=0)
    wall = time.perf_counter() - start
    (_, total0, actors0), (_, total1, actors1) = monitor.samples[0], monitor.samples[-1]
    seconds = pq.read_table(Path(cfg.output, "votes"), columns=["sample_seconds"])[
        "sample_seconds"
    ].to_pylist()
    return JobTiming(
        wall=wall,
        rows=len(seconds),
        actors=cfg.ray.actors,
        cpu_total=total1 - total0,
        cpu_actors=actors1 - actors0,
        sample_seconds=float(sum(seconds)),
    )


def marginal(cfg_dict: dict[str, Any], small: int) -> Marginal:
    """Run the job on ``small`` images, then on the config's ``dataset.limit`` images: the Marginal."""
    few = {**cfg_dict, "dataset": {**cfg_dict["dataset"], "limit": small}}
    return Marginal(small=run_job(few), big=run_job(cfg_dict))
