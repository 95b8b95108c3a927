"""Layer 2: schemes (how a tensor is quantized) and QTensor (a quantized tensor)."""
