"""lorakit against peft 0.21 on many transformers architectures built tiny from their configs.

For every architecture of ``architectures.ARCHITECTURES`` and every config of ``CONFIGS`` (LoRA and DoRA on
'all-linear', LoRA on the per-model defaults): the same modules wrapped, trainable count, saved keys and shapes;
once peft's weights are copied into lorakit, the same outputs and LoRA gradients (float32, train and eval); files
load both ways; merged == unmerged; greedy generate (generative tasks); a mixed-adapter batch == its rows one by one.

``KNOWN`` is the one list of expected differences, each with its reason: documented, deliberate differences
(docs/features.md) are checked as the relation they state; lorakit bugs and peft defects that make a check fail
are ``xfail(strict=True)``, so they show once fixed. ``FAST`` architectures run by default; the rest carry the
``sweep`` mark (``make sweep`` runs everything; docs/sweep.md has the last result).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import peft
import pytest
import torch
from architectures import ARCHITECTURES, FAST, GENERATIVE, TASK_TYPES, Arch, build, first_output, inputs

import lorakit
from lorakit.layers.param_wrapper import ParamWrapper

CONFIGS = {
    "lora": dict(target_modules="all-linear", r=4, lora_alpha=8, init_lora_weights=False),
    "dora": dict(target_modules="all-linear", r=4, lora_alpha=8, init_lora_weights=False, use_dora=True),
    "default": dict(r=4, lora_alpha=8, init_lora_weights=False),
}
ATOL = RTOL = 1e-4
TOKEN_CLS_IDS = tuple(a.id for a in ARCHITECTURES if a.task == "token_cls")


@dataclass(frozen=True)
class Known:
    """An expected difference. ``kind``: 'difference' (deliberate, documented; the test checks the relation it
    states), 'workaround' (a peft defect the sweep steps around, named in the reason; the comparison still runs),
    'peft' (a peft defect that fails the check: xfail), 'lorakit' (a lorakit bug, reported: xfail)."""

    kind: str
    reason: str
    relation: str = ""
    """For a difference: 'dense_mlps' (lorakit wraps peft's modules and also dense gate/up/down_proj MLPs),
    'lorakit_adapts' (peft raises, lorakit wraps), 'lorakit_refuses' (peft wraps, lorakit raises ValueError)."""


_DENSE_MLP = (
    "deliberate difference (docs/features.md, MoE row): peft reads every gate_proj/up_proj/down_proj as a "
    "transformers-4 expert name and drops the dense MLPs (first dense layers, shared experts) from all-linear; "
    "lorakit keeps them. Checked: peft's modules are a subset of lorakit's and the extras are those MLPs."
)
_MOE_NONE = (
    "deliberate difference (docs/features.md, MoE row): with target_modules=None peft's MoE rewrite empties the "
    "targets before its defaults apply (NoMatchingPeftModuleError); lorakit keeps its defaults (q_proj, v_proj)."
)
_EXTRA_DEFAULTS = (
    "deliberate difference (docs/features.md, default targets): lorakit has default target_modules for this "
    "model type, peft has none and raises 'Please specify target_modules'."
)

_TOKEN_CLS = (
    "deliberate difference (docs/features.md, modules_to_save row): TOKEN_CLS adds 'classifier' to modules_to_save "
    "and all-linear also names it; peft wraps it with LoRA first and then raises TypeError ('modules_to_save cannot "
    "be applied to modules of type lora.Linear'); lorakit leaves a module saved in full out of the LoRA targets."
)
_CTC_EMBEDDINGS = (
    "peft defect, stepped around: all-linear targets the CTC head 'lm_head', so peft's save_embedding_layers='auto' "
    "calls get_input_embeddings, which Wav2Vec2-type models do not implement (NotImplementedError on every save); "
    "the sweep passes save_embedding_layers=False to peft (lorakit saves without it: tests/io/"
    "test_io_no_input_embeddings.py)."
)
_WHISPER_TASK = (
    "peft defect, stepped around: PeftModelForSeq2SeqLM.forward passes input_ids=None to the model, whisper's "
    "decoder then gets input_ids twice (TypeError); the sweep runs whisper without task_type."
)
_DOT_BOUNDED = (
    "deliberate difference (docs/features.md, modules_to_save row): SEQ_CLS adds 'classifier' to modules_to_save; "
    "peft matches it with a plain endswith, so distilbert's 'pre_classifier' (already a LoRA layer from "
    "all-linear) is also taken and peft raises TypeError; lorakit's matching is dot-bounded."
)
_MAMBA2_REFUSED = (
    "deliberate difference (docs/features.md, Mamba-type row; issue 15 item 4): lorakit refuses out_proj/conv1d "
    "of bamba (the mamba2 kernel path hands out_proj.weight to a fused kernel on CUDA); peft wraps them."
)
_PHIMOE_ROUTER = (
    "lorakit bug (as peft): PhimoeTopKRouter subclasses nn.Linear but returns a tuple, all-linear wraps it and the "
    "LoRA forward fails (AttributeError: 'tuple' object has no attribute 'dtype'); both libraries crash. Reported "
    "(layers/linear.py should refuse a base layer whose output is not a tensor, naming it, or all-linear skip it)."
)
_WAVLM_MHA = (
    "deliberate difference (docs/features.md, modules read by weight): WavLM's attention hands q_proj/k_proj/"
    "v_proj/out_proj weights to F.multi_head_attention_forward (modeling_wavlm.py), never calling the modules, so "
    "an unmerged LoRA there is a silent no-op (peft wraps them); lorakit refuses them, naming the reason."
)
_DT_PROJ = (
    "deliberate difference (docs/features.md, modules read by weight): jamba's mamba mixer reads dt_proj.weight "
    "directly (`self.dt_proj.weight @ time_step`) unless the model is quantised, so an unmerged LoRA on dt_proj is "
    "a silent no-op (peft wraps it); lorakit refuses it, naming the reason."
)

KNOWN: dict[tuple[str, str, str], Known] = {
    # (model_type or "<model_type>-<task>", config, check); "*" matches any config or check
    **{
        (t, "lora", "wrapped"): Known("difference", _DENSE_MLP, "dense_mlps")
        for t in ("deepseek_v3", "glm4_moe", "ernie4_5_moe", "qwen3_next")
    },
    **{(t, "default", "wrapped"): Known("difference", _MOE_NONE, "lorakit_adapts") for t in ("mixtral", "qwen3_moe")},
    **{
        (t, "default", "wrapped"): Known("difference", _EXTRA_DEFAULTS, "lorakit_adapts")
        for t in ("cohere", "distilbert", "granite", "mbart", "olmo", "olmo2", "phi3", "qwen2_moe", "starcoder2")
    },
    **{
        (a, c, "wrapped"): Known("difference", _TOKEN_CLS, "lorakit_adapts")
        for a in TOKEN_CLS_IDS
        for c in ("lora", "dora")
    },
    **{
        ("distilbert-seq_cls", c, "wrapped"): Known("difference", _DOT_BOUNDED, "lorakit_adapts")
        for c in ("lora", "dora")
    },
    **{("bamba", c, "wrapped"): Known("difference", _MAMBA2_REFUSED, "lorakit_refuses") for c in ("lora", "dora")},
    **{
        ("phimoe", c, check): Known("lorakit", _PHIMOE_ROUTER)
        for c in ("lora", "dora")
        for check in ("forward", "files", "merge")
    },
    ("phimoe", "lora", "generate"): Known("lorakit", _PHIMOE_ROUTER),
    **{("wavlm", c, "wrapped"): Known("difference", _WAVLM_MHA, "lorakit_refuses") for c in ("lora", "dora")},
    **{(t, "*", "*"): Known("workaround", _CTC_EMBEDDINGS) for t in ("wav2vec2", "hubert")},
    ("whisper", "*", "*"): Known("workaround", _WHISPER_TASK),
    **{("jamba", c, "wrapped"): Known("difference", _DT_PROJ, "lorakit_refuses") for c in ("lora", "dora")},
}


def _relation(arch: Arch, config: str) -> str:
    entry = known(arch, config, "wrapped")
    return entry.relation if entry is not None and entry.kind == "difference" else ""


def known(arch: Arch, config: str, check: str) -> Known | None:
    for name in (arch.id, arch.model_type):  # an entry for "<model_type>-<task>" or for every task
        for key in ((name, config, check), (name, "*", check), (name, config, "*"), (name, "*", "*")):
            if key in KNOWN:
                return KNOWN[key]
    return None


def _params(checks_configs: list[tuple[str, str]], only=None) -> list:
    """pytest params over (arch, config) with the sweep mark and xfails of KNOWN (kinds 'peft' and 'lorakit')."""
    out = []
    for arch in ARCHITECTURES:
        if only is not None and not only(arch):
            continue
        for check, config in checks_configs:
            marks = [] if arch.id in FAST else [pytest.mark.sweep]
            entry = known(arch, config, check)
            if entry is not None and entry.kind in ("peft", "lorakit"):
                marks.append(pytest.mark.xfail(reason=f"{entry.kind}: {entry.reason}", strict=True))
            out.append(pytest.param(arch, config, id=f"{arch.id}-{config}", marks=marks))
    return out


# ---------------------------------------------------------------------------------------------------- helpers
def make(lib, arch: Arch, config: str, seed: int = 0, **extra):
    base = build(arch, seed)
    kwargs = {**CONFIGS[config], **extra}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.get_peft_model(base, lib.LoraConfig(task_type=TASK_TYPES.get(arch.task), **kwargs))


def adapter_state(model, lib) -> dict[str, torch.Tensor]:
    """The adapter's saved tensors; peft without its save_embedding_layers='auto' probe (see _CTC_EMBEDDINGS)."""
    if lib is peft:
        return peft.get_peft_model_state_dict(model, save_embedding_layers=False)
    return lorakit.get_peft_model_state_dict(model)


def _saved(model, lib) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in adapter_state(model, lib).items()}


def _wrapped(model, layer_type: type) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, layer_type)}


def pair(arch: Arch, config: str):
    """(peft model, lorakit model) with peft's adapter weights copied into lorakit; adapters that lorakit adds by
    a documented difference get B = 0, so the numbers must agree. Skips when peft cannot build the config."""
    try:
        ref = make(peft, arch, config)
    except (ValueError, TypeError) as error:
        pytest.skip(f"peft refuses this config ({type(error).__name__}); test_wrapped checks lorakit's answer")
    if _relation(arch, config) == "lorakit_refuses":
        pytest.skip("lorakit refuses this config by a documented difference (test_wrapped checks it)")
    ours = make(lorakit, arch, config)
    ref_sd = adapter_state(ref, peft)
    lorakit.set_peft_model_state_dict(ours, ref_sd)
    extra = set(lorakit.get_peft_model_state_dict(ours)) - set(ref_sd)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name.replace(".default", "") in extra and ".lora_B." in name:
                param.zero_()
    return ref, ours


def lorakit_or_skip(arch: Arch, config: str):
    """lorakit's model; where lorakit refuses the config, peft must refuse it too (then the test skips)."""
    if _relation(arch, config) == "lorakit_refuses":
        pytest.skip("lorakit refuses this config by a documented difference (test_wrapped checks it)")
    try:
        return make(lorakit, arch, config)
    except ValueError:
        with pytest.raises(Exception):  # noqa: B017 - the same refusal, whatever peft's exception class
            make(peft, arch, config)
        pytest.skip("lorakit and peft both refuse this config")


def run(model, batch: dict, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return first_output(model(**batch))


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize(("arch", "config"), _params([("wrapped", c) for c in CONFIGS]))
def test_wrapped_trainable_and_keys(arch, config):
    relation = _relation(arch, config)
    if relation == "lorakit_refuses":
        assert _wrapped(make(peft, arch, config), peft.tuners.lora.LoraLayer)
        with pytest.raises(ValueError, match="LoRA cannot adapt"):
            make(lorakit, arch, config)
        return
    try:
        ref = make(peft, arch, config)
    except Exception:  # peft's answer decides what lorakit must do
        if relation == "lorakit_adapts":
            ours = make(lorakit, arch, config)
            assert _wrapped(ours, lorakit.LoraLayer), "a documented difference: lorakit adapts where peft raises"
            return
        with pytest.raises(Exception):  # noqa: B017 - the same refusal, whatever peft's exception class
            make(lorakit, arch, config)
        return
    ours = make(lorakit, arch, config)
    ref_paths, ours_paths = _wrapped(ref, peft.tuners.lora.LoraLayer), _wrapped(ours, lorakit.LoraLayer)
    ref_keys, ours_keys = _saved(ref, peft), _saved(ours, lorakit)
    if relation == "dense_mlps":
        assert ref_paths < ours_paths
        extras = {p.rsplit(".", 1)[-1] for p in ours_paths - ref_paths}
        assert extras <= {"gate_proj", "up_proj", "down_proj"}
        assert all(ours_keys[k] == v for k, v in ref_keys.items())
        return
    assert ours_paths == ref_paths
    assert ours_keys == ref_keys
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("arch", "config"), _params([("forward", c) for c in CONFIGS]))
def test_forward_and_lora_gradients(arch, config, mode):
    ref, ours = pair(arch, config)
    batch = inputs(arch, ref)
    getattr(ref, mode)(), getattr(ours, mode)()
    out_ref, out_ours = run(ref, batch), run(ours, batch)
    close(out_ours, out_ref)
    assert (out_ours - run(build(arch).train(mode == "train"), batch)).abs().max() > 1e-4  # the adapter acts
    out_ref.pow(2).mean().backward()
    out_ours.pow(2).mean().backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if n in ref_grads}
    assert set(ours_grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        if grad is None:
            assert ours_grads[name] is None or not ours_grads[name].any(), name
        else:
            close(ours_grads[name], grad)


@pytest.mark.parametrize(("arch", "config"), _params([("files", c) for c in ("lora", "dora")]))
def test_files_load_both_ways(arch, config, tmp_path):
    ref, ours = pair(arch, config)
    batch = inputs(arch, ref)
    ref.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    ours.save_pretrained(tmp_path / "lorakit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours_from_peft = lorakit.PeftModel.from_pretrained(build(arch), tmp_path / "peft").eval()
        peft_from_ours = peft.PeftModel.from_pretrained(build(arch), tmp_path / "lorakit").eval()
    with torch.no_grad():
        expected = run(ref.eval(), batch)
        close(run(ours_from_peft, batch), expected)
        close(run(peft_from_ours, batch), run(ours.eval(), batch))


@pytest.mark.parametrize(("arch", "config"), _params([("merge", c) for c in ("lora", "dora")]))
def test_merged_equals_unmerged(arch, config):
    ours = lorakit_or_skip(arch, config).eval()
    batch = inputs(arch, ours)
    with torch.no_grad():
        unmerged = run(ours, batch)
        assert (unmerged - run(build(arch), batch)).abs().max() > 1e-4
        merged = ours.merge_and_unload()
        assert not any(isinstance(m, lorakit.LoraLayer) for m in merged.modules())
        close(run(merged, batch), unmerged)


@pytest.mark.parametrize(("arch", "config"), _params([("generate", "lora")], only=lambda a: a.task in GENERATIVE))
def test_greedy_generate(arch, config):
    ref, ours = pair(arch, config)
    batch = {k: v for k, v in inputs(arch, ref).items() if k != "decoder_input_ids"}
    kwargs = dict(max_new_tokens=4, do_sample=False, num_beams=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref.eval().generate(**batch, **kwargs)
        got = ours.eval().generate(**batch, **kwargs)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(("arch", "config"), _params([("mixed", "lora")]))
def test_mixed_batch_equals_rows(arch, config):
    ours = lorakit_or_skip(arch, config)
    ours.add_adapter("other", lorakit.LoraConfig(task_type=TASK_TYPES.get(arch.task), **CONFIGS[config]))
    ours.eval()
    batch = inputs(arch, ours)
    names = ["default", "other"]
    if any(isinstance(m, ParamWrapper) for m in ours.modules()):  # fused experts: both libraries refuse
        with pytest.raises(ValueError, match=r"Mixed-adapter batches|adapter_names has 2 entries"):
            ours(**batch, adapter_names=names)
        ref = make(peft, arch, config)
        ref.add_adapter("other", peft.LoraConfig(task_type=TASK_TYPES.get(arch.task), **CONFIGS[config]))
        with pytest.raises(ValueError, match=r"mixed adapter batches|Length of `adapter_names`"):
            ref.eval()(**batch, adapter_names=names)
        return
    with torch.no_grad():
        try:
            mixed = run(ours, {**batch, "adapter_names": names})
        except ValueError as error:  # a layer sees other rows than the batch's (flattened tokens, expert dispatch)
            assert "adapter_names has 2 entries" in str(error)
            ref = make(peft, arch, config)
            ref.add_adapter("other", peft.LoraConfig(task_type=TASK_TYPES.get(arch.task), **CONFIGS[config]))
            with pytest.raises(Exception):  # noqa: B017 - peft refuses too (ValueError, or a crash on the rows)
                run(ref.eval(), {**batch, "adapter_names": names})
            return
        for row, name in enumerate(names):
            ours.set_adapter(name)
            alone = run(ours, {k: v[row : row + 1] for k, v in batch.items()})
            close(mixed[row : row + 1], alone)
        assert (mixed[0] - mixed[1]).abs().max() > 0 or batch.get("input_ids") is None
