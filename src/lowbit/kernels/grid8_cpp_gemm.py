"""``grid8-cpp``'s layers above 8 tokens (prefill): the repacked int8 codes dequantized in row tiles (AVX2,
``c·scale + minv``, the same floats as :func:`lowbit.kernels.grid8_cpp.columns`), float32 GEMM per tile
(``csrc/gemm_tiles.h``, as ``int4-cpp-gemm``).

The state is ``grid8-cpp``'s object itself, so a model holds one repacked copy. The tile equals the
reference's dequantized weight bit for bit wherever the repack is exact (fp16/bf16 scales, integer offsets:
every GGML type and built-in scheme, :mod:`lowbit.kernels.grid8_cpp`), so the output differs from the
reference by float32 summation order only; activations are not rounded. Priority 24: under ``int4-cpp-gemm``
(25, which serves other layers), above ``bf16-gemm`` (15) and the dequantize reference.
"""

from __future__ import annotations

import torch

from lowbit.kernels import grid8_cpp, native
from lowbit.kernels.base import KERNELS, Kernel, prepared, register_kernel

MIN_TOKENS = grid8_cpp.MAX_TOKENS + 1  # the GEMV hands over here


def _prepare(m):
    return prepared(m, KERNELS["grid8-cpp"])  # the very same object: no second repacked copy


_run = native.affine_tiled("g8_gemm")


register_kernel(Kernel("grid8-cpp-gemm", 24, grid8_cpp._serves, _run, prepare=_prepare, min_tokens=MIN_TOKENS,
                       dtypes=(torch.float32, torch.bfloat16, torch.float16),
                       doc="weight-only affine grids of up to 8 bits (repacked int8 codes), C++ dequantize in "
                           "L2-sized tiles + float32 GEMM, 9+ tokens"))
