"""use_causal_sdpa: transformers' SDPA attention under another name, identical outputs with and without padding,
in forward and in generate; refuses models that do not use SDPA."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.integrations.causal_sdpa import CAUSAL_SDPA, use_causal_sdpa
from models import tiny_llama


def _pair():
    reference = tiny_llama()
    reference.set_attn_implementation("sdpa")
    model = tiny_llama()
    assert use_causal_sdpa(model) == "sdpa"
    assert model.config._attn_implementation == CAUSAL_SDPA
    return reference, model


def test_same_logits_with_and_without_padding():
    reference, model = _pair()
    ids = torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=0, rtol=0)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # left padding: the mask must be built (the function delegates to transformers')
        got = model(input_ids=ids, attention_mask=mask).logits
        want = reference(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert not torch.equal(got, model(input_ids=ids).logits)  # the padding changed something


def test_same_generation_through_a_lora_model():
    reference, model = _pair()
    config = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    reference = lorakit.get_peft_model(reference, lorakit.LoraConfig(**config))
    model = lorakit.get_peft_model(model, lorakit.LoraConfig(**config))
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(input_ids=ids, **kwargs), reference.generate(input_ids=ids, **kwargs))
    assert use_causal_sdpa(model) == CAUSAL_SDPA  # through the wrapper, and again: a no-op


def test_other_implementations_are_refused():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="'eager'; use_causal_sdpa replaces 'sdpa' only"):
        use_causal_sdpa(model)
    with pytest.raises(ValueError, match="Linear is not a transformers model"):
        use_causal_sdpa(torch.nn.Linear(2, 2))
