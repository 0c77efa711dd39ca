"""Quantization of kept N:M values (INT8 / INT4 with fp16 scales per group of 64-input blocks)."""

from nmkit.quant.nm_quant import QuantSpec, dequantize, quantize_kept

__all__ = ["QuantSpec", "dequantize", "quantize_kept"]
