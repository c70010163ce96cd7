"""Integrations with other libraries. Each submodule imports its library lazily (only when it is imported):

- ``lorakit.integrations.transformers``: ``LorakitTrainer`` / ``LorakitTrainerMixin`` for transformers' Trainer.
- ``lorakit.integrations.checkpointing``: gradient checkpointing of a lorakit model (no third-party import).
- ``lorakit.integrations.cuda_graphs``: ``CudaGraphStep``, a training step's forward + backward captured once as a
  CUDA graph and replayed (no host time per layer; eager off CUDA).
- ``lorakit.integrations.causal_sdpa``: ``use_causal_sdpa(model)``, transformers' SDPA attention whose causal mask
  stays ``is_causal`` inside a CUDA-graph capture on every transformers release.
- ``lorakit.integrations.distributed``: FSDP2 sharding per decoder layer (``shard_lora_model``) and gathering only the
  adapter tensors from the shards to save (``gather_adapter_state_dict``); DDP needs no helper.
"""
