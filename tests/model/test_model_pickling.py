"""A whole lorakit model pickles and deep-copies after training steps (``torch.save(model)``): the fast paths'
derived caches (weak references, per-call batches) are left out and rebuilt, the copy computes the same outputs."""

import copy
import io

import pytest
import torch

import lorakit
from models import tiny_llama


@pytest.mark.parametrize("dora", [False, True])
def test_pickle_and_deepcopy_after_training(dora):
    base = tiny_llama(0).to(torch.bfloat16)
    config = lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, use_dora=dora)
    model = lorakit.get_peft_model(base, config)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # fills the caches and the per-call batches
        model(input_ids=ids, labels=ids).loss.backward()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        for other in (loaded, copied):
            torch.testing.assert_close(other(input_ids=ids).logits, want, atol=0, rtol=0)
    for other in (loaded, copied):
        other(input_ids=ids, labels=ids).loss.backward()  # trains on, caches rebuilt
        assert all(p.grad is not None for n, p in other.named_parameters() if "lora_" in n)
