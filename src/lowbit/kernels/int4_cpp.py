"""Weight-only int4 groups at 1..16 tokens through lowbit's C++ GEMV (:mod:`lowbit.kernels.native`).

Serves what ``int4-torch`` serves (affine ``int4-g32/64/128``, sym or asym, integer or float zero-points,
and GGML ``q4_0``, ``q4_1``, ``q4_k``: :func:`~lowbit.kernels.int4_torch.int4_parts`), for rows of any
count and ``in`` a multiple of the group (group 32, 64 or 128). ``prepare`` packs the codes two to a
byte (:func:`~lowbit.kernels.native.pack_int4`) beside float32 ``scale`` and ``minv = zero − 8·scale``
per (row, group), so that ``value = code·scale + minv``.

The C++ side rounds each token's activations per group of the weight's columns to int16
(``a = max|x_g| / 32767``, ``q = round(x / a)``) and sums, per group, ``a·(scale·Σ c·q + minv·Σ q)`` in
float32 (the integer dot products are exact). So against the reference (the dequantized weight times x
in float32) the error of output ``n`` is the activation rounding, ``|x − a·q| ≤ a/2`` per element::

    |y − y_ref| ≤ Σ_g (a_g / 2) · Σ_{k∈g} |w_nk|    (+ float32 summation, relative ~1e-6 of Σ|w||x|)

at most 1/65534 of each group's largest activation per unit of weight — far below torch's kernel's bf16
rounding (2⁻⁹ of each activation). (int8 activations, 1/254 of the group's largest, put SmolLM2's decode
KL to the reference at 0.0066, over the 1e-3 target: bench/RESULTS.md.) Huge activations (|x| > 256) are
taken apart in float32 (:func:`~lowbit.kernels.native.run_split`), as in ``int4-torch``.
"""

from __future__ import annotations

import torch

from lowbit.kernels import native
from lowbit.kernels.base import Kernel, prepared, register_kernel
from lowbit.kernels.int4_torch import columns, int4_group, int4_parts

GROUPS = (32, 64, 128)


def group_of(m) -> int | None:
    """The group this kernel runs ``m`` with, or None when it cannot."""
    g = int4_group(m)
    return g if g in GROUPS and m.in_features % g == 0 else None


def _serves(m) -> bool:
    return (m.act_scheme is None and m.input_scale is None and m.qweight_codes.device.type == "cpu"
            and group_of(m) is not None and native.library() is not None)


def _prepare(m):
    codes, scale, zero = int4_parts(m)
    minv = (zero - 8 * scale).to(torch.float32).contiguous()
    bias = None if m.bias is None else m.bias.detach().to(torch.float32).contiguous()
    return (native.pack_int4(codes), scale.to(torch.float32).contiguous(), minv, group_of(m), bias,
            native.ISAS.index(native.best_isa()))


_gemv = native.affine_gemv("q4_gemv")


def _run(m, state, x: torch.Tensor) -> torch.Tensor:
    return _gemv(state, m.out_features, lambda cols: columns(m, cols))(x)


def _fuse(mods):
    """One GEMV over the layers' rows stacked (same group and path): their packed states are concatenated
    once, and each layer's own state becomes a view of its rows, so the weight is held once."""
    return native.fuse_affine(mods, [prepared(m, KERNEL) for m in mods], KERNEL.name, _gemv, columns)


KERNEL = register_kernel(Kernel("int4-cpp", 30, _serves, _run, prepare=_prepare, max_tokens=native.MAX_TOKENS,
                       dtypes=(torch.float32, torch.bfloat16, torch.float16),
                       fuse=_fuse,
                       doc="weight-only int4 groups, lowbit's C++ GEMV (int16 activations per group), 1-16 tokens"))
