"""Init methods that rewrite the base weight (PiSSA, OLoRA, CorDA: W <- W - s B0 A0; LoftQ: W <- quantised W) may
only be used for the first adapter of a model: rewriting W under adapters that are already there changes their
outputs (and the base model's) silently. PEFT allows it; lorakit refuses (docs/features.md).
"""

from __future__ import annotations

from ..config import LoraConfig

BASE_REWRITING_INITS: list[str] = ["pissa", "olora", "corda", "loftq"]
"""init_lora_weights values (or prefixes: 'pissa_niter_K') whose init writes a new base weight. Extend it when a
registered init method returns ``InitResult.base_weight``."""


def rewrites_base(config: LoraConfig) -> bool:
    init = config.init_lora_weights
    return isinstance(init, str) and any(init == p or init.startswith(p + "_") for p in BASE_REWRITING_INITS)


def check_base_rewrite_allowed(config: LoraConfig, adapter_name: str, existing: list[str], runs_init: bool) -> None:
    """Raise ValueError when ``config``'s init would rewrite the base weight of a model that already has adapters.

    ``runs_init`` is False when the factors are created empty (low_cpu_mem_usage, e.g. to load saved weights): the
    base is then not touched and the adapter is allowed.
    """
    if not runs_init or not existing or not rewrites_base(config):
        return
    raise ValueError(
        f"Adapter {adapter_name!r} uses init_lora_weights={config.init_lora_weights!r}, which rewrites the base "
        f"weights, but the model already has adapter(s) {sorted(existing)}: their outputs (and the base model's) "
        "would change. Create it on a model without adapters (get_peft_model on a fresh base), or use another "
        "init_lora_weights."
    )
