import pytest


@pytest.fixture(autouse=True)
def _forbid_ray_init(monkeypatch):
    """Unit tests run without Ray: starting a cluster here is a bug in the test or the code under test."""
    import ray

    def refuse(*a, **k):
        raise AssertionError("unit tests must not call ray.init (put the test under tests/integration)")

    monkeypatch.setattr(ray, "init", refuse)
