"""OLoRA's leading-block QR: the thin QR of W's first r columns equals the full QR's leading blocks.

Not bit-identical (the trailing rows of R come from a GEMM instead of applying the reflectors), so compared to 1e-5;
a flipped column of Q (row of R) would fail. The fp32 B @ A / residual comparison with peft on the tiny models is
``test_init_svd.py::test_same_split_as_peft`` (1e-5, unchanged by the leading-block QR).
"""

import peft
import pytest
import torch

import lorakit
from lorakit.init.olora import leading_qr


@pytest.mark.parametrize(
    ("out", "inp", "rank"), [(48, 80, 8), (80, 48, 8), (64, 64, 64), (40, 96, 40), (96, 40, 40), (33, 17, 1)]
)
def test_leading_qr_equals_the_full_qr_blocks(out, inp, rank):
    weight = torch.randn(out, inp, generator=torch.Generator().manual_seed(out * inp + rank))
    q, r = torch.linalg.qr(weight)
    q_r, r_r = leading_qr(weight, rank)
    assert q_r.shape == (out, rank) and r_r.shape == (rank, inp)
    torch.testing.assert_close(q_r, q[:, :rank], atol=1e-5, rtol=0)
    torch.testing.assert_close(r_r, r[:rank], atol=1e-5, rtol=0)
    assert torch.count_nonzero(r_r.tril(-1)) == 0


def test_olora_matches_peft_on_a_bf16_stored_model():
    """bf16 base weight (the GPU benchmark's dtype): same factors and residual as peft's full QR.

    peft rounds the fp32 factors through the base dtype when it moves the adapter (they come back as fp32 holding
    bf16 values); ours keep full fp32 precision (this predates the leading-block QR). So the factors are compared
    after rounding ours to bf16, to one bf16 ulp."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=96, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64,
    )  # fmt: skip

    def build():
        torch.manual_seed(3)
        return LlamaForCausalLM(config).to(torch.bfloat16)

    kwargs = dict(target_modules=["q_proj", "k_proj", "down_proj"], r=8, lora_alpha=16, init_lora_weights="olora")
    ours = lorakit.get_peft_model(build(), lorakit.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**kwargs))
    # the residual is stored in bf16: a 1e-5 difference in fp32 may flip its last bit (one bf16 ulp ~ 2^-8 relative)
    for (name, mine), (_, ref) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        if "base_layer" in name:
            torch.testing.assert_close(mine.float(), ref.float(), atol=1e-5, rtol=2**-7, msg=name)
        elif ".lora_" in name:
            torch.testing.assert_close(mine.bfloat16().float(), ref, atol=1e-5, rtol=2**-7, msg=name)
