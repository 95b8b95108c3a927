"""Weight-only int8 per output channel above 8 tokens (prefill): the int8 codes dequantized in row tiles,
float32 GEMM (see :mod:`lowbit.kernels.int4_cpp_gemm` for the scheme).

Serves exactly what ``int8-cpp`` serves, from ``int8-cpp``'s state object itself (int8 codes ``(out, in)``
and float32 per-row scales: no second copy). ``q8_gemm`` (``csrc/gemm_tiles.h``) writes
``fl(float(code)·scale_n)`` into an L2-sized float32 tile — the reference's ``(code − 128)·scale`` with the
same single rounding, so the tile equals the reference's dequantized weight bit for bit — and runs torch's
float32 GEMM on it. The output then differs from the reference by float32 summation order only (relative
~1e-6 of Σ|w||x|); huge activations, inf and NaN go through the same float32 arithmetic as the reference.

Priority 25: above ``int8-torch`` (20; torch's bf16 ``_weight_int8pack_mm``) and ``int8-int8`` (10, which only
serves layers with int8 activations), below ``int8-cpp`` (30, 1..16 tokens: at 9..16 the GEMV wins under fixed
priorities). Measured on this AVX2-only EPYC, 1 thread (bench/RESULTS.md, "Prefill above 8 tokens"): ×0.93–1.09
of float32 and 1.6–2.7× faster than int8-torch at 128 and 512 tokens; at 9 tokens int8-torch is faster on most layers
(×0.85–0.97 vs ×0.62–0.87 of float on SmolLM2's, 7.9 vs 13.4 ms on 4096×4096), except the 49152×576 head
(15.2 vs 22.6 ms), the crossover at ~16–24 tokens. With ``LOWBIT_KERNEL_TUNING=off`` the priority favours
the prefill sizes (a SmolLM2 forward at 9 tokens is still faster overall: the head dominates it); with
tuning on (the default) the faster runs per bucket of token counts.
"""

from __future__ import annotations

import torch

from lowbit.kernels import int8_cpp, native
from lowbit.kernels.base import KERNELS, Kernel, prepared, register_kernel

MIN_TOKENS = native.GEMM_MIN_TOKENS


def _prepare(m):
    return prepared(m, KERNELS["int8-cpp"])  # the very same object: no second copy of the codes


def _run(m, state, x: torch.Tensor) -> torch.Tensor:
    codes, scale, _, bias, _ = state
    lib = native.library()
    return native.run_tiled(x, m.out_features, lambda x2, rows, cols: lib.q8_gemm(x2, codes, scale, bias, rows, cols))


register_kernel(Kernel("int8-cpp-gemm", 25, int8_cpp._serves, _run, prepare=_prepare, min_tokens=MIN_TOKENS,
                       dtypes=(torch.float32, torch.bfloat16, torch.float16),
                       doc="weight-only int8 per channel, C++ dequantize in L2-sized tiles + float32 GEMM, 9+ tokens"))
