"""Fast paths for LoRA: a fused training/inference linear node and gathered multi-adapter kernels.

One file per concept, each fast path beside its reference implementation:

| file | fast path | reference |
| --- | --- | --- |
| ``lora_linear.py`` | ``fused_lora_linear`` (one autograd node, epilogue add) | ``reference_lora_linear`` |
| ``shared_input_linear.py`` | ``shared_input_lora`` (one node for the layers reading one input) | per-layer nodes |
| ``quantised_linear.py`` | ``quantised_lora`` (bitsandbytes bases; groups) | ``reference_quantised_lora`` |
| ``gathered.py`` | ``gathered_lora`` (gather + bmm, CPU and CUDA) | ``reference_gathered_lora`` |
| ``sgmv_triton.py`` | ``triton_gathered_lora`` (Triton SGMV/BGMV, CUDA) | ``reference_gathered_lora`` |
| ``adapter_stack.py`` | stacked / cast adapter caches with invalidation | — |
| ``linear_dispatch.py``, ``mixed_dispatch.py`` | when a fast path may run (capability checks) | the layers' own paths |
| ``quantised_dispatch.py`` | the same for quantised bases | the bitsandbytes layers' path |
| ``shared_inputs.py`` | which layers of a model call share an input (learned per call) | — |
| ``node_output.py`` | outputs the caller may edit in place (no views; DoRA's kept y checked for edits) | — |

``use_reference()`` / ``set_reference_mode(True)`` force the reference paths (tests, debugging).
Triton is imported lazily, only on CUDA.
"""

from .adapter_stack import clear_caches
from .switch import fast_paths_enabled, set_reference_mode, triton_available, use_reference

__all__ = ["clear_caches", "fast_paths_enabled", "set_reference_mode", "triton_available", "use_reference"]
