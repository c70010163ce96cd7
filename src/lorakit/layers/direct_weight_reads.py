"""Modules whose weight a transformers model reads directly instead of calling the module: LoRA there is refused.

A LoRA layer acts only when its module is called. Mamba-type mixers hand some of their modules' weights straight to
fused kernels (or multiply by them), so an adapter on those modules would be skipped without a word, on every device
or only where the kernels run (CUDA with mamba-ssm installed, in training without a cache). PEFT refuses ``out_proj``
and ``conv1d`` on falcon_h1, mamba, mamba2, falcon_mamba and nemotron_h; lorakit refuses those too, with the reason,
and the other modules transformers 5 reads the same way (docs/features.md lists them as deliberate differences).

``DIRECT_WEIGHT_READS`` maps ``config.model_type`` to {module name: reason}; a new architecture adds an entry.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

_CONV = "causal_conv1d_forward reads conv1d.weight itself on every device, so the module is never called"
_MAMBA_INNER = (
    "in training without a cache the mixer hands {name}.weight to the fused mamba_inner_fn kernel (CUDA with "
    "mamba-ssm), which never calls the module"
)
_MAMBA2_SCAN = (
    "in training without a cache the mixer hands out_proj.weight to the fused mamba2_split_conv1d_scan_combined "
    "kernel (CUDA with mamba-ssm), which never calls the module"
)
_DT = "the mixer multiplies by dt_proj.weight itself on every device, so the module is never called"
_PEFT_OUT = (
    "PEFT refuses it on this architecture (mamba-ssm's fused kernels read the weight directly); refused alike so that "
    "configs work the same in both libraries"
)

_MAMBA2_FAMILY = {"out_proj": _MAMBA2_SCAN, "conv1d": _CONV}
_WAVLM_MHA = (
    "WavLM's attention hands {name}.weight to F.multi_head_attention_forward on every device, so the module is never "
    "called (merging would apply the adapter, the forward never does)"
)
_JAMBA_DT = (
    "jamba's mixer multiplies by dt_proj.weight itself (it calls the module only for quantised models), so the "
    "module is never called"
)

DIRECT_WEIGHT_READS: dict[str, dict[str, str]] = {
    "mamba": {
        "out_proj": _MAMBA_INNER.format(name="out_proj"),
        "x_proj": _MAMBA_INNER.format(name="x_proj"),
        "dt_proj": _DT,
        "conv1d": _CONV,
    },
    "falcon_mamba": {"out_proj": _PEFT_OUT, "dt_proj": _DT, "conv1d": _CONV},
    "mamba2": _MAMBA2_FAMILY,
    "nemotron_h": _MAMBA2_FAMILY,
    "falcon_h1": _MAMBA2_FAMILY,
    "bamba": _MAMBA2_FAMILY,
    "zamba2": _MAMBA2_FAMILY,
    "granitemoehybrid": _MAMBA2_FAMILY,
    "wavlm": {name: _WAVLM_MHA.format(name=name) for name in ("q_proj", "k_proj", "v_proj", "out_proj")},
    "jamba": {"dt_proj": _JAMBA_DT},
}
"""config.model_type -> {module name (the last part of its path): why LoRA there would be skipped}."""


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def refuse_direct_weight_reads(model: nn.Module, targets: Iterable[str]) -> None:
    """ValueError naming every target whose weight ``model`` reads directly (see ``DIRECT_WEIGHT_READS``) and why."""
    model_type = model_type_of(model)
    refused = DIRECT_WEIGHT_READS.get(model_type or "")
    if not refused:
        return
    hits = [name for name in targets if name.rpartition(".")[2] in refused]
    if not hits:
        return
    reasons = "; ".join(f"{leaf}: {refused[leaf]}" for leaf in sorted({n.rpartition(".")[2] for n in hits}))
    shown = ", ".join(repr(n) for n in hits[:3]) + (f" and {len(hits) - 3} more" if len(hits) > 3 else "")
    raise ValueError(
        f"LoRA cannot adapt {shown} of this {model_type} model: {reasons}. An adapter there would be skipped "
        f"silently. Remove {sorted(refused)} from target_modules (or list them in exclude_modules); the "
        f"{model_type} modules refused are: {', '.join(sorted(refused))}."
    )
