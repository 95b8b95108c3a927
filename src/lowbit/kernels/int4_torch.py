"""Weight-only int4 through torch's packed CPU kernel (``_weight_int4pack_mm_for_cpu``), at every batch size.

The kernel computes ``y = x · ((c − 8)·scale + zero)ᵀ`` per group of 32/64/128/256 input channels, with
bf16 activations, bf16 scales and zeros and float32 accumulation. Every 4-bit grid lowbit stores maps onto
it by ``scale = s`` and ``zero = (8 − offset)·s``:

* affine ``int4-g*`` (sym: offset 8; integer or float zero-points: offset z), rows a multiple of 16 and
  groups dividing the row;
* GGML types whose blocks are affine in 4-bit codes per sub-block of 32 (``q4_0``, ``q4_1``, ``q4_k``):
  a repack of each sub-block's float32 (scale, offset) — ``value = c·s + off`` → ``zero = 8·s + off``.

Activations above ``HUGE_ACTIVATION`` (see :func:`lowbit.kernels.base.split_dominant`) are multiplied apart
in float32 with the stored weight's columns. So the arithmetic differs from the reference by the bf16
roundings of the activations, of each group's scale and zero and of the kernel's output (relative ≤ 2⁻⁹
each); outputs come back in the input's dtype.
"""

from __future__ import annotations

import torch

from lowbit.kernels.base import Kernel, register_kernel, run_packed_bf16

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


def int4_group(m) -> int | None:
    """The group of ``m``'s 4-bit affine codes (an int4 group scheme, or a GGML type's sub-block), or None when its
    weight is not stored that way."""
    sch = m.qweight.scheme
    if sch.block is not None:
        bt = _ggml_block(m)
        return None if bt is None else bt.sub
    if sch.format == "int4" and sch.granularity == "group":
        return sch.group_size
    return None


def group_of(m) -> int | None:
    """The int4 group this kernel runs ``m`` with, or None when it cannot."""
    g = int4_group(m)
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
    s, offset = _scale_offset(q)
    return codes, s, (8 - offset) * s


def _scale_offset(q) -> tuple[torch.Tensor, torch.Tensor]:
    """An affine int4 QTensor's float32 scale and code offset ``(rows, groups)``: ``value = (code − offset)·s``."""
    s, z = q.qparams()  # (rows, groups, 1)
    qmin = q.scheme.number_format.qmin
    offset = torch.full_like(s, float(-qmin)) if z is None else z - qmin
    return s.reshape(q.shape[0], -1), offset.reshape(q.shape[0], -1)


def _prepare(m):
    codes, scale, zero = int4_parts(m)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    sz = torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()  # (groups, out, 2)
    bias = None if m.bias is None else m.bias.detach().to(torch.float32)
    return packed, sz, group_of(m), bias


def columns(m, cols: torch.Tensor) -> torch.Tensor:
    """The stored weight's columns ``cols`` ``(out, len(cols))`` in float32, decoding only the groups (or
    GGML blocks) that hold them."""
    q = m.qweight
    rows, width = q.shape
    if q.scheme.block is not None:
        out = torch.empty(rows, len(cols))
        from lowbit.layouts.ggml import decode_blocks

        bs, ts = q.scheme.block.block_size, q.scheme.block.type_size
        data = q.codes.view(rows, width // bs, ts)
        for b in cols.div(bs, rounding_mode="floor").unique().tolist():
            vals = decode_blocks(data[:, b].contiguous().reshape(-1), q.scheme.block.ggml, (rows, bs))
            sel = (cols // bs) == b
            out[:, sel] = vals[:, cols[sel] - b * bs]
        return out
    grp = cols // q.scheme.group_size
    s, offset = _scale_offset(q)
    c = (q.codes.view(rows, width // 2)[:, cols // 2] >> (4 * (cols % 2)).to(torch.uint8)) & 15  # code 0 low
    return (c.to(torch.float32) - offset[:, grp]) * s[:, grp]


def _run(m, state, x: torch.Tensor) -> torch.Tensor:
    packed, sz, g, bias = state
    return run_packed_bf16(m, x, lambda xb: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, g, sz),
                           lambda cols: columns(m, cols), bias)


register_kernel(Kernel("int4-torch", 20, _serves, _run, prepare=_prepare,
                       dtypes=(torch.float32, torch.bfloat16, torch.float16),
                       doc="weight-only int4, torch's packed CPU kernel (bf16 activations)"))
