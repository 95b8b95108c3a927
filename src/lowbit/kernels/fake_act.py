"""The reference for quantized activations: quantize→dequantize ``x`` (per token or static), then the float
matmul with the dequantized weight. Serves every layer with an activation scheme."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.kernels.activations import quantize_activation, smoothed
from lowbit.kernels.base import Kernel, register_kernel


def _run(m, state, x: torch.Tensor) -> torch.Tensor:
    x = smoothed(m, x)
    codes, s = quantize_activation(x, m.act_scheme, m.act_scale)
    xq = codes.to(x.dtype) * s
    return F.linear(xq, m.qweight.dequantize(x.dtype), None if m.bias is None else m.bias.to(x.dtype))


register_kernel(Kernel("fake-act", 0, lambda m: m.act_scheme is not None, _run, reference=True,
                       doc="activations quantized then dequantized, float matmul (the W8A8 reference)"))
