"""Mixed-adapter batches in generate: greedy, beam search, sampling with several return sequences, encoder-decoder.

The reference is each adapter run alone on the whole batch (row i taken from the run of adapter_names[i]); peft's
mixed generate is compared where it supports the same call."""

from __future__ import annotations

import pytest
import torch
from mixed_cases import batch, build, build_pair, names_for, run_each_adapter

import lorakit

ATOL = 1e-5
GEN = dict(max_new_tokens=6, pad_token_id=0)


def _generate(model, inputs, names=None, seed=None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    extra = {} if names is None else {"adapter_names": names}
    with torch.no_grad():
        return model.generate(**inputs, **GEN, **kwargs, **extra)


def _reference(model, inputs, names, per_row: int, **kwargs):
    """Rows of the separate runs, ``per_row`` output rows per prompt."""
    runs = run_each_adapter(model, names, lambda: _generate(model, inputs, **kwargs))
    return [runs[name][i * per_row : (i + 1) * per_row] for i, name in enumerate(names)]


def _assert_rows(mixed, reference, per_row: int):
    for i, rows in enumerate(reference):
        torch.testing.assert_close(mixed[i * per_row : (i + 1) * per_row], rows, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def llama_pair():
    return build_pair("llama")


def test_greedy_generate_rows_match_separate_runs_and_peft(llama_pair):
    ours, ref = llama_pair
    names = names_for("llama")
    inputs = batch("llama", len(names))
    kwargs = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
    out = _generate(ours, inputs, names, **kwargs)
    logits = torch.stack(out.logits, dim=1)  # (B, new tokens, vocab)
    runs = run_each_adapter(ours, names, lambda: _generate(ours, inputs, **kwargs))
    for i, name in enumerate(names):
        assert torch.equal(out.sequences[i], runs[name].sequences[i]), f"row {i} ({name})"
        torch.testing.assert_close(logits[i], torch.stack(runs[name].logits, dim=1)[i], atol=ATOL, rtol=0)
    assert torch.equal(out.sequences, _generate(ref, inputs, names, do_sample=False))
    assert len({tuple(s.tolist()) for s in out.sequences[:, 7:]}) > 1  # the rows do differ


def test_beam_search_repeats_names_per_beam(llama_pair):
    ours, ref = llama_pair
    names = names_for("llama")
    inputs = batch("llama", len(names))
    kwargs = dict(num_beams=3, num_return_sequences=2, do_sample=False)
    mixed = _generate(ours, inputs, names, **kwargs)
    _assert_rows(mixed, _reference(ours, inputs, names, 2, **kwargs), 2)
    assert torch.equal(mixed, _generate(ref, inputs, names, **kwargs))


def test_sampling_with_several_return_sequences(llama_pair):
    ours, _ = llama_pair
    names = ["two", "__base__", "one"]
    inputs = batch("llama", len(names))
    kwargs = dict(do_sample=True, num_return_sequences=3, top_k=0, seed=11)
    mixed = _generate(ours, inputs, names, **kwargs)
    assert mixed.shape[0] == 9
    _assert_rows(mixed, _reference(ours, inputs, names, 3, **kwargs), 3)


def test_mixed_generate_with_and_without_kv_cache(llama_pair):
    ours, _ = llama_pair
    names = names_for("llama")
    inputs = batch("llama", len(names))
    cached = _generate(ours, inputs, names, do_sample=False, use_cache=True)
    assert torch.equal(cached, _generate(ours, inputs, names, do_sample=False, use_cache=False))


def _tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=96, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config).eval()


def test_encoder_decoder_beam_search_routes_encoder_and_decoder_rows():
    """The encoder sees one row per prompt, the decoder one per beam: both must get the right adapter."""
    import peft

    def make(lib):
        model = lib.get_peft_model(
            _tiny_t5(), lib.LoraConfig(target_modules=["q", "v"], r=4, init_lora_weights=False), "one"
        )
        model.add_adapter("two", lib.LoraConfig(target_modules=["k", "wo"], r=2, init_lora_weights=False))
        return model.eval()

    ours, ref = make(lorakit), make(peft)
    ours.load_state_dict(ref.state_dict())
    names = ["one", "two", "__base__", "two"]
    ids = torch.randint(1, 96, (4, 6), generator=torch.Generator().manual_seed(5))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kwargs = dict(num_beams=2, do_sample=False)
    mixed = _generate(ours, inputs, names, **kwargs)
    _assert_rows(mixed, _reference(ours, inputs, names, 1, **kwargs), 1)
    assert torch.equal(mixed, _generate(ref, inputs, names, **kwargs))


def test_generate_without_adapter_names_is_the_plain_generate():
    model = build(lorakit, "llama")
    inputs = batch("llama", 2)
    model.set_adapter("two")
    plain = _generate(model, inputs, do_sample=False)
    assert torch.equal(plain, _generate(model, inputs, ["two", "two"], do_sample=False))
