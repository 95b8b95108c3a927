"""W8A8: int8 activations (per token or static) × int8 per-channel weights, int32 accumulation
(``torch._int_mm``, oneDNN/VNNI on CPU), rescaled per token and channel in float32."""

from __future__ import annotations

import torch

from lowbit.kernels.activations import quantize_activation, smoothed
from lowbit.kernels.base import Kernel, register_kernel


def w8_per_channel(m) -> bool:
    """Symmetric int8 per output channel: the weight the int8 GEMMs take as it is."""
    sch = m.qweight.scheme
    return sch.format == "int8" and sch.symmetric and sch.granularity == "channel"


def int8_weight(m) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed int8 codes ``(out, in)`` and float32 scales ``(out,)`` of a per-channel int8 layer."""
    grouped = m.qweight.codes_grouped().reshape(m.out_features, -1)[:, : m.in_features]
    codes = (grouped.to(torch.int16) - 128).to(torch.int8).contiguous()  # stored codes are offset by 128
    return codes, m.qweight.qparams()[0].reshape(-1)


def _prepare(m):
    codes, scale = int8_weight(m)
    return codes.T.contiguous(), scale.reshape(1, -1)  # (in, out), (1, out)


def _run(m, state, x: torch.Tensor) -> torch.Tensor:
    w_t, w_scale = state
    x = smoothed(m, x)
    lead = x.shape[:-1]
    codes, s = quantize_activation(x.reshape(-1, x.shape[-1]), m.act_scheme, m.act_scale)
    acc = torch._int_mm(codes, w_t)  # (tokens, out) int32
    y = acc.to(torch.float32).mul_(s.to(torch.float32)).mul_(w_scale)
    if m.bias is not None:
        y = y.add_(m.bias)
    return y.to(x.dtype).reshape(*lead, m.out_features)


def _serves(m) -> bool:  # torch._int_mm elsewhere has size and layout rules of its own
    return (m.act_scheme in ("int8-dynamic", "int8-static") and w8_per_channel(m)
            and m.qweight_codes.device.type == "cpu")


def KERNEL_STATE(m):  # noqa: N802  (int8-int8's packed weight, made once: int8-int8-cpp falls back to it)
    from lowbit.kernels.base import KERNELS, prepared

    return prepared(m, KERNELS.get("int8-int8"))


register_kernel(Kernel("int8-int8", 10, _serves, _run, prepare=_prepare,
                       doc="int8 activations x int8 weights, int32 accumulation (torch._int_mm)"))
