"""Integrations with other libraries. Each submodule imports its library lazily (only when it is imported):

- ``lorakit.integrations.transformers``: ``LorakitTrainer`` / ``LorakitTrainerMixin`` for transformers' Trainer.
- ``lorakit.integrations.checkpointing``: gradient checkpointing of a lorakit model (no third-party import).
"""
