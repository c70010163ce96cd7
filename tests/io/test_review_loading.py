"""io.loading: the adapter dtype settings hold for load_adapter and for low_cpu_mem_usage loads, as in peft."""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit
from models import BUILDERS


@pytest.fixture
def folder(tmp_path) -> str:
    model = lorakit.get_peft_model(
        BUILDERS["mlp"](), lorakit.LoraConfig(target_modules=["lin0", "lin1"], r=2, init_lora_weights=False)
    )
    model.save_pretrained(tmp_path)
    return str(tmp_path)


def _dtypes(model, adapter: str) -> set[torch.dtype]:
    return {p.dtype for n, p in model.named_parameters() if f".{adapter}." in n and "lora_" in n}


@pytest.mark.parametrize("autocast", [True, False])
def test_add_adapter_honours_autocast_adapter_dtype(autocast):
    config = lorakit.LoraConfig(target_modules=["lin0"], r=2)
    model = lorakit.get_peft_model(BUILDERS["mlp"]().half(), config, autocast_adapter_dtype=False)
    model.add_adapter("two", lorakit.LoraConfig(target_modules=["lin1"], r=2), autocast_adapter_dtype=autocast)
    assert _dtypes(model, "two") == {torch.float32 if autocast else torch.float16}


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
@pytest.mark.parametrize("autocast", [True, False])
def test_load_adapter_honours_autocast_adapter_dtype(folder, low_cpu_mem_usage, autocast):
    dtypes = []
    for lib in (peft, lorakit):
        model = lib.PeftModel.from_pretrained(BUILDERS["mlp"]().half(), folder, autocast_adapter_dtype=False)
        model.load_adapter(folder, "two", autocast_adapter_dtype=autocast, low_cpu_mem_usage=low_cpu_mem_usage)
        dtypes.append(_dtypes(model, "two"))
    assert dtypes[1] == dtypes[0] == {torch.float32 if autocast else torch.float16}


@pytest.mark.parametrize("autocast", [True, False])
def test_from_pretrained_low_cpu_mem_usage_gives_the_dtype_of_an_ordinary_load(tmp_path, autocast):
    model = lorakit.get_peft_model(
        BUILDERS["mlp"]().to(torch.bfloat16),
        lorakit.LoraConfig(target_modules=["lin0"], r=2, init_lora_weights=False),
        autocast_adapter_dtype=False,
    )
    model.save_pretrained(tmp_path)  # bfloat16 factors on disk
    dtypes = []
    for low_cpu_mem_usage in (False, True):
        loaded = lorakit.PeftModel.from_pretrained(
            BUILDERS["mlp"]().half(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage, autocast_adapter_dtype=autocast
        )
        dtypes.append(_dtypes(loaded, "default"))
    assert dtypes[1] == dtypes[0] == {torch.float32 if autocast else torch.float16}
