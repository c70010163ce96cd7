"""``lorakit.integrations.packed_sdpa``: a packed row's sequences attended one by one equal each sequence alone and
transformers' block-masked SDPA; every other call is transformers' SDPA unchanged."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit.integrations.packed_sdpa as packed_sdpa
from lorakit.integrations.packed_sdpa import PACKED_SDPA, sequence_starts, use_packed_sdpa

LENGTHS = (17, 1, 40, 9)


def _model(attn="sdpa", **extra):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn, **extra)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _packed(lengths=LENGTHS):
    generator = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 64, (n,), generator=generator) for n in lengths]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return seqs, torch.cat(seqs)[None], positions


@pytest.fixture
def counted(monkeypatch):
    """How many attention calls took the per-sequence path."""
    taken = []
    original = packed_sdpa._packed_starts

    def spy(*args):
        starts = original(*args)
        taken.append(starts is not None)
        return starts

    monkeypatch.setattr(packed_sdpa, "_packed_starts", spy)
    return taken


def test_sequence_starts_follow_transformers_rule():
    from transformers.masking_utils import find_packed_sequence_indices

    positions = torch.tensor([0, 1, 2, 0, 0, 1, 5, 6, 0])
    starts = sequence_starts(positions)
    assert starts == [0, 3, 4, 6, 8]
    segments = find_packed_sequence_indices(positions[None])[0]
    assert [i for i in range(len(positions)) if i == 0 or segments[i] != segments[i - 1]] == starts


@torch.no_grad()
def test_packed_row_equals_each_sequence_alone_and_the_block_mask(counted):
    model = _model()
    seqs, ids, positions = _packed()
    masked = model(input_ids=ids, position_ids=positions, use_cache=False).logits  # transformers' block mask
    alone = torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in seqs])
    assert use_packed_sdpa(model) == "sdpa" and model.config._attn_implementation == PACKED_SDPA
    ours = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
    assert counted == [True, True]  # both layers attended per sequence
    torch.testing.assert_close(ours, alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, masked[0], rtol=1e-5, atol=1e-5)
    # the same row read as one sequence differs by far more: the comparison can tell leaking attention apart
    leaked = model(input_ids=ids, use_cache=False).logits[0]
    assert (leaked - alone).abs().max() > 1e-2


def test_gradients_equal_transformers_sdpa():
    _, ids, positions = _packed()
    grads = []
    for switch in (False, True):
        model = _model().train()
        if switch:
            use_packed_sdpa(model)
        model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_other_calls_run_transformers_sdpa_unchanged(counted):
    reference, model = _model(), _model()
    use_packed_sdpa(model)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    for call in ({"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[:1]}):  # padding; one sequence
        torch.testing.assert_close(model(**call).logits, reference(**call).logits, rtol=0, atol=0)
    out = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)  # KV cache
    assert torch.equal(out, reference.generate(ids[:1, :5], max_new_tokens=4, do_sample=False))
    assert not any(counted)


def test_only_sdpa_models_are_switched():
    model = _model("eager")
    assert use_packed_sdpa(model) is None and model.config._attn_implementation == "eager"
