"""Walking a model's adapter modules without visiting every adapter's internals.

A model with many adapters has tens of thousands of modules (each adapter adds its own lora_A/lora_B/dropout
per layer); a plain ``named_modules()`` walk per call shows up in mixed-batch and decode timings. This walk enters an
adapter module only through its ``base_layer`` (where nested wrappers live) and never into its per-adapter dicts.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.nn as nn


def adapter_modules(root: nn.Module, kinds: tuple[type, ...], prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every module of ``kinds`` below ``root``, in ``named_modules()`` order.

    Inside a module of ``kinds`` only its ``base_layer`` child is entered.
    """
    for name, child in root.named_children():
        yield from _visit(child, f"{prefix}.{name}" if prefix else name, kinds)


def _visit(module: nn.Module, path: str, kinds: tuple[type, ...]) -> Iterator[tuple[str, nn.Module]]:
    if not isinstance(module, kinds):
        yield from adapter_modules(module, kinds, path)
        return
    yield path, module
    inner = module._modules.get("base_layer")
    if inner is not None:
        yield from _visit(inner, f"{path}.base_layer", kinds)
