"""The float matmul with the weight dequantized once by ``QLinear.cache_weight()`` (float memory for speed:
what calibration uses while it runs a block several times). The same values as the reference."""

from __future__ import annotations

import torch

from lowbit.kernels.activations import smoothed
from lowbit.kernels.base import Kernel, register_kernel


def _serves(m) -> bool:
    return m.act_scheme is None and m.weight_cache is not None


def _run(m, state, x: torch.Tensor) -> torch.Tensor:
    return m.linear_with(smoothed(m, x), m.weight_cache)


register_kernel(Kernel("cached-weight", 1000, _serves, _run, reference=True,
                       accepts=lambda m, x: m.weight_cache.dtype == x.dtype,  # a cache in another dtype: unused
                       doc="the weight dequantized once by cache_weight()", measured=False))
