"""Prefill on CPUs with native bf16 (AVX512-BF16, AMX) for the layouts no packed kernel takes (int3, int2,
q6_k, q5_k, nf4, fp8 …): dequantize the weight per call as the reference does, then one bf16 GEMM with
float32 accumulation instead of a float32 one. bench/kernel_speed.py measured it ahead of the reference at 128
and 512 tokens (int4 and int8 weights of SmolLM2's and 7B's shapes); ``MIN_TOKENS`` (17) is a choice, not a
measured crossover. The bf16 roundings of the weight and the activations (≤ 2⁻⁹ relative each) are its
only difference from the reference. The packed int4/int8 kernels rank above it where they serve.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.kernels.base import Kernel, register_kernel
from lowbit.kernels.cpu import native_bf16

MIN_TOKENS = 17


def _serves(m) -> bool:
    return (native_bf16() and m.act_scheme is None and m.input_scale is None
            and m.qweight_codes.device.type == "cpu")


def _run(m, state, x: torch.Tensor) -> torch.Tensor:
    w = m.qweight.dequantize(torch.bfloat16)
    y = F.linear(x.to(torch.bfloat16), w).to(torch.float32)
    if m.bias is not None:
        y = y + m.bias.to(torch.float32)
    return y.to(x.dtype)


register_kernel(Kernel("bf16-gemm", 15, _serves, _run, min_tokens=MIN_TOKENS,
                       dtypes=(torch.float32, torch.bfloat16),
                       doc="dequantize to bf16 per call, bf16 GEMM (prefill)"))
