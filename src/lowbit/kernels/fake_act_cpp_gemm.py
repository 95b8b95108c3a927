"""W8A8 layers above 8 tokens (prefill) in the reference's own arithmetic, fast: the activations quantized and
dequantized per token (or with the static scale) exactly as ``fake-act`` does, then ``int8-cpp-gemm``'s float32
GEMM over the weight dequantized in L2-sized row tiles (bit-identical to the reference's dequantized weight).
So the output differs from ``fake-act`` by float32 summation order only. It exists because on CPUs without
VNNI ``torch._int_mm`` (``int8-int8``) is slower than float32 and ``fake-act`` dequantizes the whole weight
per call (SmolLM2 W8A8 prefill ran at 0.6–0.8× float32 on a 2-core AVX2 EPYC through them: bench/RESULTS.md).
Priority 12: above ``int8-int8`` (10); under measured kernel choice the faster runs.
"""

from __future__ import annotations

import torch

from lowbit.kernels import int8_int8, native
from lowbit.kernels.activations import quantize_activation, smoothed
from lowbit.kernels.base import KERNELS, Kernel, prepared, register_kernel

MIN_TOKENS = native.GEMM_MIN_TOKENS


def _serves(m) -> bool:
    return (m.act_scheme in ("int8-dynamic", "int8-static") and int8_int8.w8_per_channel(m)
            and m.qweight_codes.device.type == "cpu" and native.library() is not None
            and any(m.in_features % g == 0 for g in (64, 32)))


def _prepare(m):
    return prepared(m, KERNELS["int8-cpp"])  # int8-cpp's packed codes and scales (what int8-cpp-gemm reads)


def _run(m, state, x: torch.Tensor) -> torch.Tensor:
    x = smoothed(m, x)
    codes, s = quantize_activation(x, m.act_scheme, m.act_scale)
    xq = codes.to(x.dtype) * s  # fake-act's dequantized activations, the same float ops
    w, scale, _, bias, _ = state
    lib = native.library()
    return native.run_tiled(xq, m.out_features, lambda x2, rows, cols: lib.q8_gemm(x2, w, scale, bias, rows, cols))


register_kernel(Kernel("fake-act-cpp-gemm", 12, _serves, _run, prepare=_prepare, min_tokens=MIN_TOKENS,
                       dtypes=(torch.float32, torch.bfloat16, torch.float16),
                       doc="W8A8 as fake-act computes it (activations quantized→dequantized), C++ tiled "
                           "dequantize + float32 GEMM, 9+ tokens"))
