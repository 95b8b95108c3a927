"""Layer 1: pure functions on tensors (number formats, packing, quantize/dequantize, observers)."""
