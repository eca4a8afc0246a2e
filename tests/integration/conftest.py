"""Integration tests share one local Ray for the whole session (starting Ray costs ~10 s on 2 cores)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Oversubscribe the 2-core box: two training workers plus Ray Data tasks and Serve/Tune actors.
    from raydist.core.runs import embedded_ray_options

    ray.init(
        **embedded_ray_options(4, metrics=True), log_to_driver=True
    )  # /metrics for serve tests; own dashboard port: see its docstring
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node Ray cluster (`ray start` head + worker on 127.0.0.1, token auth on), started on first
    use (~15 s) and stopped at the end of the session. API and layout: tests/integration/cluster.py."""
    from cluster import RayCluster

    cluster = RayCluster().start()
    yield cluster
    cluster.stop()
