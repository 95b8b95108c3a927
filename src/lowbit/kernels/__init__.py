"""Kernels: how a quantized layer computes, one registered file each (see :mod:`lowbit.kernels.base`).

>>> sorted(k for k in kernel_names() if KERNELS[k].reference)
['cached-weight', 'dequantize', 'fake-act']
"""

from lowbit.kernels import (  # noqa: F401
    bf16_gemm,
    cached,
    cpp_bf16_gemm,
    dequantize,
    fake_act,
    fake_act_cpp_gemm,
    grid8_cpp,
    grid8_cpp_gemm,
    int4_cpp,
    int4_cpp_gemm,
    int4_torch,
    int8_cpp,
    int8_cpp_gemm,
    int8_int8,
    int8_int8_cpp,
    int8_torch,
    tuning,
)
from lowbit.kernels.activations import ACT_SCHEMES, quantize_activation
from lowbit.kernels.base import (
    KERNELS,
    Kernel,
    candidates,
    choose,
    dispatch,
    kernel_mode,
    kernel_names,
    register_kernel,
    use_kernels,
)

__all__ = ["ACT_SCHEMES", "KERNELS", "Kernel", "candidates", "choose", "dispatch", "kernel_mode", "kernel_names",
           "quantize_activation", "register_kernel", "use_kernels"]
