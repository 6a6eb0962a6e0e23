"""Inference: the engine contract, the torch and null engines, the dynamic batcher and the registry
that swaps engines on reload. Knows no HTTP."""
