"""generate() of a lorakit causal LM: the KV cache changes nothing, and outputs equal peft's on the same weights."""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit
from models import tiny_gpt2, tiny_llama

BUILDERS = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "gate_proj"], r=4, init_lora_weights=False)),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], r=4, fan_in_fan_out=True, init_lora_weights=False)),
}
GEN = dict(max_new_tokens=8, pad_token_id=0, do_sample=False)


def _pair(kind: str):
    build, config = BUILDERS[kind]
    ref = peft.get_peft_model(build(), peft.LoraConfig(task_type="CAUSAL_LM", **config)).eval()
    ours = lorakit.get_peft_model(build(), lorakit.LoraConfig(task_type="CAUSAL_LM", **config)).eval()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _prompts(rows: int = 3) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 96, (rows, 5), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("beams", [1, 3])
def test_kv_cache_generation_equals_no_cache_and_peft(kind, beams):
    ours, ref = _pair(kind)
    kwargs = dict(GEN, num_beams=beams, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = ours.generate(**_prompts(), use_cache=True, **kwargs)
        uncached = ours.generate(**_prompts(), use_cache=False, **kwargs)
        theirs = ref.generate(**_prompts(), use_cache=True, **kwargs)
        with ours.disable_adapter():
            base = ours.generate(**_prompts(), **GEN)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), atol=1e-5, rtol=0)
    assert torch.equal(cached.sequences, theirs.sequences)
    assert not torch.equal(cached.sequences, base)  # the adapter is really used during generation


def test_prepare_inputs_for_generation_is_the_base_models():
    ours, _ = _pair("llama")
    prompts = _prompts()
    mine = ours.prepare_inputs_for_generation(**prompts)
    base = ours.get_base_model().prepare_inputs_for_generation(**prompts)
    assert mine.keys() == base.keys()
    for key, value in base.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(mine[key], value), key
