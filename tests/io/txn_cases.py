"""Distinguishable versions of one adapter for the save-transaction tests; their child processes import this too.

A and B have the same rank and targets but another alpha and other weights (the case a mixed folder loads silently
with the wrong alpha), and are saved in different formats (safetensors / .bin), so a stale file of the other format
would show. C is a third version for the save that follows an interrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import lorakit
from models import BUILDERS

VERSIONS = {
    "A": dict(alpha=4, seed=1, safe=True),
    "B": dict(alpha=8, seed=2, safe=False),
    "C": dict(alpha=6, seed=3, safe=True),
}
X = torch.randn(5, 10, generator=torch.Generator().manual_seed(7))
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"}


def version_model(name: str) -> lorakit.PeftModel:
    spec = VERSIONS[name]
    config = lorakit.LoraConfig(target_modules=["lin0", "lin1"], r=2, lora_alpha=spec["alpha"], init_lora_weights=False)
    model = lorakit.get_peft_model(BUILDERS["mlp"](), config)
    g = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=g))
    return model.eval()


def save(name: str, folder: Path, safe: bool | None = None) -> None:
    safe = VERSIONS[name]["safe"] if safe is None else safe
    version_model(name).save_pretrained(folder, safe_serialization=safe)


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


EXPECTED = {name: outputs(version_model(name)) for name in VERSIONS}


def which(out: torch.Tensor, rtol: float = 0.0) -> str:
    """The version whose outputs ``out`` equals (exactly, or within ``rtol`` for another library's arithmetic);
    AssertionError when none does (a mixed adapter)."""
    found = [name for name, ref in EXPECTED.items() if torch.allclose(out, ref, rtol=rtol, atol=0)]
    assert len(found) == 1, "the loaded adapter is none of the saved versions"
    return found[0]


def load_version(folder: Path) -> str:
    return which(outputs(lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), folder)))


def raw_pair(folder: Path) -> tuple[dict | None, dict[str, torch.Tensor] | None, list[str]]:
    """(config, weights, weights file names) as a reader that knows nothing of lorakit finds them."""
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    names = sorted(n for n in ("adapter_model.safetensors", "adapter_model.bin") if (folder / n).is_file())
    weights = None
    if "adapter_model.safetensors" in names:
        from safetensors.torch import load_file

        weights = load_file(str(folder / "adapter_model.safetensors"))
    elif names:
        weights = dict(torch.load(folder / "adapter_model.bin", weights_only=True))
    return config, weights, names


def saved_pair(name: str, folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, weights) of version ``name`` saved alone in ``folder``."""
    save(name, folder)
    config, weights, _ = raw_pair(folder)
    return config, weights


def same_pair(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
