"""Models with several adapters (targeting different layers, some with modules_to_save), built identically in peft
and lorakit, and the reference result of a mixed batch: each adapter run on its own."""

from __future__ import annotations

import torch

from models import BUILDERS, output_tensor

# kind -> {adapter name: LoraConfig kwargs}; the first adapter is created by get_peft_model
CASES: dict[str, dict[str, dict]] = {
    "llama": {
        "one": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, modules_to_save=["lm_head"]),
        "two": dict(
            target_modules=["k_proj", "down_proj", "embed_tokens"], r=2, lora_alpha=4, modules_to_save=["lm_head"]
        ),
        "three": dict(target_modules=["o_proj"], r=3, modules_to_save=["lm_head"]),
    },
    "gpt2": {
        "one": dict(target_modules=["c_attn"], r=4, fan_in_fan_out=True),
        "two": dict(target_modules=["c_fc", "c_proj"], r=2, fan_in_fan_out=True, use_rslora=True),
    },
    "bert": {
        "one": dict(task_type="SEQ_CLS", target_modules=["query", "value"], r=4),
        "two": dict(task_type="SEQ_CLS", target_modules=["key", "output.dense"], r=2),
    },
    "mlp": {
        "one": dict(target_modules=["lin0"], r=4),
        "two": dict(target_modules=["lin1"], r=2, modules_to_save=["head"]),
    },
    "conv": {
        "one": dict(target_modules=["conv1d", "conv2d"], r=2),
        "two": dict(target_modules=["grouped", "conv3d"], r=4),
    },
    "emb": {
        "one": dict(target_modules=["emb"], r=3),
        "two": dict(target_modules=["lin"], r=2),
    },
}

# peft raises KeyError when a row's adapter has no copy of a modules_to_save module that another adapter has; lorakit
# uses the original module for it (as set_adapter would), so these cases are compared with separate runs only
PEFT_CANNOT_MIX = {"mlp"}

NAMES = ["two", "__base__", "one", "two"]  # one per row of ``batch``; "three" is added where the case has it


def names_for(kind: str) -> list[str]:
    adapters = list(CASES[kind])
    return NAMES if len(adapters) == 2 else ["two", "__base__", "one", "three", "three", "one"]


def batch(kind: str, rows: int, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind in ("llama", "gpt2", "bert"):
        ids = torch.randint(1, 96, (rows, 7), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "mlp":
        return {"x": torch.randn(rows, 10, generator=g)}
    if kind == "conv":
        return {"x": torch.randn(rows, 3, 16, generator=g)}
    return {"ids": torch.randint(0, 50, (rows, 6), generator=g)}


def build(lib, kind: str, model=None):
    """``kind``'s base model with all of its case's adapters (random B, so every adapter changes the output)."""
    adapters = CASES[kind]
    first, *rest = adapters
    model = lib.get_peft_model(
        model if model is not None else BUILDERS[kind](),
        lib.LoraConfig(init_lora_weights=False, **adapters[first]),
        first,
    )
    for name in rest:
        model.add_adapter(name, lib.LoraConfig(init_lora_weights=False, **adapters[name]))
    return model.eval()


def build_pair(kind: str, model_builder=None):
    """(lorakit model, peft model) with identical weights; modules_to_save copies are perturbed so that they differ
    from the original module."""
    import peft

    import lorakit

    make = model_builder or BUILDERS[kind]
    ref = build(peft, kind, make())
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.5)
    ours = build(lorakit, kind, make())
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def run_each_adapter(model, names: list[str], fn):
    """{name: fn()} with ``name`` the only active adapter (``__base__``: adapters disabled)."""
    out = {}
    for name in dict.fromkeys(names):
        if name == "__base__":
            with model.disable_adapter():
                out[name] = fn()
        else:
            model.set_adapter(name)
            out[name] = fn()
    return out


def separate_forward(model, kind: str, names: list[str], inputs: dict) -> torch.Tensor:
    """Row i of the full batch run with adapter names[i] alone: the reference of a mixed forward."""
    with torch.no_grad():
        per_adapter = run_each_adapter(model, names, lambda: output_tensor(model(**inputs)))
    return torch.stack([per_adapter[name][i] for i, name in enumerate(names)])
