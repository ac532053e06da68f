"""Which S0 margin chooses the hierarchical level better: vote fractions or the mean softmax over S0?

Hierarchical certification (docs/hierarchical.md) picks each pixel's level from a margin of the selection set S0:

    vote margin     m_i = (first - second largest fine-class vote count in S0) / n0     (what the sampler stores)
    softmax margin  m_i = first - second largest class of (1 / n0) sum_{j in S0} softmax(logits_j)_{., i}

and then l_i = min{l : m_i >= t_l}. Both depend on S0 alone, so both keep the guarantee; the question is which
certifies more. This script runs the demo job's models in this process on the demo images (configs/demo.yaml:
its methods, sigmas, n0, n, seed and batch size), counts the votes exactly as an actor does
(``VoteSampler._sample``) and records the softmax of the same S0 draws (the first ``n0`` rows of the first
sampling batch, so ``sampling.batch_size >= n0``; the mode of their argmax is checked against the stored
``c_hat``). It then certifies every row with both margins over a grid of threshold functions
(t_0 >= t_1 >= t_2 = 0 in steps of 0.1) at the demo's tau, alpha and Holm, and prints per method and sigma:

* at the demo's thresholds (0.7, 0.5, 0): abstain rate and CIG for each margin;
* the best thresholds per margin chosen on the whole set (optimistic), and chosen on one half of the images
  and scored on the other (2-fold by image order, pooled): the honest comparison.

Run: ``python bench/margin.py`` (``--images N``: fewer images; ``--quick``: 2 images, one sigma, a coarse grid).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray_certseg.certify import ABSTAIN, class_tree, select
from ray_certseg.certify.hierarchical import certify_levels
from ray_certseg.config import load_config
from ray_certseg.data import list_items, load_item
from ray_certseg.job.pipeline import VoteSampler

DEMO_THRESHOLDS = (0.7, 0.5, 0.0)


class S0Softmax:
    """Wraps a segmenter; keeps the mean softmax and the argmax vote counts of the S0 draws of one row.

    count_votes calls the segmenter once on the clean image, then on the sampling batches; stream positions
    0..n0-1 are S0, so with batch_size >= n0 they are the first n0 rows of the second call."""

    def __init__(self, segmenter: Any, n0: int, num_classes: int):
        self.segmenter, self.n0, self.num_classes = segmenter, n0, num_classes
        self.name = getattr(segmenter, "name", None)
        self.reset()

    def reset(self) -> None:
        self.calls, self.mean_softmax, self.counts0 = 0, None, None

    def __call__(self, x: Any) -> Any:
        import torch

        logits = self.segmenter(x)
        self.calls += 1
        if self.calls == 2:
            s0 = logits[: self.n0].float()
            self.mean_softmax = torch.softmax(s0, dim=1).mean(0).double().cpu().numpy()
            labels = s0.argmax(dim=1).cpu().numpy()
            self.counts0 = np.stack([(labels == c).sum(0) for c in range(self.num_classes)])
        return logits


def softmax_margin(mean_softmax: np.ndarray) -> np.ndarray:
    """First minus second largest class of the (C, H, W) mean softmax."""
    top = np.sort(mean_softmax, axis=0)
    return top[-1] - top[-2]


def score(
    rec: Any, h: class_tree.Hierarchy, thresholds: tuple[float, ...], tau: float, alpha: float
) -> np.ndarray:
    """(labelled pixels, certified pixels, correct pixels, information gained) of one row."""
    cert = certify_levels(rec, h, thresholds, tau=tau, alpha=alpha, correction="holm")
    label = np.asarray(rec.label).astype(np.intp)
    labelled = label != rec.ignore_index
    certified = (cert.labels != ABSTAIN) & labelled
    node, _ = h.tables
    level = cert.level.astype(np.intp)
    truth_node = node[level, np.where(labelled, label, 0)]
    correct = certified & (cert.labels.astype(np.intp) == truth_node)
    gain = h.info_gain()[level, np.where(certified, cert.labels, 0).astype(np.intp)]
    return np.array(
        [labelled.sum(), certified.sum(), correct.sum(), (gain * correct).sum()], dtype=np.float64
    )


def summary(total: np.ndarray, num_classes: int) -> tuple[float, float]:
    """(abstain rate, CIG) of summed :func:`score` rows."""
    labelled, certified, _, gain = total
    return 1 - certified / labelled, gain / (labelled * np.log(num_classes))


def grid(step: float) -> list[tuple[float, float, float]]:
    ticks = np.round(np.arange(0, 1 + 1e-9, step), 3)
    return [(float(t0), float(t1), 0.0) for t0, t1 in itertools.product(ticks, ticks) if t1 <= t0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--images", type=int, default=None, help="default: the config's (24)")
    ap.add_argument("--methods", default="diffusion,segcertify")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    out = tempfile.mkdtemp(prefix="margin-bench-")
    cfg = load_config(args.config, [f"output={out}"])
    s, c = cfg.sampling, cfg.certify
    if s.batch_size < s.n0:
        raise SystemExit(f"sampling.batch_size {s.batch_size} < n0 {s.n0}: S0 must fit in the first batch")
    tau, alpha = c.taus[0], c.alphas[0]
    h = class_tree.load(cfg.dataset.hierarchy)
    sigmas = s.sigmas[:1] if args.quick else s.sigmas
    refs = list_items(cfg.dataset)[: 2 if args.quick else args.images]
    candidates = sorted(set(grid(0.5 if args.quick else 0.1)) | {DEMO_THRESHOLDS})
    sampler = VoteSampler(cfg.to_dict(redact=False))
    print(
        f"demo margins: {len(refs)} images, sigmas {list(sigmas)}, n0={s.n0}, n={s.n}, tau={tau}, alpha={alpha}, "
        f"holm, hierarchy {h.name}, {len(candidates)} threshold functions (t2 = 0)\n"
    )
    print(
        "| method | sigma | margin | abstain @0.7,0.5,0 | CIG @0.7,0.5,0 | best on all: thresholds | abstain | CIG "
        "| 2-fold held out: abstain | CIG |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        name = cfg.methods[method].segmenter
        recorder = S0Softmax(sampler.segmenters[name], s.n0, cfg.dataset.num_classes)
        sampler.segmenters[name] = recorder
        for sigma in sigmas:
            rows: dict[str, list[Any]] = {"votes": [], "softmax": []}
            start = time.perf_counter()
            for ref in refs:
                recorder.reset()
                rec = sampler._sample(load_item(ref, cfg.dataset), method, sigma)
                if not np.array_equal(select(recorder.counts0), rec.c_hat):
                    raise AssertionError(f"{ref['image_id']}: the recorded S0 draws are not the sampler's")
                rows["votes"].append(rec)
                rows["softmax"].append(
                    dataclasses.replace(rec, margin=softmax_margin(recorder.mean_softmax), n0=1)
                )
            seconds = time.perf_counter() - start
            for source, recs in rows.items():
                table = np.array(
                    [[score(r, h, t, tau, alpha) for r in recs] for t in candidates]
                )  # (T, images, 4)
                at_demo = summary(table[candidates.index(DEMO_THRESHOLDS)].sum(0), h.num_classes)
                cig_all = [summary(t.sum(0), h.num_classes)[1] for t in table]
                best = int(np.argmax(cig_all))
                held = np.zeros(4)
                halves = (np.arange(len(recs)) % 2 == 0, np.arange(len(recs)) % 2 == 1)
                for choose, score_on in (halves, halves[::-1]):
                    pick = int(np.argmax([summary(t[choose].sum(0), h.num_classes)[1] for t in table]))
                    held += table[pick][score_on].sum(0)
                held_abstain, held_cig = summary(held, h.num_classes)
                best_abstain, best_cig = summary(table[best].sum(0), h.num_classes)
                print(
                    f"| {method} | {sigma:g} | {source} | {at_demo[0]:.3f} | {at_demo[1]:.3f} | "
                    f"{','.join(f'{v:g}' for v in candidates[best])} | {best_abstain:.3f} | {best_cig:.3f} | "
                    f"{held_abstain:.3f} | {held_cig:.3f} |",
                    flush=True,
                )
            print(
                f"<!-- {method} sigma {sigma:g}: sampled {len(refs)} rows in {seconds:.0f} s -->", flush=True
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
