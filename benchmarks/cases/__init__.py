"""Benchmark cases of ``benchmarks/run.py``: one module per group (training, prefill, decode, layer)."""
