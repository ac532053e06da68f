"""Benchmark 8, vote-counting overhead: ``sampling.count_votes`` against the segmenter's bare forwards.

Per image, ``count_votes`` runs n0 + n noisy forwards plus the clean one and turns each batch of logits into
votes (noise, the class argmax, the finiteness check, the scatter into the counts). Its efficiency is

    efficiency = (seconds of bare forwards of batches of the same sizes) / (seconds of count_votes)

(target >= 0.9 on 2 cores). Setups, random weights from a fixed seed, torch's default threads:

* ``conv3``: a 3-layer, 32-channel conv segmenter (3x3, 3x3, 1x1), one 128 x 128 image, 19 classes,
  n0 = 10, n = 100, batch_size 22 (5 batches): a segmenter that is cheap next to its image;
* ``demo``: the demo segmenter (``TinySegNet`` width 24, 7 classes) on a demo image (64 x 64), n0 = 10,
  n = 100, batch_size 55, no denoiser (the demo's ``segcertify`` method).

With ``--before REV`` the same measurement runs on the package as it was at git revision REV (a temporary
worktree), alternating with this checkout in every round, so both are measured side by side in one run; each
measurement is a fresh process, and the votes (c_hat, k, the clean prediction) of both must be bit-identical.

A GPU check without a GPU: the bytes that the label step moves per batch, counted on the meta device with
``bench/cost_model.py``'s counter at the paper's Cityscapes shape (float16 logits (4, 19, 1024, 2048)), for the
former ``argmax`` + ``isfinite(logits).all()`` and for today's ``max`` + ``isfinite(max).all()``.

Run: ``python bench/votes.py --before REV`` (``--quick``: a tiny smoke run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SETUPS = {
    "conv3": {"size": 128, "classes": 19, "n0": 10, "n": 100, "batch_size": 22},
    "demo": {"size": 64, "classes": 7, "n0": 10, "n": 100, "batch_size": 55},
}
QUICK = {"n0": 2, "n": 6, "batch_size": 4}


def segmenter(setup: str, classes: int) -> torch.nn.Module:
    from torch import nn

    torch.manual_seed(0)
    if setup == "conv3":
        net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, classes, 1),
        )
    else:
        from ray_certseg.models.tiny import tiny_segnet

        net = tiny_segnet(classes, width=24)
    return net.eval().requires_grad_(False)


def image(setup: str, size: int) -> torch.Tensor:
    if setup == "demo":
        import numpy as np
        from PIL import Image

        path = min((REPO / "assets" / "demo" / "data").rglob("*.png"))
        return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(1))


def child(setup: str, reps: int, quick: bool) -> dict:
    """In a fresh process: median seconds of the bare forwards and of count_votes over ``reps`` alternating
    repetitions (after a warm-up of each), and a digest of the votes."""
    import ray_certseg
    from ray_certseg.sampling import count_votes

    p = SETUPS[setup] | (QUICK if quick else {})
    seg, x = segmenter(setup, p["classes"]), image(setup, p["size"])
    total, b = p["n0"] + p["n"], p["batch_size"]
    gen = torch.Generator().manual_seed(2)
    # the same kind of input as count_votes gets (the segmenter's speed depends on its input: uniform noise
    # images run the demo segmenter 2x slower than noisy demo images)
    batches = [x + 0.25 * torch.randn(min(b, total - s), *x.shape, generator=gen) for s in range(0, total, b)]

    def bare() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            for batch in batches:
                seg(batch)
            return time.perf_counter() - start

    def votes():
        kw = {k: p[k] for k in ("n0", "n", "batch_size")}
        return count_votes(x, seg, sigma=0.25, num_classes=p["classes"], seed=0, image_id="bench", **kw)

    def timed_votes() -> float:
        start = time.perf_counter()
        votes()
        return time.perf_counter() - start

    bare(), votes()  # warm-up
    rows = [(bare(), timed_votes()) for _ in range(reps)]
    v = votes()
    digest = hashlib.sha256(b"".join(a.tobytes() for a in (v.c_hat, v.k, v.clean_pred))).hexdigest()[:16]
    return {
        "bare": statistics.median(r[0] for r in rows),
        "count_votes": statistics.median(r[1] for r in rows),
        "efficiency": statistics.median(r[0] / r[1] for r in rows),
        "votes": digest,
        "threads": torch.get_num_threads(),
        "package": str(Path(ray_certseg.__file__).parent),
    }


def run_child(src: Path, setup: str, reps: int, quick: bool) -> dict:
    """One measurement in a fresh process importing the package of ``src``; in this process for a quick run
    of this checkout (a smoke run)."""
    if quick and src == REPO:
        return child(setup, reps, quick)
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", setup, "--reps", str(reps)]
    out = subprocess.run(
        cmd + (["--quick"] if quick else []), env=env, cwd=src, check=True, text=True, capture_output=True
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if Path(result["package"]).resolve() != (src / "ray_certseg").resolve():
        raise RuntimeError(f"measured {result['package']}, not the package of {src}")
    return result


def label_step_bytes() -> dict[str, float]:
    """GB moved per batch by the label step, old and new, on float16 logits of the paper's Cityscapes shape."""
    sys.path.insert(0, str(BENCH))
    from cost_model import count

    logits = torch.empty(4, 19, 1024, 2048, dtype=torch.float16, device="meta")

    def now_step(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, labels = t.max(dim=1)
        return labels, torch.isfinite(top).all()

    before = count(lambda t: (t.argmax(dim=1), torch.isfinite(t).all()), logits)
    now = count(now_step, logits)
    return {"before": sum(before.bytes.values()) / 1e9, "now": sum(now.bytes.values()) / 1e9}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", help="git revision to measure side by side with this checkout")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (a fresh process each)")
    p.add_argument("--reps", type=int, default=5, help="repetitions per process")
    p.add_argument("--quick", action="store_true", help="tiny sample counts, one round (a smoke run)")
    p.add_argument("--child", choices=sorted(SETUPS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.reps, args.quick)))
        return 0
    rounds, reps = (1, 2) if args.quick else (args.rounds, args.reps)
    with tempfile.TemporaryDirectory(prefix="bench-votes-") as tmp:
        sources = {"now": REPO}
        if args.before:
            worktree = Path(tmp) / "before"
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(worktree), args.before],
                check=True,
            )
            sources = {f"before ({args.before})": worktree, "now": REPO}
        try:
            results = {(name, s): [] for name in sources for s in SETUPS}
            for _ in range(rounds):
                for s in SETUPS:
                    for name, src in sources.items():
                        results[name, s].append(run_child(src, s, reps, args.quick))
        finally:
            if args.before:
                subprocess.run(
                    ["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=True
                )
    print(report(results, label_step_bytes(), rounds, reps, args.quick))
    digests = {s: {r["votes"] for (_, s2), rs in results.items() if s2 == s for r in rs} for s in SETUPS}
    if any(len(d) != 1 for d in digests.values()):
        print(f"votes differ: {digests}", file=sys.stderr)
        return 1
    return 0


def report(results: dict, traffic: dict[str, float], rounds: int, reps: int, quick: bool) -> str:
    sys.path.insert(0, str(BENCH))
    import benchlib as B

    rows = []
    for (name, setup), rs in results.items():
        med = lambda key, rs=rs: statistics.median(r[key] for r in rs)
        rows.append(
            [
                f"{setup}: {name}",
                f"{1e3 * med('bare'):.0f}",
                f"{1e3 * med('count_votes'):.0f}",
                f"{med('efficiency'):.3f}",
                rs[0]["votes"],
            ]
        )
    head = (
        f"{'quick: ' if quick else ''}{rounds} rounds x {reps} repetitions, medians; "
        f"torch threads {results[next(iter(results))][0]['threads']}"
    )
    return "\n".join(
        [
            head,
            B.machine(),
            "",
            B.table(["", "bare forwards ms", "count_votes ms", "efficiency", "votes sha256"], rows),
            "",
            (
                f"label step at (4, 19, 1024, 2048) float16 logits, counted on meta: "
                f"{traffic['before']:.3f} GB before -> {traffic['now']:.3f} GB now per batch"
            ),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
