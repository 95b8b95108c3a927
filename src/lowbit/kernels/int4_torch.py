"""Weight-only int4 through torch's packed CPU kernel (``_weight_int4pack_mm_for_cpu``), at every batch size.

The kernel computes ``y = x · ((c − 8)·scale + zero)ᵀ`` per group of 32/64/128/256 input channels, with
bf16 activations, bf16 scales and zeros and float32 accumulation. Every 4-bit grid lowbit stores maps onto
it by ``scale = s`` and ``zero = (8 − offset)·s``:

* affine ``int4-g*`` (sym: offset 8; integer or float zero-points: offset z), rows a multiple of 16 and
  groups dividing the row;
* GGML types whose blocks are affine in 4-bit codes per sub-block of 32 (``q4_0``, ``q4_1``, ``q4_k``):
  a repack of each sub-block's float32 (scale, offset) — ``value = c·s + off`` → ``zero = 8·s + off``.

The zero term is not given to the kernel: rounded to bf16 it would move every weight by up to 2⁻⁹·|zero|,
which a large activation (SmolLM2 feeds its down_proj inputs of 3·10⁴) turns into a large error. The
kernel runs with zero 0, and ``Σ_g zero[n, g]·Σ_{k∈g} x_k`` is added in float32 (a GEMM of the activations'
group sums, ``tokens × in/g × out``: small). So the arithmetic differs from the reference by the bf16
roundings of the activations, of each group's scale and of the kernel's output (relative ≤ 2⁻⁹ each);
outputs come back in the input's dtype.
"""

from __future__ import annotations

import torch

from lowbit.kernels.base import Kernel, no_dominant_input, register_kernel

GROUPS = (32, 64, 128, 256)


def _ggml_block(m):
    from lowbit.layouts.ggml import BLOCK_TYPES
    from lowbit.layouts.ggml.base import BlockType

    block = m.qweight.scheme.block
    if block is None:
        return None
    name = block.ggml
    bt = BLOCK_TYPES.get(name) if name in BLOCK_TYPES else None
    affine = bt is not None and bt.values.__func__ is BlockType.values.__func__ and 0 <= bt.lo and bt.hi <= 15
    return bt if affine and bt.sub in GROUPS else None


def group_of(m) -> int | None:
    """The int4 group this kernel runs ``m`` with, or None when it cannot."""
    sch = m.qweight.scheme
    if sch.block is not None:
        bt = _ggml_block(m)
        g = None if bt is None else bt.sub
    elif sch.format == "int4" and sch.granularity == "group":
        g = sch.group_size
    else:
        return None
    if g not in GROUPS or m.in_features % g or m.out_features % 16:
        return None
    return g


def _serves(m) -> bool:
    return (m.act_scheme is None and m.input_scale is None and m.qweight_codes.device.type == "cpu"
            and group_of(m) is not None)


def int4_parts(m) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``(out, in)`` in [0, 15] and float32 ``scale``, ``zero`` ``(out, in / g)`` with
    ``value = (code − 8)·scale + zero``."""
    q = m.qweight
    rows, cols = q.shape
    bt = _ggml_block(m) if q.scheme.block is not None else None
    if bt is not None:
        data = q.codes.view(-1, bt.type_size)  # (blocks, type_size)
        codes, p = bt.unpack(data)
        s, off = bt.grid(p)  # (blocks, sub-blocks, 1): value = code·s + off
        scale = s.reshape(rows, -1)
        zero = (8 * s + off).reshape(rows, -1)
        return codes.reshape(rows, cols), scale, zero
    codes = q.codes_grouped().reshape(rows, cols)
    s, z = q.qparams()  # (rows, groups, 1)
    qmin = q.scheme.number_format.qmin
    offset = -qmin if z is None else z - qmin
    scale = s.reshape(rows, -1)
    zero = ((8 - offset) * s).reshape(rows, -1)
    return codes, scale, zero


def _prepare(m):
    codes, scale, zero = int4_parts(m)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    sz = torch.stack([scale.T, torch.zeros_like(scale.T)], dim=-1).to(torch.bfloat16).contiguous()  # (groups, out, 2)
    zero_t = zero.T.contiguous() if bool(zero.any()) else None  # (groups, out) float32; None: symmetric grids
    bias = None if m.bias is None else m.bias.detach().to(torch.float32)
    return packed, sz, zero_t, group_of(m), bias


def _run(m, state, x: torch.Tensor) -> torch.Tensor:
    packed, sz, zero_t, g, bias = state
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), packed, g, sz).to(torch.float32)
    if zero_t is not None:  # the zero term in float32: group sums of x times each group's zero
        y = y.addmm_(x2.to(torch.float32).reshape(x2.shape[0], -1, g).sum(-1), zero_t)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*lead, m.out_features)


register_kernel(Kernel("int4-torch", 20, _serves, _run, prepare=_prepare,
                       dtypes=(torch.float32, torch.bfloat16, torch.float16), accepts=no_dominant_input,
                       doc="weight-only int4, torch's packed CPU kernel (bf16 activations)"))
