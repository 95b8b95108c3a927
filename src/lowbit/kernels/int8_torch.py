"""Weight-only int8 per output channel through torch's ``_weight_int8pack_mm`` (CPU), at every batch size.

bf16 activations and scales, float32 accumulation (its float32-activation path is 25-100× slower, so it
is never used); the same bf16 roundings as ``int4-torch``. Serves symmetric per-channel ``int8``.
"""

from __future__ import annotations

import torch

from lowbit.kernels.base import Kernel, register_kernel, run_packed_bf16
from lowbit.kernels.int8_int8 import int8_weight, w8_per_channel


def _serves(m) -> bool:
    # rows of a multiple of 16 only: torch 2.13's kernel returns garbage (or crashes) on an AVX-512 CPU otherwise
    return (m.act_scheme is None and m.input_scale is None and m.qweight_codes.device.type == "cpu"
            and w8_per_channel(m) and m.in_features % 16 == 0)


def _prepare(m):
    codes, scale = int8_weight(m)
    bias = None if m.bias is None else m.bias.detach().to(torch.float32)
    return codes, scale.to(torch.bfloat16), bias


def _run(m, state, x: torch.Tensor) -> torch.Tensor:
    codes, scale, bias = state
    return run_packed_bf16(m, x, lambda xb: torch.ops.aten._weight_int8pack_mm(xb, codes, scale),
                           lambda cols: codes[:, cols].to(torch.float32) * m.qweight.qparams()[0].reshape(-1, 1),
                           bias)


register_kernel(Kernel("int8-torch", 20, _serves, _run, prepare=_prepare,
                       dtypes=(torch.float32, torch.bfloat16, torch.float16),
                       doc="weight-only int8 per channel, torch's packed CPU kernel (bf16 activations)"))
