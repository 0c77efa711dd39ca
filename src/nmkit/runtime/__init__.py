"""Lean decode runtime: a whole Llama-family forward pass per C call, token generation, serving.

``Engine(model, weights="int4")`` packs a (pruned) Hugging Face model; :func:`generate` streams tokens.
"""

from nmkit.runtime.engine import Engine, EngineInfo
from nmkit.runtime.generate import Sampling, complete, generate

__all__ = ["Engine", "EngineInfo", "Sampling", "complete", "generate"]
