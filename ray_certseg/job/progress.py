"""Progress while sampling, for runs without progress bars: a periodic log line from the row counter the actors
report to."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

log = logging.getLogger("ray_certseg")


class Progress:
    """A periodic log line for runs without progress bars (``ray job submit``): rows done / total, images per
    minute and time left, from the :class:`RowCounter` the actors report to."""

    def __init__(self, plan: Any, rows_per_image: int, interval: float, counter: Any):
        """``plan``: a :class:`ray_certseg.job.pipeline.Plan` (its ``total``, ``done`` and ``pending`` rows)."""
        self.plan, self.counter = plan, counter
        self.rows_per_image, self.interval = rows_per_image, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.monotonic()

    def __enter__(self) -> Progress:  # noqa: PYI034 - the class is final; Self needs Python 3.11
        if self.interval > 0 and self.plan.pending:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _count(self) -> int | None:
        """Rows finished in this run so far (None when the counter does not answer within the interval)."""
        import ray

        try:
            return min(
                self.plan.pending, ray.get(self.counter.total.remote(), timeout=max(1.0, self.interval))
            )
        except Exception:  # noqa: BLE001 - a progress line must never fail the job
            return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            new = self._count()
            if new is None:
                continue
            dt = time.monotonic() - self._t0
            rate = new / dt if dt > 0 else 0.0
            left = (self.plan.pending - new) / rate if rate > 0 else float("nan")
            log.info(
                "progress: %d/%d rows, %.1f images/min, about %s left",
                self.plan.done + new,
                self.plan.total,
                60 * rate / self.rows_per_image,
                _fmt_seconds(left),
            )


def _fmt_seconds(s: float) -> str:
    if math.isnan(s):
        return "?"
    return f"{int(s // 60)}m{int(s % 60):02d}s"
