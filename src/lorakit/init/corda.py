"""CorDA (arXiv:2406.05223): context-oriented decomposition. The SVD is taken of W C, where C is the covariance of
the layer's inputs on calibration data, so the split follows the directions the data actually uses.

``preprocess_corda(model, lora_config, run_model)`` (before ``get_peft_model``):
  1. hooks every targeted linear layer and accumulates C += X^T X per sample, X = input / |max(input)|; C /= count;
  2. damps C' = C + d * mean(diag C) * I, d = 0.01 doubling until ||C' C'^-1 - I||_F < 0.05;
  3. W C' = U S Vh, V = (Vh C'^-1)^T; "ipm" keeps the r largest components, "kpm" the r smallest;
  and stores them on the layer as ``eigens`` (PEFT's name and cache-file keys, so caches are interchangeable).
At init (``init_lora_weights="corda"``): S /= s, A = diag(sqrt S) V^T (r, in), B = U diag(sqrt S) (out, r),
W <- W - s * B @ A, so the output is unchanged.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .identical import find_identical
from .registry import InitRequest, InitResult, register_init
from .residual import require_float_base, split_singular_values, with_residual

INVERSE_TOLERANCE = 0.05
MAX_DAMPING = 1e8


@dataclass
class CordaEigens:
    """The kept singular triplets of W C': S_WC (r,), U_WC (out, r), V_WC (in, r) (PEFT's field names)."""

    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


# ---------------------------------------------------------------------------------------------- init function
@register_init("corda", layer_kinds={"linear"})
def init_corda(req: InitRequest) -> InitResult:
    """Split W using the decomposition ``preprocess_corda`` stored on the base layer."""
    require_float_base(req, "corda")
    base = req.layer.get_base_layer()
    eigens = getattr(base, "eigens", None)
    if eigens is None:
        raise ValueError(
            f"init_lora_weights='corda' found no CorDA decomposition on layer {req.module_name!r}: call "
            "lorakit.preprocess_corda(model, lora_config, run_model=...) with the same model and config before "
            "get_peft_model. To load a saved CorDA adapter, run preprocess_corda first (its cache_file spares the "
            "calibration), or save the adapter converted to plain LoRA with "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...)."
        )
    weight = req.base_weight()
    out_features, in_features = weight.shape
    expected = {"U_WC": (out_features, req.rank), "S_WC": (req.rank,), "V_WC": (in_features, req.rank)}
    for field_name, shape in expected.items():
        got = tuple(getattr(eigens, field_name).shape)
        if got != shape:
            raise ValueError(
                f"CorDA decomposition of layer {req.module_name!r} has {field_name} of shape {got}, expected {shape}: "
                "preprocess_corda (or its cache_file) was run with another model, rank or rank_pattern."
            )
    u, s, v = (getattr(eigens, f).to(weight.device, torch.float32) for f in ("U_WC", "S_WC", "V_WC"))
    if not all(torch.isfinite(t).all() for t in (u, s, v)):
        raise ValueError(f"CorDA decomposition of layer {req.module_name!r} contains NaN or inf values.")
    lora_a, lora_b = split_singular_values(u, s, v.T, req.scaling)
    del base.eigens
    return with_residual(weight, lora_a, lora_b, req.scaling)


# ---------------------------------------------------------------------------------------------- preprocessing
def corda_targets(model: nn.Module, lora_config) -> list[tuple[str, nn.Module]]:
    """(name, module) of the nn.Linear / Conv1D modules that ``lora_config`` targets in ``model``."""
    from ..targeting import is_target, resolve_target_names
    from ..targeting.match import linear_types

    config = copy.copy(lora_config)
    config.target_modules = resolve_target_names(model, lora_config)
    kinds = linear_types()
    return [(n, m) for n, m in model.named_modules() if n and isinstance(m, kinds) and is_target(config, n)]


def weight_2d(module: nn.Module) -> torch.Tensor:
    """(out, in) float32 view of a Linear or transformers Conv1D weight (Conv1D stores (in, out))."""
    weight = module.weight.detach().float()
    return weight if isinstance(module, nn.Linear) else weight.T


class CovarianceHook:
    """Forward hook accumulating sum_samples X^T X of a layer's input, each sample scaled by |max(sample)|.

    Hooks share a one-slot cache: the next layer reading the very same input tensor (k/v after q, up after gate)
    reuses its X^T X instead of recomputing it."""

    def __init__(self, keep_dtype: bool, shared: dict) -> None:
        self.keep_dtype = keep_dtype
        self.shared = shared
        self.total: torch.Tensor | None = None  # (in, in)
        self.count = 0

    @torch.no_grad()
    def __call__(self, module: nn.Module, inputs: tuple, output: object) -> None:
        x = inputs[0]
        cached = self.shared.get("input")
        # the cache holds the input tensor itself, so "is" cannot match a new tensor at a reused address
        if cached is None or cached[0] is not x or cached[1] != x._version:
            self.shared["input"], self.shared["value"] = (x, x._version), self._covariance(x.detach())
        cov, samples = self.shared["value"]
        self.total = cov.clone() if self.total is None else self.total.add_(cov)
        self.count += samples

    def _covariance(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        if not self.keep_dtype:
            x = x.float()
        # (B, ..., in) -> (B, tokens, in): one sample per row of the batch; 1-D/2-D inputs are one sample
        samples = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() >= 3 else x.reshape(1, -1, x.shape[-1])
        samples = samples / samples.amax(dim=(1, 2)).abs()[:, None, None]
        flat = samples.reshape(-1, samples.shape[-1])
        return flat.T @ flat, samples.shape[0]  # (in, in)


def collect_covariances(
    model: nn.Module,
    lora_config,
    run_model: Callable[[], object] | None,
    hooked_model: nn.Module | None,
) -> dict[str, torch.Tensor]:
    """Mean input covariance (in, in) of every CorDA target, from the covariance_file or by running the model."""
    corda = lora_config.corda_config
    names = [n for n, _ in corda_targets(model, lora_config)]
    path = corda.covariance_file
    if path is not None and os.path.exists(path) and os.path.getsize(path) > 0:
        saved = torch.load(path, map_location=_device(model), weights_only=True)
        missing = [n for n in names if n not in saved]
        if missing:
            raise ValueError(f"covariance_file {path!r} has no covariance for layers {missing[:5]}.")
        return {n: saved[n] for n in names}
    if run_model is None:
        raise ValueError(
            "preprocess_corda needs run_model (a callable running the model on calibration data) unless "
            "corda_config.cache_file or corda_config.covariance_file already exists."
        )
    hooked = model if hooked_model is None else hooked_model
    hooked.eval()
    shared: dict = {}
    hooks = {n: CovarianceHook(corda.use_float16_for_covariance, shared) for n, _ in corda_targets(hooked, lora_config)}
    handles = [hooked.get_submodule(n).register_forward_hook(h) for n, h in hooks.items()]
    try:
        with torch.no_grad():
            run_model()
    finally:
        for handle in handles:
            handle.remove()
        shared.clear()
    covariances = {}
    for name in names:
        hook = hooks.get(name)
        if hook is None or hook.count == 0:
            raise ValueError(f"CorDA: layer {name!r} received no input while run_model ran; no covariance for it.")
        cov = hook.total / hook.count
        if not torch.isfinite(cov).all():
            raise ValueError(f"CorDA: the input covariance of layer {name!r} has NaN/inf; check the calibration data.")
        covariances[name] = cov
    if path is not None:
        _save(covariances, path)
    return covariances


def damped_inverse(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C', C'^-1) with C' = C + d * mean(diag C) * I, d = 0.01 doubled until C' C'^-1 is within 0.05 of I."""
    eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
    mean_diag = cov.diagonal().mean()
    damp = 0.01
    while damp < MAX_DAMPING:
        fixed = cov + eye * (mean_diag * damp)
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < INVERSE_TOLERANCE:
            return fixed, inverse
        damp *= 2
    raise ValueError("CorDA: the input covariance could not be made invertible by damping.")


def decompose(weight: torch.Tensor, damped: tuple[torch.Tensor, torch.Tensor], rank: int, method: str) -> CordaEigens:
    """Rank-r CorDA triplets of one layer.

    Args:
        weight: (out, in) float32; damped: (C', C'^-1) from ``damped_inverse``, (in, in) each;
        method: "ipm" (largest components) or "kpm" (smallest)
    """
    fixed, inverse = damped
    u, s, vh = torch.linalg.svd(weight @ fixed, full_matrices=False)  # (out, k), (k,), (k, in)
    keep = slice(None, rank) if method == "ipm" else slice(s.shape[0] - rank, None)
    v = (vh[keep] @ inverse).T  # (in, r)
    return CordaEigens(S_WC=s[keep].clone(), U_WC=u[:, keep].contiguous(), V_WC=v.contiguous())


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config,
    run_model: Callable[[], object] | None = None,
    hooked_model: nn.Module | None = None,
) -> None:
    """Compute and attach CorDA decompositions (``module.eigens``) to every layer ``lora_config`` targets.

    Args:
        model: the plain model that ``get_peft_model`` will wrap next.
        lora_config: a LoraConfig with ``init_lora_weights="corda"`` and a ``corda_config``.
        run_model: runs ``model`` (or ``hooked_model``) on calibration data; batches of any size (each row is one
            sample). Optional when the cache_file or covariance_file already exists.
        hooked_model: a different model (same module names) to collect the input statistics from.
    """
    from ..targeting import rank_and_alpha

    corda = lora_config.corda_config
    if corda is None:
        raise ValueError("preprocess_corda needs lora_config.corda_config (a CordaConfig).")
    targets = corda_targets(model, lora_config)
    if not targets:
        raise ValueError(f"preprocess_corda: target_modules {lora_config.target_modules!r} match no linear layer.")
    cache = corda.cache_file
    if cache is not None and os.path.exists(cache) and os.path.getsize(cache) > 0:
        _load_cache(targets, cache, _device(model))
        return
    covariances = collect_covariances(model, lora_config, run_model, hooked_model)
    same_input = find_identical(covariances)  # q/k/v share C: damp and invert it once
    damped: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    for name, module in _progress(targets, corda.verbose):
        rank = rank_and_alpha(lora_config, name)[0]
        weight = weight_2d(module).to(covariances[name].device)
        if rank > min(weight.shape):
            raise ValueError(f"CorDA: r={rank} exceeds the {tuple(weight.shape)} weight of layer {name!r}.")
        source = same_input.get(name, name)
        if damped is None or damped[0] != source:
            damped = (source, damped_inverse(covariances[source].float()))
        module.eigens = decompose(weight, damped[1], rank, corda.corda_method)
        if not corda.prune_temporary_fields:
            module.covariance_matrix, module.corda_method, module.rank = covariances[name], corda.corda_method, rank
    if cache is not None:
        _save({f"{n}.eigens.{f}": getattr(m.eigens, f) for n, m in targets for f in ("S_WC", "U_WC", "V_WC")}, cache)


def _load_cache(targets: list[tuple[str, nn.Module]], path: str, device: torch.device) -> None:
    saved = torch.load(path, map_location=device, weights_only=True)
    for name, module in targets:
        try:
            module.eigens = CordaEigens(*(saved[f"{name}.eigens.{f}"] for f in ("S_WC", "U_WC", "V_WC")))
        except KeyError:
            raise ValueError(f"CorDA cache_file {path!r} has no decomposition for layer {name!r}.") from None


def _save(tensors: dict[str, torch.Tensor], path: str) -> None:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    torch.save(tensors, path)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="CorDA decompositions")
