"""The hand-written cross-entropy and gradient against autograd's F.cross_entropy; bad labels are named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loss_families import VOCAB, tiny_causal_lm
from loss_helpers import batch
from test_families import lora

from lorakit.loss.cross_entropy import cross_entropy_sum, cross_entropy_sum_and_grad


@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: large logits, where an unstable softmax would overflow
def test_matches_autograd_cross_entropy(scale):
    logits = (torch.randn(37, 501, dtype=torch.float64) * scale).float().requires_grad_()
    targets = torch.randint(0, 501, (37,))
    want = F.cross_entropy(logits, targets, reduction="sum")
    (want_grad,) = torch.autograd.grad(want, logits)
    loss, grad = cross_entropy_sum_and_grad(logits.detach(), targets)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(cross_entropy_sum(logits.detach(), targets), want.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)


def test_label_outside_the_vocabulary_is_named():
    model = lora(tiny_causal_lm("LlamaForCausalLM"))
    inputs = batch(VOCAB)
    inputs["labels"][1, 5] = VOCAB + 3
    model.enable_fused_loss()
    with pytest.raises(ValueError, match=f"label {VOCAB + 3} is outside the vocabulary \\(0..{VOCAB - 1}\\)"):
        model(**inputs)
