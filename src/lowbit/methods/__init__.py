"""Layer 3: quantization methods, pure functions ``(weight, stats, scheme) -> QuantResult``."""

from lowbit.methods.registry import LayerStats, MethodConfig, QuantResult, get_method, method_names, register_method

# Importing the method modules fills the registry.
from lowbit.methods import awq, gptq, hqq, qat, rtn, smoothquant  # noqa: F401,E402  isort: skip

__all__ = ["LayerStats", "MethodConfig", "QuantResult", "get_method", "method_names", "register_method"]
