"""Derived caches that modules keep in their ``__dict__`` under names starting with ``_lorakit_`` (cast factors,
adapter stacks, mixed-batch plans, DoRA's ||W||^2, the per-call batches of ``kernels.factor_casts``).

They hold weak references and device tensors derived from the parameters, so they are dropped whenever a module is
pickled or deep-copied (``torch.save(model)``, ``copy.deepcopy``): the copy rebuilds them on demand.
"""

from __future__ import annotations

from typing import Any

CACHE_PREFIX = "_lorakit_"


def state_without_caches(module: Any) -> dict[str, Any]:
    """``module.__dict__`` without the ``_lorakit_`` caches (for ``__getstate__``)."""
    return {k: v for k, v in module.__dict__.items() if not k.startswith(CACHE_PREFIX)}
