"""The reference: dequantize the weight into the activation dtype, then the float op. Serves every layer
without activation quantization, on every device, at every batch size; every fast kernel is tested
against it."""

from __future__ import annotations

import torch

from lowbit.kernels.activations import smoothed
from lowbit.kernels.base import Kernel, register_kernel


def _run(m, state, x: torch.Tensor) -> torch.Tensor:
    return m.linear_with(smoothed(m, x), m.qweight.dequantize(x.dtype))


register_kernel(Kernel("dequantize", 0, lambda m: m.act_scheme is None, _run, reference=True,
                       doc="dequantize the weight per call, float matmul (the reference)"))
