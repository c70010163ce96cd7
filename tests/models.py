"""Tiny models built from configs with fixed seeds, shared by the test suite."""

from __future__ import annotations

import torch
import torch.nn as nn


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_cls(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 16, bias=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.lin1(self.relu(self.lin0(x)))))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(3, 6, 3, padding=1)
        self.conv2d = nn.Conv2d(6, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3d = nn.Conv3d(8, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, 3, L*L)
        n = x.shape[0]
        h = self.conv1d(x).reshape(n, 6, 4, 4)
        h = self.grouped(torch.relu(self.conv2d(h)))
        h = self.conv3d(h.unsqueeze(2)).mean(dim=(2, 3, 4))
        return self.head(h)


class EmbedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 12, padding_idx=0)
        self.lin = nn.Linear(12, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(ids)).mean(1)


def make_inputs(kind: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind in ("llama", "gpt2", "bert"):
        ids = torch.randint(1, 96, (2, 7), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "mlp":
        return {"x": torch.randn(4, 10, generator=g)}
    if kind == "conv":
        return {"x": torch.randn(2, 3, 16, generator=g)}
    if kind == "emb":
        return {"ids": torch.randint(0, 50, (3, 6), generator=g)}
    raise KeyError(kind)


BUILDERS = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert_cls,
    "mlp": lambda seed=0: (torch.manual_seed(seed), MLP())[1].eval(),
    "conv": lambda seed=0: (torch.manual_seed(seed), ConvNet())[1].eval(),
    "emb": lambda seed=0: (torch.manual_seed(seed), EmbedNet())[1].eval(),
}


def output_tensor(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out
