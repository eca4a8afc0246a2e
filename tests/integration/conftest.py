"""Integration tests share one local Ray for the whole session (starting Ray costs ~10 s on 2 cores)."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Oversubscribe the 2-core box: two training workers plus Ray Data tasks and Serve/Tune actors.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
