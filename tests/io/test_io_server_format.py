"""What a vLLM-style LoRA server reads from an adapter folder, checked on adapters lorakit writes.

Such servers read ``adapter_config.json`` (r, lora_alpha, target_modules, use_rslora, bias, use_dora ...) and parse
each tensor name of ``adapter_model.safetensors`` as ``base_model.model.<module path>.lora_{A,B}.weight`` (or
``lora_embedding_{A,B}``), with A of shape (r, in) and B of shape (out, r). The parser below is written from that
contract, not taken from any server.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

import lorakit
from models import tiny_llama

_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$"
)


def _parse(folder) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    config = json.loads((folder / "adapter_config.json").read_text())
    modules: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        # PEFT writes {"format": "pt"}; lorakit adds the text of the config the weights belong to (io.binding)
        assert set(f.metadata()) == {"format", "lorakit.adapter_config"} and f.metadata()["format"] == "pt"
        assert json.loads(f.metadata()["lorakit.adapter_config"]) == config
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            match = _KEY.match(key)
            assert match is not None, f"a server could not parse tensor {key!r}"
            modules.setdefault(match["module"], {})[match["kind"]] = f.get_tensor(key)
    return config, modules


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_saved_adapter_parses_as_a_server_expects(tmp_path, targets):
    model = tiny_llama()
    peft_model = lorakit.get_peft_model(
        model, lorakit.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets)
    )
    peft_model.save_pretrained(tmp_path)
    config, modules = _parse(tmp_path)
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["bias"] == "none" and config["use_dora"] is False and config["use_rslora"] is False
    assert isinstance(config["target_modules"], list)
    base = peft_model.get_base_model()
    for path, tensors in modules.items():
        assert set(tensors) == {"lora_A", "lora_B"}, path
        linear = base.get_submodule(path).base_layer
        assert tensors["lora_A"].shape == (4, linear.in_features)
        assert tensors["lora_B"].shape == (linear.out_features, 4)
        assert any(path == t or path.endswith("." + t) for t in config["target_modules"]), path
    expected = 14 if targets == "all-linear" else 4
    assert len(modules) == expected
