"""The driver's Ray session: attach to a cluster or start a local instance, and choose bars or log lines for
progress (a person at a terminal, or ``ray job submit``'s log)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("ray_certseg")

_started_ray = False  # whether this process's init_ray connected or started Ray (so main may shut it down)


def init_ray(address: str | None, runtime_env: dict | None = None) -> None:
    """Attach to ``address`` / ``RAY_ADDRESS`` when given, else start a private local instance. ``runtime_env``
    (``ray.runtime_env``) is the job's: Ray uploads its local ``py_modules`` / ``working_dir`` and merges it
    with the runtime env of a job submitted with ``ray job submit``."""
    global _started_ray
    import ray

    if ray.is_initialized():
        if runtime_env:
            log.warning(
                "Ray is already initialised in this process: ray.runtime_env %s is not applied",
                sorted(runtime_env),
            )
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    else:
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=True,
            logging_level="warning",
            runtime_env=runtime_env,
        )
    _started_ray = True


def stop_ray() -> None:
    """Shut down the Ray connection this process made (flushing the workers' log lines first), so that the
    job's own error is the last line a person reads."""
    global _started_ray
    if _started_ray:
        import ray

        ray.shutdown()
        _started_ray = False


SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a `ray job submit` driver


def interactive_terminal(stream: Any = None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether a person watches this driver: its stderr is a terminal, it is not a `ray job submit` entrypoint
    (whose output goes to the job log) and RAY_DATA_DISABLE_PROGRESS_BARS is not 1."""
    stream = sys.stderr if stream is None else stream
    environ = os.environ if environ is None else environ
    isatty = getattr(stream, "isatty", None)
    return (
        bool(isatty and isatty())
        and SUBMITTED_JOB_ENV not in environ
        and environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0") != "1"
    )


CORE_WORKER_NOTE = (
    "Ray logs one core_worker.cc error per sampling actor, 'has constructor arguments in the object store "
    "and max_restarts > 0' (ray-project/ray#53727). Ray Data itself passes its context and the sampler "
    "through the object store and restarts pool actors by default; those objects live as long as the job, "
    "so an actor that is restarted (e.g. after a lost node) still finds them. It is expected here; turning "
    "restarts off to silence it would cost that fault tolerance."
)


def configure_ray_data(interactive: bool) -> None:
    """Progress bars for a person at a terminal; periodic log lines (see progress.Progress) otherwise."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = interactive
    ctx.print_on_execution_start = interactive
