"""Arrow routing (arXiv:2405.11157) and GenKnowSub (arXiv:2505.10939): routing coefficients and logits vs peft's
create_arrow_model (with and without GKS, top_k / temperature variations, Conv1D, experts added later), exact
prototypes, the stacked delta vs a per-expert sum, GKS applied once, mixed batches, errors."""

from __future__ import annotations

import inspect
import re
import warnings

import peft
import pytest
import torch
from arrow_cases import save_adapter
from safetensors.torch import load_file

import lorakit
from lorakit.variants.arrow import ArrowVariant, arrow_delta, arrow_prototypes
from models import tiny_gpt2, tiny_llama

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
ROUTER = "arrow_router"


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """4 task adapters and 2 general adapters on tiny_llama; half saved by peft, half by lorakit."""
    root = tmp_path_factory.mktemp("arrow")
    tasks = [save_adapter(root / f"task{i}", 10 + i, library="peft" if i % 2 else "lorakit") for i in range(4)]
    general = [save_adapter(root / f"general{j}", 20 + j, library="peft" if j else "lorakit") for j in range(2)]
    extra = save_adapter(root / "task_extra", 30)
    return {"root": root, "tasks": tasks, "general": general, "extra": extra}


def _pair(tasks, general=None, model_fn=tiny_llama, **arrow):
    """(lorakit, peft) Arrow models on the same base model and adapters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.create_arrow_model(model_fn(), tasks, peft.ArrowConfig(**arrow), general_adapter_paths=general)
        ours = lorakit.create_arrow_model(
            model_fn(), tasks, lorakit.ArrowConfig(**arrow), general_adapter_paths=general
        )
    return ours, ref


def _peft_coefficients(model, ids, monkeypatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and, per layer, the (t, E) coefficients peft's router computed (its softmax output, spied on)."""
    records: dict[str, torch.Tensor] = {}
    current: dict[str, str] = {}
    hooks = [
        module.lora_arrow[ROUTER].register_forward_pre_hook(lambda m, a, name=name: current.__setitem__("layer", name))
        for name, module in model.named_modules()
        if hasattr(module, "lora_arrow")
    ]
    softmax = torch.softmax

    def spy(*args, **kwargs):
        out = softmax(*args, **kwargs)
        if inspect.currentframe().f_back.f_globals.get("__name__") == "peft.tuners.lora.arrow":
            records[current["layer"]] = out.detach().clone()
        return out

    monkeypatch.setattr(torch, "softmax", spy)
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        monkeypatch.setattr(torch, "softmax", softmax)
        for hook in hooks:
            hook.remove()
    return logits, records


def _lorakit_coefficients(model, ids, monkeypatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    records: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, lorakit.LoraLayer) and ROUTER in module.adapters:
            variant = module.adapters[ROUTER].variant
            route = variant.route

            def recording(layer, x, name=name, route=route):
                routing = route(layer, x)
                records[name] = routing.coefficients.detach().clone()
                return routing

            monkeypatch.setattr(variant, "route", recording)
    with torch.no_grad():
        return model(ids).logits, records


def _routers(model) -> list[tuple[lorakit.LoraLayer, ArrowVariant]]:
    return [
        (m, m.adapters[ROUTER].variant)
        for m in model.modules()
        if isinstance(m, lorakit.LoraLayer) and ROUTER in m.adapters
    ]


def _assert_same_routing(ours, ref, monkeypatch, ids=IDS):
    theirs_logits, theirs = _peft_coefficients(ref, ids, monkeypatch)
    our_logits, mine = _lorakit_coefficients(ours, ids, monkeypatch)
    # precondition: peft's power iteration reached the top singular vector on these adapters
    for name, module in ref.named_modules():
        if hasattr(module, "lora_arrow"):
            mine_p = ours.get_submodule(name).adapters[ROUTER].variant._prototypes
            cos = (module.lora_arrow[ROUTER].prototypes * mine_p).sum(-1).abs()
            assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5), f"peft's prototypes not converged at {name}"
    assert sorted(mine) == sorted(theirs) and len(mine) == 6
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(our_logits, theirs_logits, atol=1e-5, rtol=0)
    with torch.no_grad():
        base = ours.get_base_model()
        with ours.disable_adapter():
            assert (base(ids).logits - our_logits).abs().max() > 1e-2  # the routed experts change the output


# ---------------------------------------------------------------------- parity with peft
@pytest.mark.parametrize("use_gks", [False, True], ids=["plain", "gks"])
@pytest.mark.parametrize(("top_k", "temperature"), [(3, 1.0), (1, 1.0), (2, 0.3), (4, 2.5)])
def test_routing_and_logits_match_peft(library, monkeypatch, use_gks, top_k, temperature):
    general = library["general"] if use_gks else None
    ours, ref = _pair(library["tasks"], general, top_k=top_k, router_temperature=temperature, use_gks=use_gks)
    assert ours.active_adapters == [ROUTER] and ours.peft_config[ROUTER].arrow_config.task_adapter_names == [
        "task_0",
        "task_1",
        "task_2",
        "task_3",
    ]
    _assert_same_routing(ours, ref, monkeypatch)
    for name in ("task_0", "task_3"):  # after GKS (or not) the experts' weights are peft's
        torch.testing.assert_close(
            ours.get_submodule("base_model.model.model.layers.1.mlp.up_proj").lora_A[name].weight,
            ref.get_submodule("base_model.model.model.layers.1.mlp.up_proj").lora_A[name].weight,
        )


def test_conv1d_experts_match_peft(tmp_path, monkeypatch):
    tasks = [save_adapter(tmp_path / f"t{i}", i, targets=("c_attn", "c_fc"), model_fn=tiny_gpt2) for i in range(3)]
    ours, ref = _pair(tasks, model_fn=tiny_gpt2, top_k=2, router_temperature=0.5)
    _lorakit = _lorakit_coefficients(ours, IDS, monkeypatch)
    _peft = _peft_coefficients(ref, IDS, monkeypatch)
    assert sorted(_lorakit[1]) == sorted(_peft[1]) and len(_peft[1]) == 4
    for name in _peft[1]:
        torch.testing.assert_close(_lorakit[1][name], _peft[1][name], atol=1e-5, rtol=0)
    torch.testing.assert_close(_lorakit[0], _peft[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_gks", [False, True], ids=["plain", "gks"])
def test_expert_loaded_after_creation_is_routed_as_in_peft(library, monkeypatch, use_gks):
    general = library["general"] if use_gks else None
    ours, ref = _pair(library["tasks"][:3], general, top_k=2, use_gks=use_gks)
    with torch.no_grad():
        ours(IDS), ref(IDS)  # prototypes (and GKS) of the first three experts are done
    ours.load_adapter(library["extra"], adapter_name="late")
    ref.load_adapter(library["extra"], adapter_name="late")
    _assert_same_routing(ours, ref, monkeypatch)
    layer, variant = _routers(ours)[0]
    assert variant.experts(layer) == ["task_0", "task_1", "task_2", "late"]


def test_bf16_base_routes_in_float32_as_peft(library, monkeypatch):
    ours, ref = _pair(library["tasks"], top_k=2, model_fn=lambda: tiny_llama().to(torch.bfloat16))
    assert ours.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").lora_A["task_0"].weight.dtype == (
        torch.float32
    )
    our_logits, mine = _lorakit_coefficients(ours, IDS, monkeypatch)
    theirs_logits, theirs = _peft_coefficients(ref, IDS, monkeypatch)
    assert our_logits.dtype == torch.bfloat16 and sorted(mine) == sorted(theirs)
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(our_logits, theirs_logits, atol=0, rtol=0)


def test_saved_arrow_model_reloads_with_the_same_routing(library, tmp_path):
    ours = lorakit.create_arrow_model(
        tiny_llama(), library["tasks"], lorakit.ArrowConfig(top_k=2, router_temperature=0.5)
    )
    with torch.no_grad():
        expected = ours(IDS).logits
    ours.save_pretrained(str(tmp_path))
    again = lorakit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "task_0"), adapter_name="task_0")
    for name in ("task_1", "task_2", "task_3", ROUTER):
        again.load_adapter(str(tmp_path / name), adapter_name=name)
    again.set_adapter(ROUTER)
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, expected, atol=1e-6, rtol=0)
    layer, variant = _routers(again)[0]
    assert (variant.top_k, variant.temperature, variant.experts(layer)) == (
        2,
        0.5,
        ["task_0", "task_1", "task_2", "task_3"],
    )


# ---------------------------------------------------------------------- the math
def test_prototypes_are_the_exact_top_right_singular_vectors():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, 24, generator=g), torch.randn(5, 16, 4, generator=g)  # no spectral gap
    b[3] = 0  # B A = 0: no direction, no score
    protos = arrow_prototypes(a, b)
    vh = torch.linalg.svd(b @ a).Vh[:, 0]  # (E, in) from the dense (E, out, in) products
    cos = (protos * vh).sum(-1).abs()
    torch.testing.assert_close(cos[[0, 1, 2, 4]], torch.ones(4), atol=1e-5, rtol=0)
    assert torch.equal(protos[3], torch.zeros(24))
    b_narrow = torch.randn(5, 2, 4, generator=g)  # out < r
    cos = (arrow_prototypes(a, b_narrow) * torch.linalg.svd(b_narrow @ a).Vh[:, 0]).sum(-1).abs()
    torch.testing.assert_close(cos, torch.ones(5), atol=1e-5, rtol=0)


def test_stacked_delta_equals_the_sum_over_experts():
    g = torch.Generator().manual_seed(1)
    t, n_experts, r, d_in, d_out = 9, 4, 3, 12, 10
    x, a, b = (
        torch.randn(t, d_in, generator=g),
        torch.randn(n_experts, r, d_in, generator=g),
        torch.randn(n_experts, d_out, r, generator=g),
    )
    coeff, scales = torch.rand(t, n_experts, generator=g), torch.rand(n_experts, generator=g)
    expected = sum(coeff[:, e, None] * scales[e] * (x @ a[e].T @ b[e].T) for e in range(n_experts))
    torch.testing.assert_close(arrow_delta(x, coeff, a, b, scales), expected)


def test_gks_subtracts_the_general_mean_once(library):
    ours = lorakit.create_arrow_model(
        tiny_llama(), library["tasks"], lorakit.ArrowConfig(top_k=2, use_gks=True), library["general"]
    )
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    general = torch.stack([load_file(f"{p}/adapter_model.safetensors")[key] for p in library["general"]]).mean(0)
    task = load_file(f"{library['tasks'][2]}/adapter_model.safetensors")[key]
    layer = ours.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    torch.testing.assert_close(layer.lora_A["task_2"].weight, task)  # lazily, at the first routing (as peft)
    with torch.no_grad():
        ours(IDS)
        ours(IDS)
    torch.testing.assert_close(layer.lora_A["task_2"].weight, task - general)
    torch.testing.assert_close(
        layer.lora_A["gks_1"].weight, load_file(f"{library['general'][1]}/adapter_model.safetensors")[key]
    )


def test_prototypes_follow_changes_of_the_experts(library):
    ours = lorakit.create_arrow_model(tiny_llama(), library["tasks"], lorakit.ArrowConfig(top_k=2))
    with torch.no_grad():
        ours(IDS)
    layer, variant = _routers(ours)[0]
    before = variant._prototypes.clone()
    with torch.no_grad():
        layer.lora_A["task_1"].weight.mul_(-2.0).add_(0.5)
        ours(IDS)
    a = torch.stack([layer.lora_A[n].weight for n in variant.experts(layer)])
    b = torch.stack([layer.lora_B[n].weight for n in variant.experts(layer)])
    torch.testing.assert_close(variant._prototypes, arrow_prototypes(a, b))
    assert torch.equal(variant._prototypes[[0, 2, 3]], before[[0, 2, 3]])
    assert not torch.allclose(variant._prototypes[1].abs(), before[1].abs())


def test_mixed_batch_rows_equal_separate_runs(library):
    ours = lorakit.create_arrow_model(tiny_llama(), library["tasks"], lorakit.ArrowConfig(top_k=2)).eval()
    ids = torch.cat([IDS, IDS[:1]])
    with torch.no_grad():
        mixed = ours(ids, adapter_names=[ROUTER, "task_1", "__base__"]).logits
        routed = ours(IDS[:1]).logits
        ours.set_adapter("task_1")
        task = ours(IDS[1:2]).logits
        with ours.disable_adapter():
            base = ours(IDS[:1]).logits
    torch.testing.assert_close(mixed, torch.cat([routed, task, base]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- errors
def _has_lora(model) -> bool:
    return any(isinstance(m, lorakit.LoraLayer) for m in model.modules())


def test_empty_adapter_list_raises():
    with pytest.raises(ValueError, match="should contain at least one adapter path; got none"):
        lorakit.create_arrow_model(tiny_llama(), [], lorakit.ArrowConfig())


def test_rank_mismatch_names_the_adapter_and_leaves_the_model_as_it_was(library, tmp_path):
    other = save_adapter(tmp_path / "r8", 5, r=8, library="lorakit")
    model = tiny_llama()
    expected = rf"Adapter 'task_1' \({re.escape(other)}\) has rank 8 on model\.layers\.0\.\S+, 'task_0' .* rank 4"
    with pytest.raises(ValueError, match=expected):
        lorakit.create_arrow_model(model, [library["tasks"][0], other], lorakit.ArrowConfig(top_k=1))
    assert not _has_lora(model)


def test_general_adapter_of_another_rank_is_refused(library, tmp_path):
    other = save_adapter(tmp_path / "g8", 6, r=8)
    with pytest.raises(ValueError, match=r"Adapter 'gks_1' .* has rank 8 on .*'task_0' .* has rank 4"):
        lorakit.create_arrow_model(
            tiny_llama(),
            library["tasks"][:2],
            lorakit.ArrowConfig(top_k=1, use_gks=True),
            [library["general"][0], other],
        )


def test_target_mismatch_names_the_differing_modules(library, tmp_path):
    other = save_adapter(tmp_path / "qv", 7, targets=("q_proj", "v_proj"))
    with pytest.raises(
        ValueError,
        match=r"Adapter 'task_1' .* only in 'task_1': \[\]; only in 'task_0': \['model\.layers\.0\.mlp\.up_proj'",
    ):
        lorakit.create_arrow_model(tiny_llama(), [library["tasks"][0], other], lorakit.ArrowConfig(top_k=1))


def test_non_linear_targets_are_refused(tmp_path):
    emb = save_adapter(tmp_path / "emb", 8, targets=("embed_tokens", "q_proj"))
    with pytest.raises(
        ValueError, match=r"Adapter 'task_0' .* targets non-Linear modules \{'model\.embed_tokens': 'embedding'\}"
    ):
        lorakit.create_arrow_model(tiny_llama(), [emb], lorakit.ArrowConfig(top_k=1))


def test_merging_the_router_raises_and_changes_nothing(library):
    ours = lorakit.create_arrow_model(tiny_llama(), library["tasks"], lorakit.ArrowConfig(top_k=2))
    weight = ours.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").weight.clone()
    with pytest.raises(ValueError, match="Arrow router 'arrow_router' cannot be merged"):
        ours.merge_and_unload()
    with pytest.raises(ValueError, match="Arrow router 'arrow_router' cannot be merged"):
        ours.merge_adapter()
    assert torch.equal(ours.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").weight, weight)
    assert _has_lora(ours)


def test_gks_without_general_adapters_raises(library):
    with pytest.raises(ValueError, match=r"use_gks=True \(GenKnowSub\) needs general adapters"):
        lorakit.create_arrow_model(tiny_llama(), library["tasks"], lorakit.ArrowConfig(use_gks=True))


def test_general_adapters_without_gks_warn_and_are_not_loaded(library):
    with pytest.warns(UserWarning, match=r"general_adapter_paths \(2 given\) are only used with use_gks=True"):
        ours = lorakit.create_arrow_model(tiny_llama(), library["tasks"], lorakit.ArrowConfig(), library["general"])
    assert sorted(ours.peft_config) == [ROUTER, "task_0", "task_1", "task_2", "task_3"]


def test_top_k_above_the_expert_count_raises(library):
    with pytest.raises(ValueError, match=r"top_k=3 exceeds the number of task adapters \(2\)"):
        lorakit.create_arrow_model(tiny_llama(), library["tasks"][:2], lorakit.ArrowConfig(top_k=3))
    ours = lorakit.create_arrow_model(tiny_llama(), library["tasks"][:2], lorakit.ArrowConfig(top_k=2))
    ours.delete_adapter("task_1")
    with pytest.raises(ValueError, match=r"top_k=2 experts, but the layer .* has only 1: \['task_0'\]"):
        ours(IDS)


def test_folder_without_adapter_config_raises(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"has no adapter_config\.json; found: \['notes\.txt'\]"):
        lorakit.create_arrow_model(tiny_llama(), [str(tmp_path)], lorakit.ArrowConfig(top_k=1))
