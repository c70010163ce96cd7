"""Mixed-adapter batches refuse what they cannot do, with a message that names the problem."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from mixed_cases import batch, build

import lorakit
from lorakit.routing import BatchRouting, current_routing, route_batch


@pytest.fixture()
def model():
    return build(lorakit, "llama")


def test_training_mode_is_refused(model):
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        model(**batch("llama", 2), adapter_names=["one", "two"])
    with pytest.raises(ValueError, match="eval mode"):
        model.generate(**batch("llama", 2), adapter_names=["one", "two"], max_new_tokens=2)


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_unknown_adapter_is_an_error_not_the_base_model(model, call):
    fn = model if call == "forward" else lambda **kw: model.generate(**kw, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"unknown adapters \['typo'\]; existing adapters: \['one', 'three', 'two'\]"):
        fn(**batch("llama", 2), adapter_names=["one", "typo"])
    assert current_routing() is None


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_length_mismatch(model, call):
    fn = model if call == "forward" else lambda **kw: model.generate(**kw, max_new_tokens=2)
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 2 rows"):
        fn(**batch("llama", 2), adapter_names=["one", "two", "one"])


def test_a_layer_batch_that_does_not_fit_the_routing_is_an_error():
    with pytest.raises(ValueError, match="adapter_names has 2 entries but a layer received a batch of 4 rows"):
        BatchRouting.from_names(["one", "two"]).for_batch(4)
    expanded = BatchRouting.from_names(["one", "two"], expandable=True).for_batch(6)
    assert expanded.adapter_names == ["one"] * 3 + ["two"] * 3
    with pytest.raises(ValueError, match="or a multiple of it"):
        BatchRouting.from_names(["one", "two"], expandable=True).for_batch(5)


def test_names_must_be_a_list_of_strings(model):
    with pytest.raises(TypeError, match="adapter_names must be a list"):
        model(**batch("llama", 3), adapter_names="one")


def test_merged_adapters_are_refused(model):
    model.set_adapter("one")
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"merged .*unmerge_adapter\(\)"):
        model(**batch("llama", 2), adapter_names=["one", "two"])
    model.unmerge_adapter()
    with torch.no_grad():
        model(**batch("llama", 2), adapter_names=["one", "two"])


def test_dora_adapter_is_refused_by_the_model(model):
    try:
        model.add_adapter("dora", lorakit.LoraConfig(target_modules=["q_proj"], r=2, use_dora=True))
    except ValueError as err:
        if "does not provide" not in str(err):
            raise
        model.peft_config["dora"] = lorakit.LoraConfig(target_modules=["q_proj"], r=2, use_dora=True)
    model.eval()
    with pytest.raises(ValueError, match=r"do not support DoRA adapters; got \['dora'\]"):
        model(**batch("llama", 2), adapter_names=["one", "dora"])


def test_layer_refuses_a_variant_that_cannot_be_routed(model):
    """The layer-level guard (for variants other than DoRA, and for callers of route_batch)."""
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.adapters["one"].variant = SimpleNamespace(name="somevariant")
    message = "'one' uses somevariant, which mixed-adapter batches do not support"
    with pytest.raises(ValueError, match=message), route_batch(["one", "two"]), torch.no_grad():
        model(**batch("llama", 2))
    assert current_routing() is None  # restored after the exception
