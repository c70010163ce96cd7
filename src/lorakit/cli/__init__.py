"""The ``lorakit`` command line: one module per subcommand (train, generate, merge, inspect, demo), ``main.main``.

Subcommand modules import torch and transformers inside their ``run`` functions, so ``lorakit --help`` is fast.
"""
