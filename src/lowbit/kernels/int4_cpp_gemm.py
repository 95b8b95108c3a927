"""Weight-only int4 groups above 8 tokens (prefill): the packed weight dequantized in row tiles, float32 GEMM.

Serves exactly what ``int4-cpp`` serves (:mod:`lowbit.kernels.int4_cpp`), from the same packed state: the
state is ``int4-cpp``'s object itself (``prepared(m, KERNELS["int4-cpp"])``), so a model holds one packed
copy of its weights. ``q4_gemm`` (``csrc/gemm_tiles.h``) dequantizes :func:`~lowbit.kernels.native.tile_shape`
rows at a time (≈1 MiB of float32, in L2) with AVX2 into a per-thread buffer — about 0.1–0.15 ns per weight on
this machine, where the reference's ``dequantize`` takes 3.5–7 ns — and runs torch's float32 GEMM (MKL sgemm,
single-threaded inside the tiles, which are split among torch's threads) writing the tile's columns of y.

Exactness: the tile is ``fl(fl(code·scale) + minv)`` with ``scale``, ``minv = zero − 8·scale`` as int4-cpp's
``_prepare`` stores them in float32. The reference computes ``(code − offset)·s`` (affine int4) or
``code·d + m`` (GGML) with one or two roundings of its own, and ``minv`` itself is rounded, so the two agree
to a few float32 ulps, not bit for bit (for ``sym`` layouts and the GGML q4_0 they are often equal)::

    |ŵ − w_ref| ≤ 2⁻²¹·(15·|scale| + |minv|)   per weight (tests/kernels/test_cpp_gemm.py checks it)

i.e. ≤ 2⁻²¹ relative of the group's range, against x's own float32 products and sums: the output differs
from the reference by float32 summation order and that bound only (relative ~1e-6 of Σ|w||x|). There is no
int16 or bf16 rounding of the activations, so huge activations (SmolLM2's 3·10⁴), inf and NaN go through the
same float32 arithmetic as the reference; nothing is taken apart.

Priority 25: above ``int4-torch`` (20; torch's bf16 kernel, slower than this one at every size measured on
this AVX2-only EPYC: bench/RESULTS.md, "prefill GEMM") and ``bf16-gemm`` (15; it does not serve CPUs
without native bf16, and where it does it dequantizes per call as the reference does), below ``int4-cpp``
(30, which stops at 8 tokens where this one starts, so they never compete). Under the measured mode
(:mod:`lowbit.kernels.tuning`) the fastest of them runs anyway.
"""

from __future__ import annotations

import torch

from lowbit.kernels import int4_cpp, native
from lowbit.kernels.base import KERNELS, Kernel, prepared, register_kernel

MIN_TOKENS = native.MAX_TOKENS + 1


def _prepare(m):
    return prepared(m, KERNELS["int4-cpp"])  # the very same object: no second packed copy


def _run(m, state, x: torch.Tensor) -> torch.Tensor:
    packed, scale, minv, g, bias, _ = state
    lib = native.library()
    return native.run_tiled(x, m.out_features, lambda x2, rows, cols: lib.q4_gemm(x2, packed, scale, minv, g, bias, rows, cols))


register_kernel(Kernel("int4-cpp-gemm", 25, int4_cpp._serves, _run, prepare=_prepare, min_tokens=MIN_TOKENS,
                       dtypes=(torch.float32, torch.bfloat16, torch.float16),
                       doc="weight-only int4 groups, C++ dequantize in L2-sized row tiles + float32 GEMM, 9+ tokens"))
