"""Unit tier: core/ only. Ray must not be needed, so any attempt to start it fails the test."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "/tests/unit/" in str(item.fspath):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _forbid_ray(monkeypatch):
    try:
        import ray
    except ImportError:
        return

    def _refuse(*args, **kwargs):
        raise RuntimeError("unit tests must not start Ray (ray.init was called)")

    monkeypatch.setattr(ray, "init", _refuse)
