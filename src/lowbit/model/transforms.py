"""Function-preserving rescaling of layer pairs (AWQ, SmoothQuant).

``fold_scales(block, prev, layers, s)``: multiply the input channels of ``layers`` by ``s`` and divide the
output of ``prev`` (a norm's weight and bias, or a linear's rows) by ``s``, so the block computes the same
function in float. Which pairs may be folded is data (``ArchInfo.scale_pairs``).
"""

from __future__ import annotations

import torch
from torch import nn


def _is_conv1d(m: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(m, Conv1D)


def out_channels(prev: nn.Module) -> int | None:
    """How many output channels ``prev`` produces, when a per-channel scale can be folded into it."""
    w = getattr(prev, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    if isinstance(prev, nn.Linear):
        return prev.out_features
    if _is_conv1d(prev):
        return w.shape[1]
    if w.dim() == 1:  # RMSNorm / LayerNorm
        return w.numel()
    return None


def in_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in), a view (Conv1D stores (in, out))."""
    return layer.weight.T if _is_conv1d(layer) else layer.weight


@torch.no_grad()
def fold_scales(prev: nn.Module, layers: list[nn.Module], s: torch.Tensor) -> bool:
    """Apply input-channel scales ``s`` (in,) to ``layers`` and 1/s to ``prev``; False if they don't fit."""
    n = out_channels(prev)
    if n != s.numel() or any(in_weight(m).shape[1] != n for m in layers):
        return False
    s = s.to(prev.weight.dtype)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s[:, None])
    elif _is_conv1d(prev):
        prev.weight.div_(s[None, :])
    else:
        prev.weight.div_(s)
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s)
    for m in layers:
        in_weight(m).mul_(s[None, :])
    return True
