"""LoRA on a module whose weight a Mamba-type model reads directly is refused (issue 15, item 4): the error names the
module and the reason; the modules it does call are adapted as before; and the reasons that hold on every device are
checked against transformers itself (the module is never called)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import lorakit
from lorakit.layers.direct_weight_reads import DIRECT_WEIGHT_READS

SMALL = {
    "mamba": dict(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=8),
    "falcon_mamba": dict(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=8),
    "nemotron_h": dict(hidden_size=32, num_hidden_layers=2, vocab_size=64, intermediate_size=32, head_dim=8)
    | dict(num_attention_heads=4, num_key_value_heads=2, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8)
    | dict(n_groups=1),
}


def _tiny(model_type: str):
    config = AutoConfig.for_model(model_type, **SMALL[model_type])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", list(SMALL))
def test_out_proj_is_refused_naming_the_module_and_the_reason(model_type):
    model = _tiny(model_type)
    assert any(n.endswith("mixer.out_proj") for n, _ in model.named_modules())
    with pytest.raises(ValueError, match=r"out_proj.*of this " + model_type + r" model: out_proj: .*skipped"):
        lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["out_proj"]))
    assert not any("lora" in n for n, _ in model.named_modules())  # refused before anything was wrapped
    with pytest.raises(ValueError, match="incompatible with Mamba"):  # peft refuses it too
        peft.get_peft_model(_tiny(model_type), peft.LoraConfig(target_modules=["out_proj"]))


def test_all_linear_is_refused_and_works_once_the_read_modules_are_excluded():
    with pytest.raises(ValueError, match=r"dt_proj: the mixer multiplies by dt_proj\.weight"):
        lorakit.get_peft_model(_tiny("mamba"), lorakit.LoraConfig(target_modules="all-linear"))
    excluded = sorted(DIRECT_WEIGHT_READS["mamba"])
    config = lorakit.LoraConfig(target_modules="all-linear", exclude_modules=excluded, init_lora_weights=False)
    model = lorakit.get_peft_model(_tiny("mamba"), config)
    adapted = {n.rpartition(".")[2] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"in_proj"}
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        base = _tiny("mamba")(ids).logits
        assert not torch.allclose(model(ids).logits, base)  # the adapter it kept does act


@pytest.mark.parametrize("model_type,module", [("mamba", "dt_proj"), ("falcon_mamba", "dt_proj")])
@pytest.mark.parametrize("training", [False, True])
def test_modules_read_on_every_device_are_never_called(model_type, module, training):
    """The reason given for dt_proj holds on this CPU too: transformers never calls the module."""
    model = _tiny(model_type).train(training)
    calls = []
    for name, sub in model.named_modules():
        if name.endswith("mixer." + module):
            sub.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 5)))
    assert calls == []
    assert module in DIRECT_WEIGHT_READS[model_type]


def test_other_architectures_are_untouched():
    model = _tiny("mamba")
    model.config.model_type = "not_a_mamba"
    wrapped = lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["out_proj"]))
    assert any(n.endswith("out_proj.lora_A") for n, _ in wrapped.named_modules())


def test_wavlm_attention_projections_are_refused_and_peft_would_skip_them():
    """WavLM hands its attention weights to F.multi_head_attention_forward: peft's adapter there changes nothing."""
    from transformers import WavLMConfig, WavLMModel

    shape = dict(conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2)
    config = WavLMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, **shape)
    config.num_conv_pos_embeddings, config.num_conv_pos_embedding_groups = 4, 2
    torch.manual_seed(0)
    base = WavLMModel(config).eval()
    audio = torch.randn(1, 400)
    with torch.no_grad():
        before = base(audio).last_hidden_state
    theirs = peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        torch.testing.assert_close(theirs(audio).last_hidden_state, before)  # the adapter is a silent no-op
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"of this wavlm model: .*F\.multi_head_attention_forward"):
        lorakit.get_peft_model(WavLMModel(config), lorakit.LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert set(DIRECT_WEIGHT_READS["wavlm"]) == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert set(DIRECT_WEIGHT_READS["jamba"]) == {"dt_proj"}
