"""Round-to-nearest: choose each group's range with an observer, then round every weight."""

from __future__ import annotations

import torch

from lowbit.core.qtensor import QTensor
from lowbit.core.scheme import Scheme
from lowbit.layouts import layout_of
from lowbit.layouts.affine import importance_view  # noqa: F401  (re-exported: methods weigh by it)
from lowbit.methods.registry import LayerStats, MethodConfig, QuantResult, register_method


def quantize_rtn(
    weight: torch.Tensor, scheme: Scheme, observer: str = "minmax", importance: torch.Tensor | None = None
) -> QTensor:
    """Round ``weight`` onto ``scheme``'s layout with the grid its fit chooses (the observer's range for
    grouped schemes, the block search for GGML types), weighting each input channel by ``importance``."""
    return layout_of(scheme).quantize(weight, scheme, importance, observer)


@register_method("rtn")
def rtn(weight: torch.Tensor, stats: LayerStats, scheme: Scheme, config: MethodConfig) -> QuantResult:
    """Round to nearest on the grid the layout fits (an observer's range; a GGML type's block search)."""
    imp = stats.sq_mean if config.importance and stats.sq_mean is not None else None
    q = quantize_rtn(weight, scheme, config.observer, imp)
    return QuantResult(q)
