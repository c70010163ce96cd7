"""On CUDA with liger-kernel installed, Liger's fused linear cross-entropy and lorakit's chunked one agree."""

from __future__ import annotations

import pytest
import torch
from loss_families import VOCAB, tiny_causal_lm
from loss_helpers import batch
from test_families import lora

from lorakit.loss.liger import liger_applies, liger_available

pytestmark = pytest.mark.skipif(not liger_available(), reason="needs CUDA and liger-kernel")


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "Gemma2ForCausalLM", "CohereForCausalLM", "GraniteForCausalLM"])
def test_liger_matches_chunked(name):
    model = lora(tiny_causal_lm(name)).cuda()
    inputs = {k: v.cuda() for k, v in batch(VOCAB, rows=4, length=32).items()}
    assert liger_applies(model.get_base_model().get_output_embeddings(), torch.zeros(1, device="cuda"))
    results = []
    for use_liger in (True, False):
        model.zero_grad(set_to_none=True)
        model.enable_fused_loss(chunk_size=16, use_liger=use_liger)
        out = model(**inputs)
        out.loss.backward()
        results.append((out.loss.detach(), _grads(model)))
    (liger_loss, liger_grads), (loss, grads) = results
    torch.testing.assert_close(liger_loss, loss, rtol=1e-5, atol=0)
    for n, g in grads.items():
        assert ((liger_grads[n] - g).norm() / g.norm()).item() <= 1e-4, n
