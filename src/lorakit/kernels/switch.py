"""The module-level switch between lorakit's fast paths and the readable reference paths.

Every fast path in ``lorakit.kernels`` asks ``fast_paths_enabled()`` first; tests and debugging force the reference
with ``use_reference()`` (a context manager) or ``set_reference_mode(True)``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

_FORCE_REFERENCE = False


def set_reference_mode(enabled: bool) -> None:
    """Force (True) or stop forcing (False) the reference paths everywhere."""
    global _FORCE_REFERENCE
    _FORCE_REFERENCE = bool(enabled)


def fast_paths_enabled() -> bool:
    return not _FORCE_REFERENCE


@contextlib.contextmanager
def use_reference(enabled: bool = True) -> Iterator[None]:
    """Run the block on the reference paths (``enabled=False``: on the fast paths); restores the previous mode."""
    global _FORCE_REFERENCE
    previous = _FORCE_REFERENCE
    _FORCE_REFERENCE = bool(enabled)
    try:
        yield
    finally:
        _FORCE_REFERENCE = previous


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports and a CUDA device exists (imported lazily: ``import lorakit`` never needs it)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import triton  # noqa: F401
    except Exception:  # any import failure means: no Triton path
        return False
    return True
