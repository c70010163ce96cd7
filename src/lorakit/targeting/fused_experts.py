"""Mixture-of-experts models whose experts transformers 5 fused into 3-D parameters (PEFT 0.21's targets).

transformers 5 stores the experts of Mixtral-, Qwen2-MoE- and DeepSeek-style models as stacked parameters
(``experts.gate_up_proj`` (E, 2*h, d), ``experts.down_proj`` (E, d, h)) and the router ``gate`` as a custom module
with a ``weight``; in transformers 4 they were ``nn.Linear``s named ``w1``/``w3``/``w2`` (Mixtral) or
``gate_proj``/``up_proj``/``down_proj`` (Qwen2-MoE family), and the router an ``nn.Linear`` named ``gate``. PEFT 0.21
keeps configs written for either version targeting the same weights by rewriting them before injection; lorakit
does the same, so the same config gives the same adapter (names, shapes, keys) as PEFT:

- a target naming an old expert projection (exactly or as a dotted suffix) adds the fused parameter to
  ``target_parameters``; ``'all-linear'`` names all of them and the router, as it did in transformers 4;
- ``gate`` (the router) becomes the parameter ``gate.weight`` and leaves ``target_modules``;
- two old projections fused into one parameter (``w1`` + ``w3`` -> ``gate_up_proj``) must be targeted together,
  and that parameter gets rank and alpha times two (``rank_pattern`` / ``alpha_pattern``), so each half keeps r and
  alpha / r.

Two deliberate differences from PEFT (docs/features.md): an old expert name that also names ordinary modules
(the dense ``gate_proj``/``up_proj``/``down_proj`` MLPs of DeepSeek-V3's first layers, shared experts) keeps those
modules targeted, where PEFT drops them; and ``target_modules=None`` keeps lorakit's per-model defaults, where
PEFT's rewrite empties the set before its defaults apply (``NoMatchingPeftModuleError``). A regex is resolved to the
module paths it matches (without the router) and the parameters whose old paths it matches, rather than to leaf
names (which would widen a regex that names some layers only to every layer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.nn as nn

from ..config import LoraConfig
from .match import ALL_LINEAR, expand_all_linear, matches_any


@dataclass(frozen=True)
class ExpertRenames:
    """How one family's transformers-4 names map to transformers-5 parameters."""

    router: str
    """The router module's name; its ``weight`` becomes the target parameter ``<router>.weight``."""
    experts: dict[str, str] = field(default_factory=dict)
    """Old expert projection name -> the fused parameter that holds it (in insertion order)."""

    def fused_from(self, parameter: str) -> list[str]:
        """The old names stacked into ``parameter`` (two for gate_up_proj)."""
        return [old for old, new in self.experts.items() if new == parameter]


EXPERT_FAMILIES: dict[str, ExpertRenames] = {
    "mixtral": ExpertRenames("gate", {"w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"}),
    "qwen2_moe": ExpertRenames(
        "gate", {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
    ),
}
"""Families whose fused experts PEFT 0.21 retargets, keyed like transformers' checkpoint conversion patterns."""

MODEL_TYPE_FAMILIES: dict[str, str] = {
    "mixtral": "mixtral",
    **{t: "mixtral" for t in ("minimax", "minimax_m2")},
    **{
        t: "qwen2_moe"
        for t in (
            "afmoe", "beam", "cohere2_moe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "ernie4_5_moe",
            "exaone_moe", "flex_olmo", "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm_moe_dsa", "hunyuan_v1_moe",
            "longcat_flash", "mellum", "olmoe", "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_omni_moe_text",
            "qwen3_omni_moe_thinker", "sarvam_mla", "solar_open",
        )
    },
}  # fmt: skip
"""model_type -> family, as transformers 5.25's conversion patterns (which PEFT reads). ``qwen2_moe`` itself is
absent there, so PEFT leaves its experts alone and lorakit does too. Newer model types are read from transformers
at run time (``family_of``)."""


def _transformers_patterns() -> dict[str, str]:
    """transformers' own model_type -> conversion pattern table, when this transformers has one."""
    try:
        from transformers import conversion_mapping
    except ImportError:
        return {}
    return dict(getattr(conversion_mapping, "_MODEL_TO_CONVERSION_PATTERN", {}) or {})


def family_of(model: nn.Module) -> ExpertRenames | None:
    """The expert renames that apply to ``model`` (by ``model.config.model_type``), or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model_type, str):
        return None
    family = MODEL_TYPE_FAMILIES.get(model_type) or _transformers_patterns().get(model_type)
    return EXPERT_FAMILIES.get(family) if family else None


def _parameter_owners(model: nn.Module, name: str) -> list[str]:
    """Paths of the modules that own a 3-D parameter called ``name`` (the fused experts), as the user's model names
    them (the ``base_layer`` hops of adapters added before left out)."""
    paths = [
        path
        for path, module in model.named_modules()
        if getattr(module, "_parameters", {}).get(name) is not None and module._parameters[name].dim() == 3
    ]
    return list(dict.fromkeys(re.sub(r"(\.base_layer)+$", "", p) for p in paths))


def _check_fused_complete(family: ExpertRenames, wanted: set[str]) -> None:
    for parameter in dict.fromkeys(family.experts.values()):
        parts = family.fused_from(parameter)
        asked = [p for p in parts if p in wanted]
        if 0 < len(asked) < len(parts):
            missing = [p for p in parts if p not in wanted]
            raise ValueError(
                f"target_modules name {asked} but not {missing}: in transformers 5 these expert projections are "
                f"fused into one parameter {parameter!r}, which can only be adapted as a whole; target "
                f"{parts} together (or neither)."
            )


def _add_patterns(config: LoraConfig, family: ExpertRenames, parameters: set[str]) -> None:
    """Rank and alpha times k for a parameter fusing k targeted projections (an explicit user entry wins)."""
    for parameter in sorted(parameters):
        k = len(family.fused_from(parameter))
        if k > 1:
            key = rf".*\.{re.escape(parameter)}"
            rank, alpha = dict(config.rank_pattern or {}), dict(config.alpha_pattern or {})
            rank.setdefault(key, config.r * k)
            alpha.setdefault(key, config.lora_alpha * k)
            config.rank_pattern, config.alpha_pattern = rank, alpha


def _is_router(path: str, family: ExpertRenames) -> bool:
    return path == family.router or path.endswith("." + family.router)


def _names_old(entry: str, old_names: list[str]) -> str | None:
    """The old name ``entry`` names (exactly or as a dotted suffix), or None."""
    return next((old for old in old_names if entry == old or entry.endswith("." + old)), None)


def _regex_hits(model: nn.Module, family: ExpertRenames, regex: str, module_paths: list[str]) -> dict[str, set[str]]:
    """Old name -> full paths of the parameters it stands for, where the regex matches its transformers-4 path:
    ``<experts>.<old>`` for a projection (probed on the owners of the fused parameter), the router's own path."""
    hits: dict[str, set[str]] = {}
    for old, parameter in family.experts.items():
        owners = _parameter_owners(model, parameter)
        paths = {f"{o}.{parameter}" for o in owners if re.fullmatch(regex, f"{o}.{old}")}
        if paths:
            hits[old] = paths
    routers = {f"{p}.weight" for p in module_paths if _is_router(p, family) and re.fullmatch(regex, p)}
    if routers:
        hits[family.router] = routers
    for parameter in set(family.experts.values()):
        parts = family.fused_from(parameter)
        if len({frozenset(hits.get(p, ())) for p in parts}) > 1:
            raise ValueError(
                f"target_modules={regex!r} does not match all of {parts} in the same layers (matched: "
                f"{ {p: sorted(hits.get(p, ())) for p in parts} }): in transformers 5 they are fused into one "
                f"parameter {parameter!r}, which can only be adapted as a whole; match {parts} together (or neither)."
            )
    return hits


def _modules_left(entries: list[str], family: ExpertRenames, module_paths: list[str]) -> list[str]:
    """target_modules entries after the rewrite: the router leaves; an expert name stays only where it still names
    ordinary modules (dense MLPs, shared experts), which PEFT would drop."""
    old_names = [family.router, *family.experts]
    left = []
    for entry in entries:
        old = _names_old(entry, old_names)
        if old is None or (old != family.router and any(matches_any([entry], p) for p in module_paths)):
            left.append(entry)
    return left


def retarget_fused_experts(model: nn.Module, config: LoraConfig) -> list[str]:
    """Rewrite ``config`` in place so that its expert and router targets name the fused parameters of ``model``.

    Returns the ``target_parameters`` entries it added (empty when nothing applied). ``target_modules=None`` is left
    alone (the per-model defaults apply later)."""
    family = family_of(model)
    targets = config.target_modules
    if family is None or targets is None:
        return []
    if not any(_parameter_owners(model, p) for p in set(family.experts.values())):
        return []  # no fused experts in this model (e.g. a dense config of a MoE family)
    module_paths = [p for p, _ in model.named_modules() if p]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        entries, wanted = expand_all_linear(model, config), {family.router, *family.experts}
    elif isinstance(targets, str):
        hits = _regex_hits(model, family, targets, module_paths)
        entries, wanted = None, set(hits)
    else:
        entries = list(targets)
        wanted = {o for o in (_names_old(e, [family.router, *family.experts]) for e in entries) if o is not None}
    if not wanted:
        return []
    _check_fused_complete(family, wanted)
    parameters = {family.experts[o] for o in wanted if o in family.experts}
    if entries is not None:
        added = sorted(parameters | ({f"{family.router}.weight"} if family.router in wanted else set()))
        config.target_modules = _modules_left(entries, family, module_paths)
    else:  # a regex: the parameters by full path (as precise as the regex); the router leaves the module matches
        added = sorted(set().union(*hits.values()))
        if family.router in wanted:
            matched = [p for p in module_paths if re.fullmatch(targets, p)]
            config.target_modules = [p for p in matched if not _is_router(p, family)]
    config.target_parameters = sorted(set(config.target_parameters or []) | set(added))
    _add_patterns(config, family, parameters)
    return added
