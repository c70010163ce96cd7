"""Mixed-batch routing is state of one call: threads, overlapping calls and exceptions never see another call's rows.

The reference of every call is the same call run alone, sequentially, before any thread starts.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from mixed_cases import batch, build

import lorakit
from lorakit.alora_offsets import activate_alora, current_alora
from lorakit.routing import _ROUTING, current_routing, route_batch
from models import output_tensor

# one routing per thread; None is an ordinary call with the active adapter ("one")
THREAD_NAMES = [
    None,
    ["two", "__base__", "one", "three"],
    ["three", "three", "two", "__base__"],
    ["one", "two", "three", "one"],
]
CALLS_PER_THREAD = 200


@pytest.fixture(scope="module")
def model_and_reference():
    model = build(lorakit, "llama")
    inputs = batch("llama", 4)
    with torch.no_grad():
        reference = [output_tensor(model(**inputs, adapter_names=names)) for names in THREAD_NAMES]
    for i in range(len(reference)):  # the routings give different outputs, so a leaked one is visible
        for j in range(i):
            assert (reference[i] - reference[j]).abs().max() > 1e-3
    return model, inputs, reference


def _call(model, inputs, names):
    with torch.no_grad():
        return output_tensor(model(**inputs, adapter_names=names))


def test_four_threads_with_different_routings_match_the_sequential_reference(model_and_reference):
    model, inputs, reference = model_and_reference
    wrong: list[tuple[int, int, float]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(THREAD_NAMES))

    def work(t: int) -> None:
        try:
            start.wait()
            for call in range(CALLS_PER_THREAD):
                out = _call(model, inputs, THREAD_NAMES[t])
                diff = (out - reference[t]).abs().max().item()
                if diff > 1e-5:
                    wrong.append((t, call, diff))
        except BaseException as err:  # reported below: an exception in a thread would otherwise pass silently
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(THREAD_NAMES))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert not wrong, f"{len(wrong)} of {len(THREAD_NAMES) * CALLS_PER_THREAD} calls were wrong, e.g. {wrong[:3]}"
    assert current_routing() is None and _ROUTING.open_scopes == 0


def test_overlapping_calls_in_two_threads_do_not_leak(model_and_reference):
    """Thread A enters its routed call and waits inside it while thread B runs a whole routed call; then A ends.
    With one process-wide slot, B restored A's routing on exit, and every later call saw it."""
    model, inputs, reference = model_and_reference
    inside, release = threading.Event(), threading.Event()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    results: dict[str, torch.Tensor] = {}

    def pause_once(module, args):
        if threading.current_thread().name == "A" and not inside.is_set():
            inside.set()
            release.wait(timeout=30)

    handle = layer.register_forward_pre_hook(pause_once)
    try:
        a = threading.Thread(target=lambda: results.update(a=_call(model, inputs, THREAD_NAMES[1])), name="A")
        a.start()
        assert inside.wait(timeout=30)
        b = threading.Thread(target=lambda: results.update(b=_call(model, inputs, THREAD_NAMES[2])), name="B")
        b.start()
        b.join()
        release.set()
        a.join()
    finally:
        handle.remove()
    torch.testing.assert_close(results["a"], reference[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(results["b"], reference[2], atol=1e-5, rtol=0)
    assert current_routing() is None and _ROUTING.open_scopes == 0
    torch.testing.assert_close(_call(model, inputs, None), reference[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(_call(model, inputs, THREAD_NAMES[3]), reference[3], atol=1e-5, rtol=0)


def test_an_exception_inside_a_routed_call_leaves_nothing_behind(model_and_reference):
    model, inputs, reference = model_and_reference
    layer = model.base_model.model.model.layers[1].mlp.down_proj

    def boom(module, args):
        assert current_routing() is not None  # the failure happens while the call is routed
        raise RuntimeError("boom inside the routed call")

    handle = layer.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom inside the routed call"):
            _call(model, inputs, THREAD_NAMES[1])
    finally:
        handle.remove()
    assert current_routing() is None and _ROUTING.open_scopes == 0
    torch.testing.assert_close(_call(model, inputs, None), reference[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(_call(model, inputs, THREAD_NAMES[2]), reference[2], atol=1e-5, rtol=0)


def test_scopes_left_out_of_order_in_one_thread_leave_nothing_behind():
    first, second = route_batch(["one"]), route_batch(["two"])
    first.__enter__()
    second.__enter__()
    assert current_routing().adapter_names == ["two"]
    first.__exit__(None, None, None)  # the outer one ends first
    assert current_routing().adapter_names == ["two"]
    second.__exit__(None, None, None)
    assert current_routing() is None and _ROUTING.open_scopes == 0


def test_unrouted_block_inside_a_routed_one_shadows_it():
    with route_batch(["one", "two"]):
        with route_batch(None):
            assert current_routing() is None
        assert current_routing().adapter_names == ["one", "two"]
    assert current_routing() is None


def test_routing_is_not_visible_to_another_thread():
    seen = []
    with route_batch(["one"]):
        thread = threading.Thread(target=lambda: seen.append(current_routing()))
        thread.start()
        thread.join()
        assert current_routing() is not None
    assert seen == [None]


def test_alora_activation_is_per_thread_and_removed_on_error():
    seen = []
    with pytest.raises(RuntimeError), activate_alora("activation-of-this-call"):
        thread = threading.Thread(target=lambda: seen.append(current_alora()))
        thread.start()
        thread.join()
        assert current_alora() == "activation-of-this-call"
        raise RuntimeError
    assert seen == [None]
    assert current_alora() is None


def test_per_call_caches_end_with_the_call(model_and_reference):
    """Kernel plans and row slots live in the routing's scratch: after the call no layer holds them (before, each
    layer kept the last call's plan, gathered factors included, and a process-wide dict kept row slots)."""
    model, inputs, reference = model_and_reference
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    seen, planned = [], []

    def look(module, args, out):
        seen.append(weakref.ref(current_routing()))
        planned.append(module in current_routing().scratch)  # the fast path planned this layer in the scratch

    handle = layer.register_forward_hook(look)
    try:
        torch.testing.assert_close(_call(model, inputs, THREAD_NAMES[1]), reference[1], atol=1e-5, rtol=0)
    finally:
        handle.remove()
    gc.collect()
    assert planned == [True]
    assert len(seen) == 1 and seen[0]() is None  # the routing, and with it its scratch, is gone
    assert not any("_lorakit_mixed" in m.__dict__ for m in model.modules())
