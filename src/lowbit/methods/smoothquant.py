"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights.

For a layer group reading X, per input channel j: s_j = max|X_j|^α / max|W_j|^(1−α) (max over the
group's weights). X / s has tamer outliers, W · s absorbs them; X Wᵀ = (X / s)(W · s)ᵀ exactly in float.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from lowbit.core.scheme import Scheme
from lowbit.methods.registry import LayerStats, MethodConfig, QuantResult, get_method, register_method


def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """Smoothing factors s (in,) for activations with per-channel max |x| ``act_absmax`` (in,).

    >>> smooth_scales(torch.tensor([10.0, 1.0]), [torch.ones(3, 2)], alpha=0.5)
    tensor([3.1623, 1.0000])
    """
    w_absmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)  # (in,)
    a = act_absmax.to(torch.float32).clamp(min=1e-5)
    s = a.pow(alpha) / w_absmax.to(torch.float32).clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


@dataclass(frozen=True)
class SmoothOptions:
    alpha: float = field(default=0.5, metadata={"help": "migration strength in [0, 1]"})


@register_method("smoothquant", transform="smooth", options=SmoothOptions,
                 layouts=("affine",), act="int8-dynamic")
def smoothquant(weight: torch.Tensor, stats: LayerStats, scheme: Scheme, config: MethodConfig) -> QuantResult:
    """The weight half of SmoothQuant W8A8: RTN of the (already smoothed) weight; activations are quantized
    at run time as ``config.options['act']`` says (default int8 per token)."""
    return get_method("rtn")(weight, stats, scheme, replace(config, options={
        k: v for k, v in config.options.items() if k not in SmoothOptions.__dataclass_fields__}))
