"""aLoRA (arXiv:2504.12397): offsets of the last invocation per row, base outputs before it, parity with peft's aLoRA
(forward, greedy and sampled generate, mixed batches), checkpoints both ways, base KV-cache reuse, errors."""

from __future__ import annotations

import re
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.variants import calculate_alora_offsets
from transformers.modeling_outputs import CausalLMOutputWithPast

import lorakit
from lorakit.alora_offsets import compute_activation, invocation_offsets
from models import ConvNet, EmbedNet, tiny_llama

INVOKE = [5, 6]
CONFIG = dict(
    target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
    r=4,
    lora_alpha=8,
    alora_invocation_tokens=INVOKE,
    task_type="CAUSAL_LM",
    init_lora_weights=False,
)
# row 0: invocation at 3; row 1: two occurrences, the last at 4; row 2: none
IDS = torch.tensor([[1, 2, 3, 5, 6, 7, 8, 9], [1, 5, 6, 2, 5, 6, 3, 4], [1, 2, 3, 4, 7, 8, 9, 10]])
STARTS = [3, 4, None]


def _pair(**extra):
    """(lorakit, peft) aLoRA models on the same tiny llama with identical (non-zero) weights, eval mode."""
    ref = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**CONFIG, **extra)).eval()
    ours = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(**CONFIG, **extra)).eval()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------------- offsets
def test_offsets_of_the_facts_examples():
    assert invocation_offsets(torch.tensor([[0, 1, 2, 3], [0, 4, 5, 6]]), [1, 2]) == [3, None]
    assert invocation_offsets(torch.tensor([[1, 2, 1, 2]]), [1, 2]) == [2]
    assert invocation_offsets(torch.tensor([1, 2, 9]), [1, 2]) == [3]  # a 1-D sequence is one row
    assert invocation_offsets(torch.tensor([[1]]), [1, 2]) == [None]  # shorter than the invocation


@pytest.mark.parametrize("seed", range(4))
def test_offsets_equal_peft_on_random_rows(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (6, 12), generator=g)  # small vocabulary: many and overlapping occurrences
    invocation = torch.randint(0, 4, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
    config = peft.LoraConfig(alora_invocation_tokens=invocation, task_type="CAUSAL_LM")
    assert invocation_offsets(ids, invocation) == calculate_alora_offsets({"a": config}, "a", ids)


def test_offsets_follow_adapter_names():
    ours, _ = _pair()
    ours.add_adapter("plain", lorakit.LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    activation = compute_activation(ours, IDS, ["default", "__base__", "plain"])
    assert activation.offsets["default"].tolist() == [5, 0, 0]  # __base__ and plain rows get none
    assert list(activation.offsets) == ["default"]


# ---------------------------------------------------------------------- semantics and parity
def test_outputs_equal_base_before_the_invocation_and_differ_after():
    ours, _ = _pair()
    adapted, base = _logits(ours, input_ids=IDS), _logits(tiny_llama(), input_ids=IDS)
    for row, start in enumerate(STARTS):
        end = IDS.shape[1] if start is None else start
        torch.testing.assert_close(adapted[row, :end], base[row, :end], atol=1e-6, rtol=0)
        if start is not None:
            assert (adapted[row, start:] - base[row, start:]).abs().amax(-1).min() > 1e-3


def test_forward_matches_peft():
    ours, ref = _pair()
    torch.testing.assert_close(_logits(ours, input_ids=IDS), _logits(ref, input_ids=IDS), atol=1e-5, rtol=0)


def test_mixed_batch_matches_peft():
    ours, ref = _pair()
    plain = dict(target_modules=["q_proj", "v_proj"], r=2, task_type="CAUSAL_LM", init_lora_weights=False)
    ref.add_adapter("plain", peft.LoraConfig(**plain))
    ours.add_adapter("plain", lorakit.LoraConfig(**plain))
    ours.load_state_dict(ref.state_dict())
    ids = torch.cat([IDS, IDS[:1]])
    names = ["default", "plain", "default", "__base__"]
    got, expected = _logits(ours, input_ids=ids, adapter_names=names), _logits(ref, input_ids=ids, adapter_names=names)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    base = _logits(tiny_llama(), input_ids=ids)
    torch.testing.assert_close(got[3], base[3], atol=1e-6, rtol=0)  # same tokens as row 0, base adapter
    assert not torch.allclose(got[0], base[0], atol=1e-3)


def _generate(model, ids: torch.Tensor, **kwargs):
    torch.manual_seed(0)
    kwargs.update(max_new_tokens=6, output_scores=True, return_dict_in_generate=True)
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)


def _assert_same_generation(got, expected) -> None:
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(expected.scores), atol=1e-5, rtol=0)


def test_greedy_generate_matches_peft():
    ours, ref = _pair()
    _assert_same_generation(_generate(ours, IDS, do_sample=False), _generate(ref, IDS, do_sample=False))


@pytest.mark.parametrize("mixed", [False, True], ids=["active", "adapter_names"])
def test_sampled_generate_with_several_return_sequences(mixed):
    """Rows repeated per return sequence repeat their offsets (and adapter names): the same as peft on prompts
    repeated by hand (peft's own num_return_sequences fails on aLoRA with a mask/batch size mismatch)."""
    ours, ref = _pair()
    kwargs, ref_kwargs = {}, {}
    if mixed:
        plain = dict(target_modules=["q_proj", "v_proj"], r=2, task_type="CAUSAL_LM", init_lora_weights=False)
        ref.add_adapter("plain", peft.LoraConfig(**plain))
        ours.add_adapter("plain", lorakit.LoraConfig(**plain))
        ours.load_state_dict(ref.state_dict())
        kwargs["adapter_names"] = ["default", "plain", "__base__"]
        ref_kwargs["adapter_names"] = [n for n in kwargs["adapter_names"] for _ in range(2)]
    got = _generate(ours, IDS, do_sample=True, top_k=0, num_return_sequences=2, **kwargs)
    expected = _generate(ref, IDS.repeat_interleave(2, dim=0), do_sample=True, top_k=0, **ref_kwargs)
    _assert_same_generation(got, expected)


def test_generate_without_cache_adapts_the_same_tokens():
    """Without a KV cache every step re-reads the sequence; the invocation has not moved, so the result equals the
    cached generation (the offset grows with each generated token)."""
    ours, _ = _pair()
    kwargs = dict(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=5, do_sample=False)
    kwargs.update(output_scores=True, return_dict_in_generate=True)
    cached, uncached = ours.generate(**kwargs, use_cache=True), ours.generate(**kwargs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), atol=1e-5, rtol=0)


_CACHE_FIELD = next(
    name for name in ("cache", "past_key_values") if name in CausalLMOutputWithPast.__dataclass_fields__
)


def test_base_model_kv_cache_of_the_prefix_is_reusable():
    """Base model on the prefix (before any invocation), then the aLoRA model on the rest with that cache: the same
    logits as the aLoRA model on the whole sequence."""
    ours, _ = _pair()
    ids = IDS[:2]
    prefix, rest = ids[:, :3], ids[:, 3:]  # both rows invoke at or after position 3
    field = _CACHE_FIELD  # transformers >= 5.2x calls the cache ``cache``; before, ``past_key_values``
    with torch.no_grad():
        cache = getattr(tiny_llama()(input_ids=prefix, use_cache=True), field)  # a separate base model (same weights)
        resumed = ours(input_ids=rest, use_cache=True, **{field: cache}).logits
    full = _logits(ours, input_ids=ids)
    torch.testing.assert_close(resumed, full[:, 3:], atol=1e-5, rtol=0)


def test_training_gradients_come_only_from_activated_tokens():
    ours, _ = _pair()
    ours.train()
    logits = ours(input_ids=IDS).logits
    logits[0, :3].sum().backward()  # row 0 before its invocation: the adapter played no part
    grads = [p.grad for n, p in ours.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
    ours.zero_grad()
    ours(input_ids=IDS).logits[0, 3:].sum().backward()
    assert any(torch.count_nonzero(p.grad) for n, p in ours.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_the_offsets(reentrant):
    """Checkpointed blocks recompute their forward in backward, after PeftModel.forward returned."""
    plain, _ = _pair()
    checkpointed, _ = _pair()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    for model in (plain, checkpointed):
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
    checkpointed_grads = dict(checkpointed.named_parameters())
    for name, param in plain.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(checkpointed_grads[name].grad, param.grad, atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------- checkpoints
def test_checkpoints_load_both_ways_with_peft(tmp_path):
    ours, ref = _pair()
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    from_ours = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    from_ref = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ref").eval()
    assert from_ours.peft_config["default"].alora_invocation_tokens == INVOKE
    assert from_ref.peft_config["default"].alora_invocation_tokens == INVOKE
    expected = _logits(ref, input_ids=IDS)
    torch.testing.assert_close(_logits(from_ours, input_ids=IDS), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(from_ref, input_ids=IDS), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- errors and warnings
def test_beam_search_is_refused():
    ours, _ = _pair()
    with pytest.raises(ValueError, match="Beam search is not supported with aLoRA adapters"):
        ours.generate(input_ids=IDS, max_new_tokens=2, num_beams=2)


def test_merging_is_refused_and_changes_nothing():
    ours, _ = _pair()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="aLoRA adapter 'default' cannot be merged"):
        ours.merge_adapter()
    with pytest.raises(ValueError, match="cannot be merged"):
        ours.merge_and_unload()
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


def test_inputs_embeds_alone_warn_and_adapt_nothing():
    ours, _ = _pair()
    base = tiny_llama()
    embeds = base.get_input_embeddings()(IDS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _logits(ours, inputs_embeds=embeds)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages  # said once, not again by every layer
    assert re.search(r"need input_ids .* got only inputs_embeds, so they adapt no token", messages[0])
    torch.testing.assert_close(got, _logits(base, inputs_embeds=embeds), atol=1e-6, rtol=0)


def test_calls_that_bypass_peft_model_warn_and_adapt_nothing():
    ours, _ = _pair()
    with pytest.warns(UserWarning, match="aLoRA adapter 'default' got no invocation offsets: the model was called"):
        got = _logits(ours.get_base_model(), input_ids=IDS)
    torch.testing.assert_close(got, _logits(tiny_llama(), input_ids=IDS), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("build", "targets", "message"),
    [
        (EmbedNet, ["emb"], r"supports only Linear / Conv1D layers; Embedding Embedding is of kind 'embedding'"),
        (ConvNet, ["conv2d"], r"supports only Linear / Conv1D layers; Conv Conv2d is of kind 'conv'"),
    ],
)
def test_non_linear_layers_are_refused(build, targets, message):
    config = lorakit.LoraConfig(target_modules=targets, alora_invocation_tokens=[1])
    with pytest.raises(ValueError, match=message):
        lorakit.get_peft_model(build(), config)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (dict(use_dora=True), r"asks for the variants \['alora', 'dora'\], which cannot be combined"),
        (dict(alora_invocation_tokens=[]), r"must be a non-empty list of token ids \(int\), got \[\]"),
    ],
)
def test_bad_configs_are_refused(extra, message):
    config = lorakit.LoraConfig(**{**CONFIG, **extra})
    with pytest.raises(ValueError, match=message):
        lorakit.get_peft_model(tiny_llama(), config)
