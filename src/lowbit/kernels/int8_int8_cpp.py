"""W8A8 at 1..16 tokens through lowbit's C++ GEMV (:mod:`lowbit.kernels.native`): int8 activations (per token,
or the layer's static scale) × int8 per-channel weights, exact int32 dot products (AVX2 ``vpmaddubsw`` on
``|q|`` and the weight with ``q``'s signs; ``vpdpbusd`` with AVX512-VNNI), ``y = acc·s·w_scale + bias`` in
float32.

The activation codes are computed as :func:`lowbit.kernels.activations.quantize_activation` computes them
(the same float32 divisions, round half to even, clamp to ±127) and the products are exact, so the output
is ``int8-int8``'s (``torch._int_mm``) bit for bit, and differs from the ``fake-act`` reference only by that
reference's float32 summation. It exists because ``torch._int_mm`` is slow on CPUs without VNNI (on a 2-core
AVX2 AMD EPYC SmolLM2 W8A8 decoded at a third of float32's speed through it: bench/RESULTS.md). Inputs
holding inf or NaN run ``int8-int8`` instead; weights with a code of −128 (which the sign trick cannot
negate; lowbit's symmetric int8 stores ±127) are not served. Layers with a SmoothQuant input scale divide
by it first, as every W8A8 kernel does.
"""

from __future__ import annotations

import torch

from lowbit.kernels import int8_int8, native
from lowbit.kernels.activations import smoothed
from lowbit.kernels.base import Kernel, prepared, register_kernel


def _serves(m) -> bool:
    return (m.act_scheme in ("int8-dynamic", "int8-static") and int8_int8.w8_per_channel(m)
            and m.qweight_codes.device.type == "cpu" and m.in_features % 32 == 0 and native.library() is not None)


def _prepare(m):
    codes, scale = int8_int8.int8_weight(m)
    if int(codes.min()) < -127:
        return None
    bias = None if m.bias is None else m.bias.detach().to(torch.float32).contiguous()
    return codes.contiguous(), scale.to(torch.float32).contiguous(), bias, native.ISAS.index(native.best_isa())


def _static(m) -> float:
    if m.act_scheme != "int8-static":
        return 0.0
    if m.act_scale is None:
        raise ValueError("int8-static activations need a calibrated scale: run calibration first")
    return float(m.act_scale.reshape(-1)[0])


def _gemv(state, static: float, fallback):
    codes, scale, bias, isa = state
    lib = native.library()

    def run(x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
        y = lib.a8w8_gemv(xf, codes, scale, bias, static, isa)
        if y.numel() == 0 and codes.shape[0]:
            return fallback(x)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    run.static = static
    return run


def _run(m, state, x: torch.Tensor) -> torch.Tensor:
    if state is None:
        return int8_int8._run(m, int8_int8.KERNEL_STATE(m), x)
    return _gemv(state, _static(m), lambda x_: int8_int8._run(m, int8_int8.KERNEL_STATE(m), x_))(smoothed(m, x))


def _fuse(mods):
    """One GEMV over layers reading one input (no SmoothQuant input scale, one static scale if static); each
    layer's state becomes a view of its rows of the stacked one."""
    states = [prepared(m, KERNEL) for m in mods]
    statics = {_static(m) for m in mods}
    if any(s is None for s in states) or any(m.input_scale is not None for m in mods) or len(statics) != 1 \
            or len({s[3] for s in states}) != 1:
        return None
    static = statics.pop()

    def gemv(state, out, cols_of):
        return _gemv(state, static,
                     lambda x: torch.cat([int8_int8._run(m, int8_int8.KERNEL_STATE(m), x) for m in mods], -1))

    return native.stack_states(mods, states, KERNEL.name, (0, 1), 2, gemv, None)


KERNEL = register_kernel(Kernel("int8-int8-cpp", 30, _serves, _run, prepare=_prepare, max_tokens=native.MAX_TOKENS,
                       dtypes=(torch.float32, torch.bfloat16, torch.float16), fuse=_fuse,
                       doc="W8A8: int8 activations x int8 per-channel weights, lowbit's C++ GEMV, 1-16 tokens"))
