"""Activation quantization for W8A8 layers: int8 per token (dynamic) or per tensor (static), fp8 per token.

>>> codes, s = quantize_activation(torch.tensor([[1.0, -2.0, 0.5]]), "int8-dynamic")
>>> codes.tolist(), round(float(s), 5)
([[64, -127, 32]], 0.01575)
"""

from __future__ import annotations

import torch

ACT_SCHEMES = ("int8-dynamic", "int8-static", "fp8-dynamic")


def quantize_activation(x: torch.Tensor, act_scheme: str, static_scale: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of activations ``x`` (..., in): per token (dynamic) or one scale (static).

    int8: symmetric, codes in [-127, 127] as int8; fp8: e4m3fn values. Returns (codes, scale (..., 1)).
    """
    if act_scheme == "int8-static":
        if static_scale is None:
            raise ValueError("int8-static activations need a calibrated scale: run calibration first")
        s = static_scale.to(device=x.device, dtype=x.dtype).reshape(*([1] * x.dim()))
        return (x / s).round_().clamp_(-127, 127).to(torch.int8), s
    # max |x| per row as max(max x, -min x): the infinity norm's value, which took as long as the int8 products
    # in a profile of SmolLM2's W8A8 prefill (bench/RESULTS.md)
    amax = torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_()).clamp_(min=1e-8)
    if act_scheme == "int8-dynamic":
        s = amax.div_(127)
        return (x / s).round_().clamp_(-127, 127).to(torch.int8), s
    if act_scheme == "fp8-dynamic":
        s = amax / 448.0
        return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn), s
    raise ValueError(f"unknown activation scheme {act_scheme!r} (known: {', '.join(ACT_SCHEMES)})")


def smoothed(m, x: torch.Tensor) -> torch.Tensor:
    """``x`` divided by the layer's per-input-channel scale (SmoothQuant / unfoldable AWQ pairs), if any."""
    return x if m.input_scale is None else x / m.input_scale.to(device=x.device, dtype=x.dtype)
