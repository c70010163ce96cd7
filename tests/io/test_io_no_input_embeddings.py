"""A model whose get_input_embeddings raises NotImplementedError (Wav2Vec2ForCTC) with its ``lm_head`` targeted:
saving must not call into the missing embeddings (peft 0.21 crashes there; found by tests/sweep)."""

from __future__ import annotations

import peft
import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

import lorakit


def _tiny_ctc() -> Wav2Vec2ForCTC:
    config = Wav2Vec2Config(
        vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 4), num_feat_extract_layers=2,
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, mask_time_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return Wav2Vec2ForCTC(config).eval()


def test_adapter_with_lm_head_saves_and_loads(tmp_path):
    config = dict(target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    ours = lorakit.get_peft_model(_tiny_ctc(), lorakit.LoraConfig(**config))
    ref = peft.get_peft_model(_tiny_ctc(), peft.LoraConfig(**config))
    expected = {k: v.shape for k, v in peft.get_peft_model_state_dict(ref, save_embedding_layers=False).items()}
    assert {k: v.shape for k, v in lorakit.get_peft_model_state_dict(ours).items()} == expected
    ours.save_pretrained(tmp_path)
    loaded = lorakit.PeftModel.from_pretrained(_tiny_ctc(), tmp_path)
    x = torch.randn(2, 800)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ours(x).logits)
        assert (ours(x).logits - _tiny_ctc()(x).logits).abs().max() > 1e-4
