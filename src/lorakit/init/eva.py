"""EVA (arXiv:2410.07170): explained-variance adaptation. A starts as the top right-singular vectors of each layer's
inputs on a few batches of data; ranks move between layers towards the directions that explain most variance.

``get_peft_model(model, LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(...)), low_cpu_mem_usage=True)``
creates the adapter (B = 0; on the meta device with low_cpu_mem_usage) and ``initialize_lora_eva_weights(model,
dataloader)`` fills it:

1. hook each adapted linear layer (adapters disabled) and keep its masked input tokens (n, in) per batch;
   layers whose inputs are identical (q/k/v) share one PCA;
2. run incremental PCA with k = round(r * rho) components per layer, batch after batch, until the components a
   layer needs agree with the previous step's (cosine >= tau); all layers of one shape are fitted in one call;
3. redistribute ranks: pool every layer's explained-variance ratios, keep the global top sum(r); a layer's new rank
   is its count (at most r * rho); rank-0 layers lose the adapter;
4. A <- top components (optionally whitened), B = 0; alpha *= new_r / r when adjust_scaling_factors; the config's
   rank_pattern / alpha_pattern are rewritten so the saved adapter is an ordinary LoRA adapter.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterable, Mapping
from itertools import cycle

import torch
import torch.nn as nn

from .default import init_default
from .identical import find_identical
from .incremental_pca import PcaState, partial_fit_many
from .registry import InitRequest, InitResult, register_init

RHO_THRESHOLD = 1000
MAX_STEPS = 100_000
PEFT_PREFIX = "base_model.model."


@register_init("eva")
def init_eva(req: InitRequest) -> InitResult:
    """Placeholder until ``initialize_lora_eva_weights`` runs: A keeps its creation init, B = 0 (a no-op).

    EVA covers linear layers only; other layer kinds get the default init (initialize_lora_eva_weights warns)."""
    if req.layer_kind != "linear":
        return init_default(req)
    return InitResult(None, torch.zeros(req.b_shape))


# ---------------------------------------------------------------------------------------------- input preparation
def forward_fn_dict(model: nn.Module, inputs: Mapping) -> object:
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Mapping, peft_config) -> torch.Tensor:
    """(N, 2) (row, position) indices of the tokens to use: attention_mask, and labels != label_mask_value."""
    if not isinstance(model_input, Mapping):
        raise TypeError(f"EVA's default prepare_model_inputs_fn needs dict inputs, got {type(model_input).__name__}.")
    ids = model_input["input_ids"]
    mask = model_input.get("attention_mask", torch.ones_like(ids)).bool()
    eva = peft_config.eva_config
    if eva.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != eva.label_mask_value)
    return mask.nonzero()


def _first_tensor(layer_input: object, layer_name: str) -> torch.Tensor:
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise TypeError(
            f"EVA cannot read the input of layer {layer_name!r} ({type(layer_input).__name__}); pass a "
            "prepare_layer_inputs_fn for it."
        )
    return layer_input


def prepare_layer_inputs_fn_language_modeling(layer_input: object, model_input: torch.Tensor, layer_name: str):
    """The layer's input at the kept token positions: (B, T, in) indexed by (N, 2) -> (N, in)."""
    return _first_tensor(layer_input, layer_name)[model_input.T.unbind()]


def prepare_layer_inputs_default(layer_input: object, model_input: object, layer_name: str) -> torch.Tensor:
    """All tokens: (..., in) -> (N, in)."""
    x = _first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x


def _gather(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Concatenate the tokens of every rank (rows may differ in number) when torch.distributed runs."""
    import torch.distributed as dist

    if not (enabled and dist.is_available() and dist.is_initialized()):
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    counts = [int(s.item()) for s in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def _to_device(inputs: object, device: torch.device | None) -> object:
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _to_device(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    warnings.warn(f"input of type {type(inputs)} could not be moved to the correct device", stacklevel=2)  # as PEFT
    return inputs


# ---------------------------------------------------------------------------------------------- statistics
class _Capture:
    """Forward hook keeping one layer's prepared input (n, in) of the current batch."""

    def __init__(self, name: str, prepare: Callable, run: _EvaRun) -> None:
        self.name, self.prepare, self.run = name, prepare, run

    @torch.no_grad()
    def __call__(self, module: nn.Module, inputs: tuple, output: object) -> None:
        x = self.prepare(inputs, self.run.model_input, self.name)
        self.run.captured[self.name] = _gather(x, self.run.gather)


def distribute_ranks(
    ratios: dict[str, torch.Tensor],
    leader_of: dict[str, str],
    followers: dict[str, str],
    max_components: dict[str, int],
    budget: int,
) -> dict[str, int]:
    """New rank per layer: its share of the global top-``budget`` explained-variance ratios.

    Args:
        ratios: leader -> (k,) explained-variance ratios of its PCA.
        leader_of: every layer -> the layer whose PCA it uses (itself for leaders), in PEFT's order.
        followers: follower -> leader; a leader always gets the largest rank of its group.
    """
    names = list(leader_of)
    pieces = [ratios[leader_of[n]][: max_components[leader_of[n]]] for n in names]
    values = torch.cat(pieces)
    owner = torch.repeat_interleave(
        torch.arange(len(names), device=values.device),
        torch.tensor([p.numel() for p in pieces], device=values.device),
    )
    top = values.argsort(descending=True, stable=True)[:budget]
    counts = torch.bincount(owner[top], minlength=len(names)).tolist()
    ranks = dict(zip(names, counts))
    for follower, leader in followers.items():
        if ranks[leader] < ranks[follower]:
            ranks[leader], ranks[follower] = ranks[follower], ranks[leader]
    return ranks


class _EvaRun:
    """The state of one EVA computation: hooks, per-layer PCA, convergence and the current rank distribution."""

    def __init__(self, model, targets, peft_config, prepare_layer, gather: bool) -> None:
        from ..targeting import rank_and_alpha

        self.model, self.config, self.gather = model, peft_config, gather
        self.model_input: object = None
        self.captured: dict[str, torch.Tensor] = {}
        eva = peft_config.eva_config
        rho = eva.rho
        if rho > RHO_THRESHOLD:
            rho = min(rho, max(max(p.shape) for p in model.parameters()) // peft_config.r)
        self.tau = eva.tau
        self.modules = dict(targets)
        self.ranks = {n: rank_and_alpha(peft_config, _strip(n))[0] for n in self.modules}
        self.budget = sum(self.ranks.values())
        self.max_components = {n: round(r * rho) for n, r in self.ranks.items()}
        for name, module in self.modules.items():
            k, in_features = self.max_components[name], _in_features(module)
            if in_features is not None and k > in_features:
                raise ValueError(
                    f"EVA: layer {name!r} has {in_features} input features, fewer than the round(r * rho) = {k} "
                    "components it would need; lower rho or this layer's rank."
                )
        self.prepare = _layer_preparers(prepare_layer, list(self.modules))
        self.handles: dict[str, object] = {}
        self.followers: dict[str, str] = {}
        self.states: dict[str, PcaState] = {}

    # hooks
    def hook(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self.handles:
                capture = _Capture(name, self.prepare[name], self)
                self.handles[name] = self.modules[name].register_forward_hook(capture)

    def unhook(self, names: Iterable[str]) -> None:
        for name in list(names):
            handle = self.handles.pop(name, None)
            if handle is not None:
                handle.remove()

    def forward(self, forward_fn, inputs, prepare_model) -> None:
        self.model_input = prepare_model(inputs, self.config) if prepare_model is not None else inputs
        self.captured = {}
        forward_fn(self.model, inputs)

    # steps
    def start(self) -> None:
        """After the first forward with every layer hooked: find shared inputs, create one PCA per leader."""
        missing = [n for n in self.modules if n not in self.captured]
        if missing:
            raise ValueError(f"EVA: layers {missing[:5]} were not called by forward_fn on the first batch.")
        found = find_identical(self.captured)
        leaders = [n for n in self.modules if n not in found]
        # grouped by leader, as PEFT orders them (the order decides ties in the rank distribution)
        self.followers = {f: lead for lead in leaders for f, owner in found.items() if owner == lead}
        for follower, leader in self.followers.items():
            k = max(self.max_components[follower], self.max_components[leader])
            self.max_components[follower] = self.max_components[leader] = k
        self.unhook(self.followers)
        self.leader_of = {n: n for n in leaders} | self.followers
        self.states = {n: PcaState(self.max_components[n]) for n in leaders}
        self.rank_dist = dict(self.max_components)
        self.done = dict.fromkeys(self.states, False)

    def update_activity(self) -> None:
        """Stop fitting layers whose needed components converged; resume those that need more (PEFT's rule)."""
        for name, state in self.states.items():
            converged = bool(state.converged[: self.rank_dist[name]].all())
            if not self.done[name] and converged:
                self.unhook([name])
                self.done[name] = True
            elif self.done[name] and not converged:
                self.hook([name])
                self.done[name] = False

    def fit(self) -> None:
        names = [n for n in self.states if n in self.captured and n in self.handles]
        names = [n for n in names if self.captured[n].shape[0] >= self.states[n].n_components]
        partial_fit_many([self.states[n] for n in names], [self.captured[n] for n in names], self.tau)
        self.captured = {}
        if all(s.fitted for s in self.states.values()):
            ratios = {n: s.explained_variance_ratio for n, s in self.states.items()}
            self.rank_dist = distribute_ranks(ratios, self.leader_of, self.followers, self.max_components, self.budget)

    def result(self) -> dict[str, torch.Tensor]:
        whiten = self.config.eva_config.whiten
        out = {}
        for name, leader in self.leader_of.items():
            rank, state = self.rank_dist[name], self.states[leader]
            if not bool(state.converged[:rank].all()):
                raise RuntimeError(f"EVA: layer {name!r} got rank {rank} but its components have not converged.")
            u = state.components[:rank].clone()
            if whiten:
                u = u / state.singular_values[:rank].sqrt()[:, None]
            out[name] = u
        return out


def _in_features(module: nn.Module) -> int | None:
    if hasattr(module, "in_features"):
        return int(module.in_features)
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def _layer_preparers(prepare_layer, names: list[str]) -> dict[str, Callable]:
    if prepare_layer is None:
        return dict.fromkeys(names, prepare_layer_inputs_default)
    if not isinstance(prepare_layer, Mapping):
        return dict.fromkeys(names, prepare_layer)
    unknown = sorted(set(prepare_layer) - set(names))
    if unknown:
        raise ValueError(f"prepare_layer_inputs_fn names layers {unknown} that EVA does not adapt; it adapts {names}.")
    return {n: prepare_layer.get(n, prepare_layer_inputs_default) for n in names}


def _strip(name: str) -> str:
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def _eva_targets(model: nn.Module, peft_config, adapter_name: str, is_peft: bool) -> list[tuple[str, nn.Module]]:
    if is_peft:
        from ..layers import LoraLayer

        return [
            (n, m)
            for n, m in model.named_modules()
            if isinstance(m, LoraLayer) and m.layer_kind == "linear" and adapter_name in m.adapters
        ]
    from .corda import corda_targets

    return corda_targets(model, peft_config)


def _device(model: nn.Module) -> torch.device | None:
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    if len(devices) > 1:
        warnings.warn(f"EVA: the model is spread over {sorted(map(str, devices))}; inputs stay put.", stacklevel=3)
        return None
    return next(iter(devices), None)


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, position=0, leave=False)


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config=None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """EVA's A matrices {module name: (new_r, in)} for a PeftModel (its LoRA layers) or a plain model (the layers
    ``peft_config`` targets). Ranks are already redistributed; a layer may get rank 0."""
    is_peft = hasattr(model, "peft_config")
    if peft_config is None:
        if not is_peft:
            raise ValueError("get_eva_state_dict needs peft_config when model is not a PeftModel.")
        peft_config = model.peft_config[adapter_name]
    if peft_config.eva_config is None:
        raise ValueError("EVA needs lora_config.eva_config (an EvaConfig).")
    if dataloader is None:
        raise ValueError("EVA needs a dataloader of model inputs to compute the layer statistics; got None.")
    if hasattr(dataloader, "__len__") and len(dataloader) == 0:
        raise ValueError("EVA got an empty dataloader; it needs at least one batch.")
    import torch.distributed as dist

    if gather_distributed_inputs and dist.is_available() and dist.is_initialized():  # PEFT's note
        warnings.warn(
            "torch.distributed is initialized and `gather_distributed_inputs` is True, therefore EVA initialization "
            "will gather tensors from all ranks. Ensure the model does not receive the same inputs on different ranks.",
            stacklevel=2,
        )
    targets = _eva_targets(model, peft_config, adapter_name, is_peft)
    if not targets:
        raise ValueError(f"EVA found no linear layers to initialise (adapter {adapter_name!r}).")
    run = _EvaRun(model, targets, peft_config, prepare_layer_inputs_fn, gather_distributed_inputs)
    training = model.training
    model.eval()
    device = _device(model)
    context = model.disable_adapter() if is_peft else contextlib.nullcontext()
    try:
        with context:
            _iterate(run, dataloader, device, forward_fn or forward_fn_dict, prepare_model_inputs_fn, show_progress_bar)
    finally:
        run.unhook(list(run.handles))
        model.train(training)
    result = run.result()
    return {k: v.to(device) for k, v in result.items()} if device is not None else result


def _iterate(run: _EvaRun, dataloader, device, forward_fn, prepare_model, show_progress_bar: bool) -> None:
    bar = _progress(show_progress_bar, len(run.modules))
    batches = cycle(dataloader)
    run.hook(run.modules)
    run.forward(forward_fn, _to_device(next(batches), device), prepare_model)
    run.start()
    run.fit()
    for step in range(MAX_STEPS):
        run.update_activity()
        converged = sum(run.done.values()) + sum(run.done[lead] for lead in run.followers.values())
        if bar is not None:
            bar.set_description(f"{converged}/{len(run.modules)} layers have converged")
            bar.update(converged - bar.n)
        if all(run.done.values()):
            break
        if step == MAX_STEPS - 1:
            raise RuntimeError(f"EVA did not converge in {MAX_STEPS} batches; lower eva_config.tau.")
        run.forward(forward_fn, _to_device(next(batches), device), prepare_model)
        run.fit()
    if bar is not None:
        bar.close()


# ---------------------------------------------------------------------------------------------- loading
@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable | None = None,
    eva_state_dict: dict | None = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Fill an ``init_lora_weights="eva"`` adapter of ``model`` (a PeftModel) from data or a precomputed
    ``eva_state_dict`` (from ``get_eva_state_dict``); returns ``model``."""
    if not hasattr(model, "peft_config"):
        raise ValueError("initialize_lora_eva_weights needs a PeftModel (from get_peft_model).")
    if adapter_name not in model.peft_config:
        raise ValueError(f"Adapter {adapter_name!r} not found; existing adapters: {sorted(model.peft_config)}.")
    if len(model.active_adapters) > 1:
        raise ValueError(f"EVA works with one active adapter; active: {model.active_adapters}.")
    init = model.peft_config[adapter_name].init_lora_weights
    if init != "eva":
        raise ValueError(
            f"initialize_lora_eva_weights needs init_lora_weights='eva'; adapter {adapter_name!r} has {init!r}."
        )
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("initialize_lora_eva_weights needs a dataloader (or a precomputed eva_state_dict).")
        eva_state_dict = get_eva_state_dict(
            model,
            dataloader,
            forward_fn=forward_fn,
            prepare_model_inputs_fn=prepare_model_inputs_fn,
            prepare_layer_inputs_fn=prepare_layer_inputs_fn,
            adapter_name=adapter_name,
            gather_distributed_inputs=gather_distributed_inputs,
            show_progress_bar=show_progress_bar,
        )
    load_eva_state_dict(model, eva_state_dict, adapter_name)
    return model


def load_eva_state_dict(model: nn.Module, eva_state_dict: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Resize and fill each layer's adapter from ``eva_state_dict`` and rewrite the config's patterns."""
    from ..layers import LoraLayer

    config = model.peft_config[adapter_name]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    pending = {_strip(k): v for k, v in eva_state_dict.items()}
    rank_pattern, alpha_pattern, kept, removed, defaulted = {}, {}, [], [], []
    for name, layer in list(base.named_modules()):
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.adapters:
            continue
        components = pending.pop(name, None)
        new_rank, alpha = _fill_layer(base, name, layer, components, config, adapter_name)
        if new_rank == 0:
            removed.append(name)
            continue
        (defaulted if components is None else kept).append(name)
        if new_rank != config.r:
            rank_pattern[name] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[name] = alpha
    if pending:
        warnings.warn(
            f"eva_state_dict entries {sorted(pending)[:5]} match no layer with adapter {adapter_name!r}.", stacklevel=3
        )
    if defaulted:
        warnings.warn(
            f"EVA covers linear layers only; these layers got the default init instead: {defaulted}.", stacklevel=3
        )
    if removed:
        config.target_modules = kept + defaulted
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
    if hasattr(model, "base_model") and hasattr(model.base_model, "_apply_trainability"):
        model.base_model._apply_trainability()


def _fill_layer(base, name, layer, components, config, adapter_name) -> tuple[int, float]:
    """Give one layer its EVA rank and A (default init without components); returns (new rank, alpha)."""
    from ..targeting import rank_and_alpha

    r, alpha = rank_and_alpha(config, name)
    if components is None:
        layer.update_layer(adapter_name, r, alpha, _with_init(config, True), module_name=name)
        return r, alpha
    new_rank = components.shape[0]
    if new_rank == 0:
        _remove_adapter(base, name, layer, adapter_name)
        return 0, alpha
    if new_rank != r and config.eva_config.adjust_scaling_factors:
        alpha *= new_rank / r
    if new_rank != r or layer._factors_2d(adapter_name)[0].is_meta:
        layer.update_layer(adapter_name, new_rank, alpha, _with_init(config, "eva"), module_name=name)
    layer.set_factors_2d(adapter_name, components, None)
    return new_rank, alpha


def _with_init(config, init: bool | str):
    out = copy.copy(config)
    out.init_lora_weights = init
    return out


def _remove_adapter(base: nn.Module, name: str, layer, adapter_name: str) -> None:
    """A rank-0 layer loses the adapter; a layer left with no adapter is replaced by its base module."""
    if len(layer.adapters) > 1:
        layer.delete_adapter(adapter_name)
        return
    from ..model.inject import split_parent

    parent, child = split_parent(base, name)
    setattr(parent, child, layer.get_base_layer())
