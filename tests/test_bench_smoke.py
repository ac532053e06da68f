"""Smoke runs of the benchmark scripts in their tiny modes: each one runs end to end and prints its table.

No timing is asserted (timings belong in bench/README.md); what is checked is that every script completes,
its own checks pass (the reference and count_votes give identical votes; the GPU script's votes are
reproducible), and the figures it reports are finite and positive.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from ray_certseg.job.pipeline import FILES_PER_ACTOR

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def number_after(label: str, text: str) -> float:
    match = re.search(re.escape(label) + r"\s*([-+0-9.eE]+|nan)", text)
    assert match, f"{label!r} missing from the output:\n{text}"
    return float(match.group(1))


def positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def finite(x: float) -> bool:
    """Tiny runs measure nothing: a difference of two short jobs can come out negative, but never NaN."""
    return math.isfinite(x)


def test_reference_quick_votes_identical_and_table(capsys):
    assert load("reference").main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("quick (")]
    assert len(rows) == 2 and rows[0].split()[-8] == "reference" and rows[1].split()[-8] == "ours"
    for row in rows:  # wall s, CPU s, counting s, time vs ours, vote MiB, peak MiB, peak vs ours
        wall, cpu, _, _, vote_mib, peak_mib, _ = (float(v) for v in row.split()[-7:])
        assert positive(wall) and positive(cpu) and positive(vote_mib) and peak_mib >= 0
    ref_mib, ours_mib = (float(r.split()[-3]) for r in rows)
    assert ref_mib > ours_mib  # (n0 + n) H W int64 vs 2 C H W int32 with n0 + n = 24, C = 7


def test_malloc_quick_votes_identical_and_table(capsys):
    assert load("malloc").main(["--quick"]) == 0  # raises if the votes differ between the settings
    out = capsys.readouterr().out
    rows = [
        line for line in out.splitlines() if line.startswith(("1 process", "2 processes")) and "," in line
    ]
    assert [" ".join(r.split()[:3]) for r in rows] == [
        "1 process, default",
        "1 process, kept",
        "2 processes, default",
        "2 processes, kept",
    ]
    for row in rows:  # wall ms, user ms, kernel ms, faults per sample, speed-up
        wall, user, kernel, faults, speedup = (float(v) for v in row.split()[-5:])
        assert positive(wall) and positive(user) and kernel >= 0 and faults >= 0 and positive(speedup)
    assert positive(number_after("1 process: kept/default speed-up =", out))


def gpu_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "gpu.jsonl").read_text().splitlines()]


def test_gpu_script_cpu_smoke_measures_peaks_then_rows_as_they_come(tmp_path, capsys):
    gpu = load("gpu")
    args = [str(tmp_path), "--cpu-smoke", "--workloads", "pascal-tile", "--options", "fp32", "bf16"]
    assert gpu.main(args) == 0
    rows = gpu_rows(tmp_path)
    assert [(r["kind"], r["name"], r["option"]) for r in rows] == [
        ("peak", "bf16 matmul", ""),
        ("peak", "copy", ""),
        ("workload", "pascal-tile", "fp32"),
        ("workload", "pascal-tile", "bf16"),
    ]
    assert all(positive(r["value"]) for r in rows[:2])
    for r in rows[2:]:
        assert not r["error"] and not r["checks"]
        assert all(positive(r[k]) for k in ("samples_per_s", "achieved_tflops", "predicted_s", "measured_s"))
        assert 0 < r["fraction_of_peak"] < 10  # of the measured bf16 matmul peak
    out = capsys.readouterr().out
    assert out.index("peak  bf16 matmul") < out.index("pascal-tile      fp32")  # printed in order


def test_gpu_script_records_a_failing_option_and_goes_on(tmp_path, monkeypatch):
    gpu = load("gpu")
    real = gpu.run_workload

    def oom_for_bf16(option, *args, **kwargs):
        if option == "bf16":
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(option, *args, **kwargs)

    monkeypatch.setattr(gpu, "run_workload", oom_for_bf16)
    args = [str(tmp_path), "--cpu-smoke", "--workloads", "pascal-tile", "--options", "bf16", "fp32"]
    assert gpu.main(args) == 1  # a failed row fails the run, after every row was measured
    by_option = {r["option"]: r for r in gpu_rows(tmp_path) if r["kind"] == "workload"}
    assert "out of memory" in by_option["bf16"]["error"]
    assert not by_option["fp32"]["error"] and positive(by_option["fp32"]["samples_per_s"])
    # past the budget a row is recorded as skipped, not run
    assert (
        gpu.main([str(tmp_path / "late"), "--cpu-smoke", "--workloads", "pascal-tile", "--budget", "0"]) == 0
    )
    assert all("skipped" in r["error"] for r in gpu_rows(tmp_path / "late") if r["kind"] == "workload")


@pytest.mark.ray
@pytest.mark.slow
def test_efficiency_quick(ray_session, capsys):
    assert load("efficiency").main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert finite(number_after("roofline/actor CPU =", out))
    assert positive(number_after("of which sampling", out))  # in-process, same thread: always measurable
    assert finite(number_after("job / roofline, wall clock:", out))


@pytest.mark.ray
@pytest.mark.slow
def test_scaling_quick(ray_session, capsys):
    assert load("scaling").main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert finite(number_after("job(2)/job(1) =", out))
    assert positive(number_after("gave two single-thread processes", out))
    assert finite(number_after("machine(2)/machine(1) / (1 + o/a) =", out))


@pytest.mark.ray
@pytest.mark.slow
def test_storage_quick(ray_session, capsys):
    assert load("storage").main(["--quick"]) == 0
    out = capsys.readouterr().out
    bpp = number_after("bytes/pixel =", out)
    assert positive(bpp) and bpp < 16  # 2 rows of 64x64 maps in their own small files: footers dominate
    assert "tiled 128x256" in out


def test_marginal_is_the_difference_of_two_runs():
    """The job benchmarks' steady state: start-up costs cancel in the difference of a short and a long run."""
    bench = load("benchlib")
    small = bench.JobTiming(wall=20.0, rows=2, actors=2, cpu_total=30.0, cpu_actors=24.0, sample_seconds=16.0)
    big = bench.JobTiming(wall=40.0, rows=10, actors=2, cpu_total=70.0, cpu_actors=56.0, sample_seconds=52.0)
    m = bench.Marginal(small, big)
    assert m.rows == 8 and m.rows_per_s == pytest.approx(0.4)
    assert m.actor_cpu_per_row == pytest.approx(4.0) and m.total_cpu_per_row == pytest.approx(5.0)
    assert m.overhead_ratio == pytest.approx(0.25)  # (40 - 32) / 32
    assert m.core_share == pytest.approx(0.8)  # 32 CPU s over 20 s x 2 actors
    assert m.busy_fraction == pytest.approx(0.9)  # 36 s in count_votes over 20 s x 2 actors


def test_margin_quick_records_the_samplers_s0_draws_and_prints_both_margins(capsys):
    """The script checks that the softmax it records comes from the sampler's own S0 draws (their mode is the
    stored c_hat) and prints a row per margin with finite rates."""
    assert load("margin").main(["--quick", "--methods", "segcertify"]) == 0
    rows = [
        line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| segcertify")
    ]
    assert [r[3].strip() for r in rows] == ["votes", "softmax"]
    for r in rows:
        abstain, cig = float(r[4]), float(r[5])
        assert 0 <= abstain <= 1 and 0 < cig <= 1


def test_scale_quick_runs_the_whole_job_and_a_noop_rerun(capsys):
    """40 tiny images through sampling, reduction and two reruns, each in its own process (the script fails when
    a rerun samples anything, or when the second one certifies again); a few vote files (at most FILES_PER_ACTOR per
    actor, the cap that keeps progress moving), finite figures."""
    assert load("scale").main(["--quick"]) == 0
    out = capsys.readouterr().out
    (row,) = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 40 ")]
    assert int(row[1]) == 40 and 1 <= int(row[6]) <= 2 * FILES_PER_ACTOR  # rows, vote files (two actors)
    assert all(positive(float(row[i])) for i in (4, 5, 7, 9, 12))
    assert all(positive(float(t)) for t in row[13].split("/"))  # rerun: certify + plot / no-op
    (reducer,) = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 30 | 40 |")]
    (streamed_mib, streamed_s), (memory_mib, memory_s) = (map(float, c.split("/")) for c in reducer[2:4])
    assert positive(streamed_s) and positive(memory_s)  # both modes ran
    assert all(math.isfinite(x) and x >= 0 for x in (streamed_mib, memory_mib, float(reducer[4])))


def test_cost_model_counts_the_paper_adm_and_its_fast_path(tmp_path):
    """The cost model on the meta device: guided-diffusion's 256x256 UNet is 2.24 TFLOP per forward, its
    attention reaches SDPA in a layout the fused kernels take, and the eager half path keeps its non-matmul
    traffic under issue 15's 5 GB per forward (13 GB with GroupNorm's float32 round trip, math-path attention
    and a kernel per scale-shift and residual add)."""
    cost = load("cost_model")
    assert cost.main(["--json", str(tmp_path / "rows.json")]) == 0
    rows = {r["config"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    city = rows["paper_cityscapes"]
    assert city["forwards_per_sample"] == 45 and abs(city["adm_tflop_per_forward"] - 2.242) < 0.005
    assert 4 < city["adm_non_matmul_gb_per_forward"] <= 5
    assert 0 < city["fraction_of_flop_roofline"] <= 1
    tally, _ = cost.denoiser_tally(256, 256, "tile", 32, batch=2)
    names = {name for _, name, _, _ in tally.ops}
    assert "fused_sdpa" in names and "bmm" not in names  # no attention on the math path


def test_gpu_script_imports_nothing_the_gpu_machine_lacks():
    """The lent GPU machine has torch, torchvision, numpy and scipy only: bench/gpu.py and what it imports of
    the package must not need Ray, pydantic, PyYAML, diffusers, pandas, pyarrow or fsspec."""
    blocked = ("ray", "pydantic", "yaml", "diffusers", "pandas", "pyarrow", "s3fs", "fsspec", "transformers")
    code = (
        "import sys, runpy\n"
        f"for m in {blocked!r}: sys.modules[m] = None\n"
        f"runpy.run_path({str(BENCH / 'gpu.py')!r})\n"
        "print('imported')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-3000:]


def test_votes_quick_runs_and_reports_efficiency(capsys):
    assert load("votes").main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("conv3: now", "demo: now"))]
    assert len(rows) == 2
    for row in rows:  # bare ms, count_votes ms, efficiency, digest
        bare, total, efficiency = (float(v) for v in row.split()[-4:-1])
        assert positive(bare) and positive(total) and positive(efficiency)
    gb_before, gb_now = (float(v) for v in re.findall(r"([0-9.]+) GB", out))
    assert gb_now < gb_before  # one read of the logits instead of three passes


def test_results_quick_runs_every_step_of_the_results_stage(capsys):
    assert load("results").main(["--quick"]) == 0
    out = capsys.readouterr().out
    steps = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:2][-1:] == ["now"]}
    assert set(steps) == {"reduce", "plots", "sweep", "report", "recertify"}
    for name, cells in steps.items():  # wall s, peak RSS MiB, I/O floor s, wall / floor
        assert finite(float(cells[2])) and positive(float(cells[3])), name
