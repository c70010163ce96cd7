"""The fused forward honours what transformers' causal-LM loss honours, and falls back (one warning) elsewhere."""

from __future__ import annotations

import warnings

import pytest
import torch
from loss_families import VOCAB, tiny_causal_lm
from loss_helpers import REL, assert_same_step, batch, step
from test_families import lora

from lorakit.loss import chunked_linear_cross_entropy


@pytest.fixture
def llama():
    return lora(tiny_causal_lm("LlamaForCausalLM"), lm_head=True)


@pytest.mark.parametrize("items", [int, torch.tensor])
def test_gradient_accumulation_num_items_in_batch(llama, items):
    """Two micro-batches normalised by the tokens of both: each micro-batch's loss and gradients equal the ordinary
    path's (so do their sums, the accumulated step)."""
    first, second = batch(VOCAB, seed=1, masked=5), batch(VOCAB, seed=2, masked=0)
    second["labels"][1, 4:] = -100  # padding
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in (first, second))
    for micro in (first, second):
        assert_same_step(llama, **micro, num_items_in_batch=items(total))


def test_shift_labels_kwarg(llama):
    inputs = batch(VOCAB)
    shifted = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[:, 1:].flip(1)  # any alignment
    assert_same_step(llama, **inputs, shift_labels=shifted)


def test_ignore_index_kwarg(llama):
    inputs = batch(VOCAB, masked=0)
    inputs["labels"][:, :4] = 7  # token 7 is ignored via the kwarg (the loss function's ignore_index)
    assert_same_step(llama, **inputs, ignore_index=7)


@pytest.mark.parametrize("keep", [4, "positions"])
def test_logits_to_keep(llama, keep):
    inputs = batch(VOCAB)
    if keep == "positions":
        keep = torch.tensor([0, 3, 5, 6, 11])
    count = keep if isinstance(keep, int) else keep.numel()
    inputs["labels"] = inputs["labels"][:, -count:]
    assert_same_step(llama, **inputs, logits_to_keep=keep)


def test_chunks_bound_the_logits(llama):
    """The head never sees more than chunk_size rows, and rows whose target is ignored are never projected."""
    rows = []
    head = llama.get_base_model().lm_head
    handle = head.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    inputs = batch(VOCAB, rows=2, length=12, masked=3)
    try:
        step(llama, True, **inputs, chunk_size=4)
    finally:
        handle.remove()
    valid = int((inputs["labels"][:, 1:] != -100).sum())  # 22 shifted targets, 2 masked
    assert max(rows) == 4 and sum(rows) == valid == 20


def test_eval_no_labels_and_disable_give_logits(llama):
    inputs = batch(VOCAB)
    llama.enable_fused_loss()
    assert llama(input_ids=inputs["input_ids"]).logits.shape == (2, 12, VOCAB)
    llama.eval()
    with torch.no_grad():
        evaluated = llama(**inputs)
    assert evaluated.logits is not None and evaluated.loss is not None
    llama.train()
    with torch.no_grad():  # training mode without autograd: the loss alone, equal to the full one
        fused = llama(**inputs)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, evaluated.loss, rtol=REL, atol=0)
    llama.disable_fused_loss()
    assert llama(**inputs).logits is not None


def test_positional_input_ids(llama):
    inputs = batch(VOCAB)
    llama.enable_fused_loss(chunk_size=3)
    out = llama(inputs["input_ids"], labels=inputs["labels"])
    llama.disable_fused_loss()
    ref = llama(inputs["input_ids"], labels=inputs["labels"])
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=REL, atol=0)


def test_gradient_checkpointing(llama):
    llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same_step(llama, **batch(VOCAB))


def test_moe_without_router_logits_has_no_aux_loss():
    model = lora(tiny_causal_lm("MixtralForCausalLM", output_router_logits=False))
    out, ref = assert_same_step(model, **batch(VOCAB))
    assert out.aux_loss is None and ref.aux_loss is None


def _warnings_of(model, calls: int, **inputs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [model(**inputs) for _ in range(calls)]
    return outs, [str(w.message) for w in caught if "fused loss" in str(w.message)]


def test_unknown_head_falls_back_with_one_warning():
    from transformers import LlamaForCausalLM

    class MyCausalLM(LlamaForCausalLM):
        pass

    base = tiny_causal_lm("LlamaForCausalLM")
    base.__class__ = MyCausalLM
    model = lora(base)
    model.enable_fused_loss()
    outs, caught = _warnings_of(model, 2, **batch(VOCAB))
    assert len(caught) == 1 and "MyCausalLM" in caught[0] and "LlamaForCausalLM" in caught[0]
    assert all(out.logits is not None for out in outs)


def test_custom_loss_function_falls_back():
    model = lora(tiny_causal_lm("LlamaForCausalLM"))
    base = model.get_base_model()
    base.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().square().mean()
    model.enable_fused_loss()
    (out,), caught = _warnings_of(model, 1, **batch(VOCAB))
    assert len(caught) == 1 and "ForCausalLMLoss" in caught[0]
    assert out.logits is not None
    torch.testing.assert_close(out.loss, out.logits.float().square().mean())


def test_return_dict_false_falls_back(llama):
    llama.enable_fused_loss()
    (out,), caught = _warnings_of(llama, 1, **batch(VOCAB), return_dict=False)
    assert isinstance(out, tuple) and len(caught) == 1 and "return_dict" in caught[0]


def test_mismatched_labels_name_both_lengths(llama):
    inputs = batch(VOCAB)
    llama.enable_fused_loss()
    with pytest.raises(ValueError, match="labels give 24 targets but the kept hidden states have 8 rows"):
        llama(**inputs, logits_to_keep=4)


def test_bad_chunk_size_is_named(llama):
    llama.enable_fused_loss(chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive number of tokens, got 0"):
        llama(**batch(VOCAB))


def test_matches_peft_on_the_same_weights():
    """The oracle: peft's ordinary loss and LoRA gradients on the same weights equal lorakit's fused ones."""
    import peft

    inputs = batch(VOCAB)
    theirs = peft.get_peft_model(
        tiny_causal_lm("LlamaForCausalLM"),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False),
    )
    ours = lora(tiny_causal_lm("LlamaForCausalLM"), lm_head=True)
    ours.load_state_dict(theirs.state_dict())
    ref = theirs(**inputs)
    ref.loss.backward()
    out, grads = step(ours, True, **inputs)
    torch.testing.assert_close(out.loss, ref.loss, rtol=REL, atol=0)
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert theirs_grads.keys() == grads.keys()
    for name, g in theirs_grads.items():
        assert ((grads[name] - g).norm() / g.norm()).item() <= REL, name


def test_no_grad_chunked_loss_matches_cross_entropy():
    head = torch.nn.Linear(16, 40)
    from lorakit.loss import ChunkedHead, LogitsMap

    hidden, targets = torch.randn(30, 16), torch.randint(0, 40, (30,))
    targets[::4] = -100
    plan = ChunkedHead(head, LogitsMap(softcap=0.7), rows=7)
    with torch.no_grad():
        got = chunked_linear_cross_entropy(plan, hidden, targets, (targets != -100).sum().float())
        want = torch.nn.functional.cross_entropy(0.7 * torch.tanh(head(hidden) / 0.7), targets)
    torch.testing.assert_close(got, want, rtol=REL, atol=0)


def test_forward_replaced_on_the_instance_falls_back():
    base = tiny_causal_lm("LlamaForCausalLM")
    original = base.forward
    calls = []
    base.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    model = lora(base)
    model.enable_fused_loss()
    (out,), caught = _warnings_of(model, 1, **batch(VOCAB))
    assert calls and out.logits is not None
    assert len(caught) == 1 and "replaced on the instance" in caught[0]


def test_forward_patched_on_the_class_falls_back():
    from transformers import LlamaForCausalLM

    from lorakit.loss import HEADS, register_head

    def patched(self, *args, **kwargs):
        return LlamaForCausalLM.forward(self, *args, **kwargs)

    patched.__module__ = "liger_kernel.transformers.model.llama"  # as a library's class patch would leave it
    patched_class = type("PatchedLlama", (LlamaForCausalLM,), {"forward": patched})
    base = tiny_causal_lm("LlamaForCausalLM")
    base.__class__ = patched_class
    register_head("PatchedLlama", HEADS["LlamaForCausalLM"])
    try:
        model = lora(base)
        model.enable_fused_loss()
        (out,), caught = _warnings_of(model, 1, **batch(VOCAB))
    finally:
        del HEADS["PatchedLlama"]
    assert out.logits is not None and len(caught) == 1 and "liger_kernel.transformers.model.llama" in caught[0]


def test_trl_fused_lm_head_request_runs_the_models_own_forward():
    """TRL's trainers patch the model and ask for ``fused_lm_head=True`` (per-token log-probs): passed through."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    base = tiny_causal_lm("LlamaForCausalLM")
    trl_utils.add_fused_lm_head(base)
    model = lora(base)
    model.enable_fused_loss()
    (out,), caught = _warnings_of(model, 1, **batch(VOCAB), fused_lm_head=True)
    assert not caught and out.log_probs is not None


def test_bfloat16_model():
    """A bfloat16 model: logits in bf16, upcast for the loss as the model's own; equal to bf16 rounding."""
    model = lora(tiny_causal_lm("Gemma2ForCausalLM").to(torch.bfloat16))
    inputs = batch(VOCAB)
    ref, ref_grads = step(model, False, **inputs)
    out, grads = step(model, True, **inputs)
    assert out.loss.dtype == ref.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-2, atol=0)
    for name, g in ref_grads.items():
        assert grads[name].dtype == g.dtype
        assert ((grads[name].float() - g.float()).norm() / g.float().norm()).item() <= 2e-2, name
