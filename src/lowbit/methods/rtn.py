"""Round-to-nearest: choose each group's range with an observer, then round every weight."""

from __future__ import annotations

import torch

from lowbit.core.qtensor import QTensor
from lowbit.core.scheme import Scheme
from lowbit.errors import LowbitError
from lowbit.methods.registry import LayerStats, MethodConfig, QuantResult, register_method
from lowbit.primitives.observers import get_observer
from lowbit.primitives.quant import group_view


def importance_view(sq_mean: torch.Tensor, shape: tuple[int, ...], scheme: Scheme) -> torch.Tensor:
    """Per-input-channel importance ``(in,)`` broadcast to the grouped view ``(1|R, G, g)``."""
    rows = shape[0] if len(shape) > 1 else 1
    w = sq_mean.to(torch.float32).reshape(1, -1).expand(rows, -1)
    if scheme.granularity == "tensor":
        return group_view(w, "tensor")
    return group_view(w[:1], "group" if scheme.granularity == "group" else "channel", scheme.group_size)


def quantize_rtn(
    weight: torch.Tensor, scheme: Scheme, observer: str = "minmax", importance: torch.Tensor | None = None
) -> QTensor:
    grid = scheme.grid
    xg = group_view(weight, scheme.granularity, scheme.group_size)
    if grid.has_scale:
        imp = None if importance is None else importance_view(importance, tuple(weight.shape), scheme)
        lo, hi = get_observer(observer)(xg, grid, imp)
        # min/max propagate NaN and Inf, so checking the ranges checks every weight for free.
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise LowbitError("the tensor holds NaN or Inf values")
    else:
        lo = hi = None
    s, z = grid.qparams(lo, hi) if grid.has_scale else (None, None)
    return QTensor.from_grouped(grid.encode(xg, s, z), s, z, tuple(weight.shape), weight.dtype, scheme)


@register_method("rtn")
def rtn(weight: torch.Tensor, stats: LayerStats, scheme: Scheme, config: MethodConfig) -> QuantResult:
    imp = stats.sq_mean if config.importance and stats.sq_mean is not None else None
    q = quantize_rtn(weight, scheme, config.observer, imp)
    return QuantResult(q)
