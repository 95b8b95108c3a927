"""Layer 4: model transforms (architecture table, plans, calibration runner, quantized modules)."""
