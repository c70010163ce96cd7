"""Sub-configurations of LoraConfig, one dataclass per feature, with PEFT's field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class LoftQConfig:
    """LoftQ initialisation (arXiv:2310.08659): quantise, then fit the residual with a rank-r SVD."""

    loftq_bits: int = field(default=4, metadata={"help": "Quantisation bits of the base weight (4 or 8)."})
    loftq_iter: int = field(default=1, metadata={"help": "Alternating quantise / SVD iterations."})

    def __post_init__(self) -> None:
        if self.loftq_bits not in (2, 4, 8):
            raise ValueError(f"LoftQConfig.loftq_bits must be 2, 4 or 8, got {self.loftq_bits!r}.")
        if self.loftq_iter < 1:
            raise ValueError(f"LoftQConfig.loftq_iter must be >= 1, got {self.loftq_iter!r}.")


@dataclass
class EvaConfig:
    """EVA initialisation (arXiv:2410.07170): A from the SVD of layer inputs, ranks redistributed by variance."""

    rho: float = field(default=2.0, metadata={"help": "Cap on a layer's rank after redistribution: r * rho."})
    tau: float = field(default=0.99, metadata={"help": "Cosine similarity at which components count as converged."})
    use_label_mask: bool = field(default=True, metadata={"help": "Ignore tokens whose label is label_mask_value."})
    label_mask_value: int = field(default=-100, metadata={"help": "Label value of ignored tokens."})
    whiten: bool = field(default=False, metadata={"help": "Scale A's rows by the inverse singular values."})
    adjust_scaling_factors: bool = field(
        default=True, metadata={"help": "Rescale alpha with the new rank so the scaling stays alpha / r."}
    )

    def __post_init__(self) -> None:
        if self.rho < 1.0:
            raise ValueError(f"EvaConfig.rho must be >= 1.0, got {self.rho!r}.")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"EvaConfig.tau must be in [0, 1], got {self.tau!r}.")


@dataclass
class CordaConfig:
    """CorDA initialisation (arXiv:2406.05223): SVD of W times the input covariance."""

    cache_file: str | None = field(default=None, metadata={"help": "File caching the decomposition."})
    covariance_file: str | None = field(default=None, metadata={"help": "File caching the input covariances."})
    corda_method: Literal["ipm", "kpm"] = field(
        default="ipm", metadata={"help": "ipm keeps the largest components, kpm the smallest."}
    )
    verbose: bool = field(default=False, metadata={"help": "Print progress."})
    use_float16_for_covariance: bool = field(default=False, metadata={"help": "Accumulate covariances in fp16."})
    prune_temporary_fields: bool = field(default=True, metadata={"help": "Drop the covariances after init."})

    def __post_init__(self) -> None:
        if self.corda_method not in ("ipm", "kpm"):
            raise ValueError(f"CordaConfig.corda_method must be 'ipm' or 'kpm', got {self.corda_method!r}.")


@dataclass
class ArrowConfig:
    """Arrow routing over a library of LoRA experts (arXiv:2405.11157); GenKnowSub with use_gks."""

    top_k: int = field(default=3, metadata={"help": "Experts kept per token."})
    router_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the router."})
    use_gks: bool = field(default=False, metadata={"help": "Subtract general-knowledge adapters (GenKnowSub)."})
    task_adapter_names: list[str] | None = field(default=None, metadata={"help": "Filled by create_arrow_model."})
    gks_adapter_names: list[str] | None = field(default=None, metadata={"help": "Filled by create_arrow_model."})
    rng_seed: int | None = field(default=None, metadata={"help": "Seed for reproducible prototypes."})

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"ArrowConfig.top_k must be >= 1, got {self.top_k!r}.")
        if self.router_temperature <= 0:
            raise ValueError(f"ArrowConfig.router_temperature must be > 0, got {self.router_temperature!r}.")


@dataclass
class LoraRuntimeConfig:
    """Settings that affect only this process; never written to adapter_config.json."""

    ephemeral_gpu_offload: bool = field(
        default=False,
        metadata={"help": "Move CPU-offloaded weights to the GPU for expensive one-off work (DoRA init)."},
    )


SUB_CONFIGS: dict[str, type] = {
    "loftq_config": LoftQConfig,
    "eva_config": EvaConfig,
    "corda_config": CordaConfig,
    "arrow_config": ArrowConfig,
}
"""LoraConfig field -> dataclass that a dict read from JSON is turned into."""
