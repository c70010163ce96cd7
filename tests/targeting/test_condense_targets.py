"""Long target_modules lists (all-linear included) are written as PEFT writes them: condensed to short suffixes."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.targeting.condense import minimal_suffixes
from models import tiny_llama

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
LONG_LIST = [f"model.layers.{i}.self_attn.{n}" for i in range(4) for n in ATTN] + [
    f"model.layers.{i}.mlp.{n}" for i in range(3) for n in ["up_proj", "down_proj"]
]


def _both(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(layers=4), peft.LoraConfig(**kwargs))
        ours = lorakit.get_peft_model(tiny_llama(layers=4), lorakit.LoraConfig(**kwargs))
    return theirs, ours


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_modules="all-linear"),
        dict(target_modules=LONG_LIST),
        dict(target_modules=LONG_LIST[:19]),  # below PEFT's threshold of 20: kept as given
        dict(target_modules="all-linear", exclude_modules=["model.layers.3.mlp.up_proj"]),
    ],
)
def test_written_target_modules_equal_peft(tmp_path, kwargs):
    theirs, ours = _both(**kwargs)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    written = [
        json.loads((tmp_path / d / "adapter_config.json").read_text())["target_modules"] for d in ("peft", "ours")
    ]
    assert sorted(written[1]) == sorted(written[0])
    assert ours.targeted_module_names == theirs.targeted_module_names  # the same modules are adapted


def test_all_linear_config_is_reused_on_a_deeper_model(tmp_path):
    _, ours = _both(target_modules="all-linear")
    ours.save_pretrained(tmp_path)
    config = lorakit.LoraConfig.from_pretrained(tmp_path)
    assert sorted(config.target_modules) == sorted([*ATTN, "gate_proj", "up_proj", "down_proj"])
    deeper = lorakit.get_peft_model(tiny_llama(layers=6), config)
    assert len(deeper.targeted_module_names) == 6 * 7


def test_full_path_configs_still_load(tmp_path):
    _, ours = _both(target_modules="all-linear", init_lora_weights=False)
    ours.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["target_modules"] = [n for n in ours.targeted_module_names]  # as lorakit wrote it before (28 full paths)
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    weights = tmp_path / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})  # as an older lorakit or peft wrote it
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(layers=4), tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours.eval()(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_minimal_suffixes_keep_longer_suffixes_where_needed():
    targets = [f"dec.{i}.q" for i in range(3)] + ["dec.0.k"]
    others = ["enc.0.q", "enc.0.k", "dec.1.k"]
    from peft.tuners.tuners_utils import _find_minimal_target_modules

    assert minimal_suffixes(targets, others) == {"dec.0.k", "dec.0.q", "1.q", "2.q"}
    assert minimal_suffixes(targets, others) == _find_minimal_target_modules(targets, others)
