"""Prefill on CPUs with native bf16 (AVX512-BF16, AMX) for the layers lowbit's C++ GEMVs pack (int4 groups,
per-channel int8, and ``grid8-cpp``'s affine grids): the packed weight dequantized in row tiles by the C++
library (``q4_tile`` / ``q8_tile`` / ``g8_tile``, the float32 tiles of the ``*-cpp-gemm`` kernels, bit for bit
the stored weight), each tile rounded to bf16 and multiplied with the bf16 activations by torch's bf16 GEMM
(oneDNN; AMX tiles where the CPU has them), float32 accumulation inside it.

The state is the GEMV's own packed object (``prepared(m, KERNELS[…])``): no second copy of the weights. The
float32 tiled GEMMs (``int4-cpp-gemm`` …) spend their time in float32 sgemm, as float32 itself does, so they
cannot beat float32 at prefill; on AMX a bf16 GEMM is several times a float32 one (bench/RESULTS.md).

Priority 22: below the exact float32 tiles (``int4-cpp-gemm`` 25 …), so with ``LOWBIT_KERNEL_TUNING=off`` the
float32 arithmetic runs; with tuning on (the default) this kernel runs where it is measured faster.

Arithmetic: the bf16 roundings of the weight and the activations (≤ 2⁻⁹ relative each) and the bf16 rounding
of each output (the GEMM's result type): the same as ``bf16-gemm``, which dequantizes the whole weight through
the reference per call instead (3.5–7 ns per weight, against the tiles' 0.1–0.15). Activations above
``HUGE_ACTIVATION`` (and inf, NaN) take the float32 tiles instead, as every C++ kernel's huge rows do.
"""

from __future__ import annotations

import torch

from lowbit.kernels import grid8_cpp, int4_cpp, int8_cpp, native
from lowbit.kernels.base import KERNELS, Kernel, exceeds, prepared, register_kernel
from lowbit.kernels.cpu import native_bf16

MIN_TOKENS = 17
TILE_WEIGHTS = 1 << 20  # weights per tile: 4 MiB as float32, 2 MiB as bf16


def _source(m) -> str | None:
    """The GEMV whose packed state this layer's tiles come from."""
    for k in (int4_cpp.KERNEL, int8_cpp.KERNEL, grid8_cpp.KERNEL):
        if k.serves(m):
            return k.name
    return None


def _serves(m) -> bool:
    return native_bf16() and _source(m) is not None


def _prepare(m):
    name = _source(m)
    return name, prepared(m, KERNELS[name])


def _tile(name: str, state, n0: int, n1: int) -> torch.Tensor:
    lib = native.library()
    if name == "int8-cpp":
        codes, scale = state[0], state[1]
        return lib.q8_tile(codes, scale, n0, n1)
    codes, scale, minv, g = state[:4]
    return (lib.q4_tile if name == "int4-cpp" else lib.g8_tile)(codes, scale, minv, g, n0, n1)


def _bias(name: str, state) -> torch.Tensor | None:
    return state[3] if name == "int8-cpp" else state[4]


def _run(m, st, x: torch.Tensor) -> torch.Tensor:
    name, state = st
    x2 = x.reshape(-1, x.shape[-1])
    if exceeds(x2):  # huge, inf or NaN: the float32 tiles' arithmetic
        return KERNELS[f"{name}-gemm"].run(m, state, x)
    xb = x2.to(torch.bfloat16).contiguous()
    N, K = m.out_features, m.in_features
    y = torch.empty(xb.shape[0], N, dtype=torch.float32)
    rows = max(16, TILE_WEIGHTS // max(1, K) // 16 * 16)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        y[:, n0:n1] = torch.mm(xb, _tile(name, state, n0, n1).to(torch.bfloat16).T)
    bias = _bias(name, state)
    if bias is not None:
        y += bias
    y = y.view(*x.shape[:-1], N)
    return y if y.dtype == x.dtype else y.to(x.dtype)


KERNEL = register_kernel(Kernel("cpp-bf16-gemm", 22, _serves, _run, prepare=_prepare, min_tokens=MIN_TOKENS,
                                dtypes=(torch.float32, torch.bfloat16),
                                doc="C++ GEMVs' packed weights in row tiles, rounded to bf16, bf16 GEMM (prefill, "
                                    "CPUs with native bf16)"))
