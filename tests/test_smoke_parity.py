"""End-to-end agreement with peft on a few configurations (the detailed suites live beside this file)."""

import peft
import pytest
import torch

import lorakit
from models import BUILDERS, make_inputs, output_tensor

CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False)),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], r=4, init_lora_weights=False)),
    ("bert", dict(task_type="SEQ_CLS", target_modules=["query", "value"], r=4, init_lora_weights=False)),
    ("conv", dict(target_modules=["conv1d", "conv2d", "grouped", "conv3d"], r=2, init_lora_weights=False)),
    ("emb", dict(target_modules=["emb", "lin"], r=3, init_lora_weights=False)),
]


@pytest.mark.parametrize(("kind", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_same_keys_counts_and_outputs_as_peft(kind, kwargs):
    ours = lorakit.get_peft_model(BUILDERS[kind](), lorakit.LoraConfig(**kwargs))
    ref = peft.get_peft_model(BUILDERS[kind](), peft.LoraConfig(**kwargs))
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    ours.load_state_dict(ref.state_dict())
    inputs = make_inputs(kind)
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(ours(**inputs)), output_tensor(ref(**inputs)), atol=1e-5, rtol=0)


def test_saved_adapter_loads_in_peft_with_same_outputs(tmp_path):
    kwargs = dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4, init_lora_weights=False)
    ours = lorakit.get_peft_model(BUILDERS["llama"](), lorakit.LoraConfig(**kwargs))
    ours.save_pretrained(tmp_path)
    ref = peft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path)
    inputs = make_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(ref(**inputs).logits, ours(**inputs).logits, atol=1e-5, rtol=0)
    back = lorakit.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, ours(**inputs).logits, atol=1e-5, rtol=0)
