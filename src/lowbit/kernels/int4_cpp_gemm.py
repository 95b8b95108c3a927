"""Weight-only int4 groups above 8 tokens (prefill): the packed weight dequantized in row tiles, float32 GEMM.

Serves exactly what ``int4-cpp`` serves (:mod:`lowbit.kernels.int4_cpp`), from the same packed state: the
state is ``int4-cpp``'s object itself (``prepared(m, KERNELS["int4-cpp"])``), so a model holds one packed
copy of its weights. ``q4_gemm`` (``csrc/gemm_tiles.h``) dequantizes :func:`~lowbit.kernels.native.tile_shape`
rows at a time (≈1 MiB of float32, in L2) with AVX2 into a per-thread buffer — about 0.1–0.15 ns per weight on
this machine, where the reference's ``dequantize`` takes 3.5–7 ns — and runs torch's float32 GEMM (MKL sgemm,
single-threaded inside the tiles, which are split among torch's threads) writing the tile's columns of y.

Exactness: the tile is ``fl(fl(code·scale) + minv)`` with ``scale``, ``minv = zero − 8·scale`` as int4-cpp's
``_prepare`` stores them in float32; the reference computes ``(code − offset)·s`` (affine int4) or
``code·d + m`` (GGML). With fp16 or bf16 scales (the default of every ``int4-g*`` scheme, sym or asym, integer
or fp16/bf16 zero-points, and of q4_0 / q4_1 / q4_k) every product and sum there is exact in float32, so the
tile **equals the reference's dequantized weight bit for bit** (tested per layout). With float32 scales
(``-sf32`` schemes) ``code·scale`` and ``minv`` round, and::

    |ŵ − w_ref| ≤ 2⁻²¹·(15·|scale| + |minv|)   per weight   (measured ≤ 0.72·2⁻²³ of it)

The output then differs from the reference by float32 summation order (and, for float32 scales, that bound
times |x|): tested at 1e-5 of Σ|w||x|. The activations are not rounded (no int16, no bf16), so huge
activations (SmolLM2's 3·10⁴), inf and NaN go through the reference's float32 arithmetic; nothing is taken
apart.

Priority 25: above ``int4-torch`` (20) and ``bf16-gemm`` (15; it serves only CPUs with native bf16), below
``int4-cpp`` (30, 1..16 tokens: at 9..16 tokens the GEMV wins under fixed priorities, and the measured
choice picks between them; session 13, quiet machine, 1 thread: GEMV 4.8 ms at 8 tokens on 4096×4096, this
kernel 12.4 ms at 9, float32 12.5). Measured on this AVX2-only 2-core EPYC, 1 thread
(bench/RESULTS.md, "Prefill above 8 tokens"): ×0.89–1.13 of float32 and 1.6–2.7× faster than int4-torch at
128 and 512 tokens on SmolLM2's and 7B's shapes; faster than int4-torch at 9 tokens on SmolLM2's shapes
(the head ×1.45 of float), but slower on 7B-sized layers below ~16 tokens (4096×4096 at 9: 12.8 vs 9.2 ms).
So with ``LOWBIT_KERNEL_TUNING=off`` this priority is right for SmolLM2 at every size and for large layers
from ~16 tokens; with tuning on (the default) the faster of the two runs per bucket of token counts.
"""

from __future__ import annotations

import torch

from lowbit.kernels import int4_cpp, native
from lowbit.kernels.base import KERNELS, Kernel, prepared, register_kernel

MIN_TOKENS = native.GEMM_MIN_TOKENS


def _prepare(m):
    return prepared(m, KERNELS["int4-cpp"])  # the very same object: no second packed copy


_run = native.affine_tiled("q4_gemm")


register_kernel(Kernel("int4-cpp-gemm", 25, int4_cpp._serves, _run, prepare=_prepare, min_tokens=MIN_TOKENS,
                       dtypes=(torch.float32, torch.bfloat16, torch.float16),
                       doc="weight-only int4 groups, C++ dequantize in L2-sized tiles + float32 GEMM, 9+ tokens"))
