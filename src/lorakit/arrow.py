"""create_arrow_model: load a library of LoRA experts onto a model and route every token through them with Arrow
(arXiv:2405.11157), optionally after GenKnowSub (arXiv:2505.10939).

Experts load as ``task_0, task_1, ...``, general adapters (``use_gks``) as ``gks_0, gks_1, ...``; all must have the
same rank on the same Linear / Conv1D modules. A router adapter ``arrow_router`` is then added on those modules and
made active; its per-layer routing is ``lorakit.variants.arrow.ArrowVariant``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch.nn as nn

from .config import ArrowConfig, LoraConfig
from .model.lora_model import restore_on_error
from .peft_model import PeftModel

TASK_ADAPTER_PREFIX = "task_"
GKS_ADAPTER_PREFIX = "gks_"
ROUTER_ADAPTER_NAME = "arrow_router"


def create_arrow_model(
    base_model: nn.Module,
    task_specific_adapter_paths: list[str],
    arrow_config: ArrowConfig,
    general_adapter_paths: list[str] | None = None,
    **adapter_kwargs: Any,
) -> PeftModel:
    """Load the task adapters (and, with ``arrow_config.use_gks``, the general adapters) onto ``base_model`` and
    activate an Arrow router over them.

    Args:
        base_model: the model the adapters were trained on (changed in place, as by ``PeftModel.from_pretrained``)
        task_specific_adapter_paths: folders or Hub ids of the experts; ``"user/repo/sub/folder"`` reads the
            adapter from that subfolder of the Hub repo
        arrow_config: top_k, router_temperature, use_gks; its task_adapter_names / gks_adapter_names are filled in
        general_adapter_paths: the general adapters GenKnowSub subtracts (required with use_gks)
        adapter_kwargs: passed to every ``from_pretrained`` / ``load_adapter`` call (revision, torch_device, ...)
    Returns:
        a ``PeftModel`` with adapters task_i, gks_j and the active ``arrow_router``. On error the base model is left
        as it was given.
    """
    task_paths = list(task_specific_adapter_paths or [])
    general_paths = list(general_adapter_paths or [])
    if not task_paths:
        raise ValueError("`task_specific_adapter_paths` should contain at least one adapter path; got none.")
    if not isinstance(arrow_config, ArrowConfig):
        raise TypeError(f"arrow_config must be a lorakit ArrowConfig, got {type(arrow_config).__name__}.")
    if arrow_config.use_gks and not general_paths:
        raise ValueError("use_gks=True (GenKnowSub) needs general adapters: pass general_adapter_paths.")
    if general_paths and not arrow_config.use_gks:
        warnings.warn(
            f"general_adapter_paths ({len(general_paths)} given) are only used with use_gks=True; they are not "
            "loaded. Set ArrowConfig(use_gks=True) to subtract them.",
            stacklevel=2,
        )
        general_paths = []
    if arrow_config.top_k > len(task_paths):
        raise ValueError(
            f"ArrowConfig.top_k={arrow_config.top_k} exceeds the number of task adapters ({len(task_paths)}); "
            "every token is routed to top_k experts."
        )
    sources = {f"{TASK_ADAPTER_PREFIX}{i}": p for i, p in enumerate(task_paths)}
    sources |= {f"{GKS_ADAPTER_PREFIX}{j}": p for j, p in enumerate(general_paths)}
    with restore_on_error(base_model):
        model = _load_adapters(base_model, sources, adapter_kwargs)
        targets, rank = check_arrow_compatible(model, sources)
        arrow_config.task_adapter_names = [n for n in sources if n.startswith(TASK_ADAPTER_PREFIX)]
        arrow_config.gks_adapter_names = [n for n in sources if n.startswith(GKS_ADAPTER_PREFIX)]
        model.add_adapter(ROUTER_ADAPTER_NAME, LoraConfig(arrow_config=arrow_config, target_modules=targets, r=rank))
        model.set_adapter(ROUTER_ADAPTER_NAME)
    return model


def _load_adapters(base_model: nn.Module, sources: dict[str, str], adapter_kwargs: dict[str, Any]) -> PeftModel:
    """PeftModel.from_pretrained for the first source, load_adapter for the others."""
    model: PeftModel | None = None
    for name, path in sources.items():
        model_id, subfolder = resolve_adapter_source(path)
        kwargs = dict(adapter_kwargs)
        if subfolder is not None:
            kwargs.setdefault("subfolder", subfolder)
        if model is None:
            model = PeftModel.from_pretrained(base_model, model_id, adapter_name=name, **kwargs)
        else:
            model.load_adapter(model_id, adapter_name=name, **kwargs)
    assert model is not None
    return model


def resolve_adapter_source(path: str | os.PathLike) -> tuple[str, str | None]:
    """(model id or folder, Hub subfolder or None) for a path given to create_arrow_model.

    A local folder must hold adapter_config.json; ``"user/repo"`` is a Hub repo and ``"user/repo/a/b"`` its
    subfolder ``a/b``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ValueError(
                f"Local adapter folder {path!r} has no adapter_config.json; found: {sorted(os.listdir(path))}."
            )
        return path, None
    parts = path.strip("/").split("/")
    if len(parts) > 2:
        return "/".join(parts[:2]), "/".join(parts[2:])
    return path, None


def check_arrow_compatible(model: PeftModel, sources: dict[str, str]) -> tuple[list[str], int]:
    """Check that every adapter in ``sources`` has the same rank on the same Linear / Conv1D modules.

    Returns:
        (the modules' paths, the rank) for the router's config
    Raises:
        ValueError naming the adapter, its source and what differs from the first adapter
    """
    layouts = {name: _layout(model, name) for name in sources}
    first = next(iter(sources))
    reference = layouts[first]
    for name, layout in layouts.items():
        who = f"Adapter {name!r} ({sources[name]})"
        kinds = {path: kind for path, (kind, _) in layout.items() if kind != "linear"}
        if kinds:
            raise ValueError(f"{who} targets non-Linear modules {kinds}; Arrow routes Linear / Conv1D layers only.")
        only_here, only_first = sorted(set(layout) - set(reference)), sorted(set(reference) - set(layout))
        if only_here or only_first:
            raise ValueError(
                f"{who} targets other modules than {first!r} ({sources[first]}): only in {name!r}: {only_here}; "
                f"only in {first!r}: {only_first}. Arrow needs every adapter on the same modules."
            )
        ranks = [
            (path, layout[path][1], reference[path][1]) for path in layout if layout[path][1] != reference[path][1]
        ]
        if ranks:
            path, r, r_first = ranks[0]
            raise ValueError(
                f"{who} has rank {r} on {path}, {first!r} ({sources[first]}) has rank {r_first} "
                f"({len(ranks)} module(s) differ). Arrow needs adapters of equal rank."
            )
    return sorted(reference), next(r for _, r in reference.values())


def _layout(model: PeftModel, adapter_name: str) -> dict[str, tuple[str, int]]:
    """module path -> (layer kind, rank) of every LoRA layer that holds ``adapter_name``."""
    return {
        path: (layer.layer_kind, layer.adapters[adapter_name].r)
        for path, layer in model.base_model.lora_layers()
        if adapter_name in layer.adapters
    }
