"""Weight-only int8 per output channel at 1..16 tokens through lowbit's C++ GEMV (:mod:`lowbit.kernels.native`):
SmolLM2's int8 head (49152×576), and every layer of an ``int8`` model at decode.

The layer is weight-only (no activation scheme), so rounding its activations is this kernel's own
arithmetic, not the model's: each token's activations are rounded to int16 per block of 64 columns (32
where ``in`` is no multiple of 64; ``a = max|x_b| / 32767``, ``q = round(x / a)``), the int32 dot products
with the int8 codes are exact, and the blocks are summed in float32 then scaled by the row's scale
``s_n``. Against the reference (``x · (s_n·c_n)ᵀ`` in float32)::

    |y_n − y_ref,n| ≤ s_n · Σ_b (a_b / 2) · Σ_{k∈b} |c_nk|    (+ float32 summation)

i.e. at most 1/65534 of each block's largest activation per unit of weight; measured on SmolLM2's logits
in bench/RESULTS.md (issue 13: KL to the reference). Activations above 256 are taken apart in float32 as
in ``int8-torch``.
"""

from __future__ import annotations

import torch

from lowbit.kernels import native
from lowbit.kernels.base import Kernel, prepared, register_kernel
from lowbit.kernels.int8_int8 import int8_weight, w8_per_channel


def group_of(m) -> int | None:
    """The activation block: 64 columns where ``in`` allows it, else 32; None when neither divides ``in``."""
    return next((g for g in (64, 32) if m.in_features % g == 0), None)


def _serves(m) -> bool:
    return (m.act_scheme is None and m.input_scale is None and m.qweight_codes.device.type == "cpu"
            and w8_per_channel(m) and group_of(m) is not None and native.library() is not None)


def _prepare(m):
    codes, scale = int8_weight(m)
    bias = None if m.bias is None else m.bias.detach().to(torch.float32).contiguous()
    return (codes.contiguous(), scale.to(torch.float32).contiguous(), group_of(m), bias,
            native.ISAS.index(native.best_isa()))


def _gemv(state, out: int, cols_of):
    codes, scale, g, bias, isa = state
    lib = native.library()

    def run(x: torch.Tensor) -> torch.Tensor:
        return native.run_split(
            x, out, lambda x2: lib.q8_gemv(x2, codes, scale, g, bias, native.HUGE_ACTIVATION, isa), cols_of, bias)

    return run


def _columns(state, cols: torch.Tensor) -> torch.Tensor:
    codes, scale = state[0], state[1]
    return codes[:, cols].to(torch.float32) * scale.reshape(-1, 1)


def _run(m, state, x: torch.Tensor) -> torch.Tensor:
    return _gemv(state, m.out_features, lambda cols: _columns(state, cols))(x)


def _fuse(mods):
    """One GEMV over the layers' rows stacked (same block and path); each layer's state becomes a view of
    its rows of the stacked one, so the weight is held once."""
    states = [prepared(m, KERNEL) for m in mods]
    if len({(s[2], s[4]) for s in states}) != 1:
        return None
    return native.stack_states(mods, states, KERNEL.name, (0, 1), 3, _gemv,
                               lambda m, cols: _columns(m._kernel_state[KERNEL.name], cols))


KERNEL = register_kernel(Kernel("int8-cpp", 30, _serves, _run, prepare=_prepare, max_tokens=native.MAX_TOKENS,
                       dtypes=(torch.float32, torch.bfloat16, torch.float16),
                       fuse=_fuse,
                       doc="weight-only int8 per channel, lowbit's C++ GEMV (int16 activations per block), "
                           "1-16 tokens"))
