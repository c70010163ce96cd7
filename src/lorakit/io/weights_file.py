"""An adapter weights file (``adapter_model.safetensors`` or ``.bin``): written with the text of its config as
metadata (see ``io.binding``), read back as (tensors, metadata), and its values checked before a model takes them.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from .binding import BIN_METADATA_ATTR, METADATA_KEY

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
WEIGHTS_NAMES = (SAFETENSORS_NAME, BIN_NAME)
_FP8 = frozenset(getattr(torch, n) for n in dir(torch) if n.startswith("float8_"))


def write_weights(path: Path, tensors: dict[str, torch.Tensor], safe: bool, config_text: str) -> None:
    """Write CPU ``tensors`` to ``path`` as safetensors (``safe``) or a torch pickle, naming ``config_text``."""
    cpu = {k: v.cpu() for k, v in tensors.items()}
    if safe:
        from safetensors.torch import save_file

        save_file(cpu, str(path), metadata={"format": "pt", METADATA_KEY: config_text})
    else:
        ordered = OrderedDict(cpu)  # torch.load(weights_only=True) restores an OrderedDict's attributes; PEFT ignores
        setattr(ordered, BIN_METADATA_ATTR, {METADATA_KEY: config_text})
        torch.save(ordered, path)


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on the CPU, metadata) of a weights file; ValueError naming the file when it cannot be parsed."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as fh:
                metadata = dict(fh.metadata() or {})
                tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open is no dict)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(loaded, dict):
                raise TypeError(f"it holds a {type(loaded).__name__}, not a dict of tensors")
            metadata = dict(getattr(loaded, BIN_METADATA_ATTR, None) or {})
            tensors = dict(loaded)
    except Exception as err:
        raise ValueError(
            f"Could not read adapter weights from {path}: the file is corrupt or truncated ({type(err).__name__}: "
            f"{err})."
        ) from None
    not_tensors = sorted(k for k, v in tensors.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{path} holds values that are not tensors under {not_tensors[:5]}; it is no adapter file.")
    return tensors, metadata


def check_values(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse tensors an adapter cannot hold: integer, bool or complex dtypes (copying would cast them silently) and
    NaN or infinite values; warn for float8 ones, which are widened to the model's dtype."""
    bad_dtype = {k: v.dtype for k, v in tensors.items() if not v.dtype.is_floating_point}
    if bad_dtype:
        shown = ", ".join(f"{k} ({str(d).removeprefix('torch.')})" for k, d in sorted(bad_dtype.items())[:5])
        raise ValueError(
            f"Adapter {source} holds {len(bad_dtype)} tensors that are not floating point: {shown}. Adapter weights "
            "are float32, float16 or bfloat16; the file was not written by save_pretrained or was altered."
        )
    fp8 = sorted(k for k, v in tensors.items() if v.dtype in _FP8)
    if fp8:
        warnings.warn(
            f"Adapter {source} stores {len(fp8)} tensors in float8 (e.g. {fp8[0]!r}); they are widened to the "
            "model's dtype, with float8's precision.",
            stacklevel=4,
        )
    non_finite = sorted(k for k, v in tensors.items() if not _finite(v))
    if non_finite:
        raise ValueError(
            f"Adapter {source} holds NaN or infinite values in {len(non_finite)} tensors: {non_finite[:5]}. Loading "
            "them would make every output NaN; the training that wrote them diverged or the file is damaged."
        )


def _finite(tensor: torch.Tensor) -> bool:
    if tensor.is_meta or not tensor.numel():
        return True
    return bool(torch.isfinite(tensor.float() if tensor.dtype in _FP8 else tensor).all())
