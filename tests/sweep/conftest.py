"""The sweep runs its FAST architectures by default; the others (``@pytest.mark.sweep``) only with
``LORAKIT_SWEEP=all`` (``make sweep``) or a marker expression naming ``sweep`` (``-m sweep``)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sweep: part of the full architecture sweep (make sweep), off by default")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("LORAKIT_SWEEP") == "all" or "sweep" in (config.option.markexpr or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("sweep") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.get_closest_marker("sweep") is None]
