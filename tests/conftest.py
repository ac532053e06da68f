"""Shared test set-up. Ray reads these variables at import time, so they are set before anything imports ray."""

import os

for _k, _v in {
    "RAY_AUTH_MODE": "disabled",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (an init/shutdown cycle costs ~5 s on 2 cores)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        object_store_memory=256 * 1024**2,
        log_to_driver=False,
        logging_level="warning",
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield
    ray.shutdown()
