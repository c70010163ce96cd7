"""Scaled embeddings (Gemma-style ``embed_scale``): the LoRA term is scaled like the base output, as in peft."""

import peft
import torch
import torch.nn as nn

import lorakit


class ScaledEmbedding(nn.Embedding):
    def __init__(self, num: int, dim: int, embed_scale: float) -> None:
        super().__init__(num, dim)
        self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = ScaledEmbedding(40, 8, embed_scale=2.5)
        self.out = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids))


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def test_plain_lora_on_scaled_embedding_matches_peft_and_merge():
    kwargs = dict(target_modules=["emb"], r=4, init_lora_weights=False)
    ours = lorakit.get_peft_model(_net(), lorakit.LoraConfig(**kwargs))
    ref = peft.get_peft_model(_net(), peft.LoraConfig(**kwargs))
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 40, (3, 5))
    with torch.no_grad():
        expected = ref(ids)
        torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=0)
        ours.merge_adapter()
        torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=0)
