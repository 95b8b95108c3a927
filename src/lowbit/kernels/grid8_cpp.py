"""Weight-only layers on any affine grid of up to 8 bits at 1..8 tokens, through lowbit's C++ GEMV: the GGML
types other than the 4-bit ones (``q2_k``, ``q3_k``, ``q5_0``, ``q5_1``, ``q5_k``, ``q6_k``, ``q8_0``) and
lowbit's own ``int2``/``int3``/``int5``/``int6``/``int8`` schemes per group, channel or tensor (sym or asym).

``prepare`` repacks the stored weight once (a documented repack, not a per-call decode): each code becomes a
signed int8 ``c`` (the stored code, minus 128 where codes reach above 127) beside float32 ``scale`` and
``minv`` per (row, block of ``B`` columns), so that ``value = c·scale + minv`` (symmetric grids keep no
``minv``: their codes are centred on the common zero, ``value = c·scale``). ``B`` is the grid's own
group (a GGML sub-block of 16 or 32, a group of 16..64), or 64/32/16 columns of a wider group, channel or
tensor (its scale repeated per block). From the stored ``(scale s, offset)`` of each group:

* affine ``intN``: ``value = (code − offset)·s`` → ``minv = (shift − offset)·s``;
* GGML: the type's own ``grid`` (``value = code·d_sub + off_sub``, e.g. q6_k's ``d·sc``, ``−32·d·sc``) →
  ``minv = off + shift·d_sub``.

With fp16/bf16 scales and integer offsets (every built-in scheme, every GGML type) those products and sums
are exact in float32, so ``c·scale + minv`` is the reference's dequantized weight to the bit (tested per
type). The GEMV's arithmetic is ``int4-cpp``'s (:mod:`lowbit.kernels.int4_cpp`): each token's activations
rounded to int16 per block (``a = max|x_b| / 32767``), exact int32 dot products per block, float32 across::

    |y_n − y_ref,n| ≤ Σ_b (a_b / 2) · Σ_{k∈b} |w_nk|    (+ float32 summation)

Huge activations (``|x| > 256``), inf and NaN are taken apart in float32 as in ``int4-cpp``.

Memory: the repack holds 1 byte per weight plus 4 bytes per block (symmetric grids) or 8 (with a minimum):
1.125 bytes per weight for q8_0 and q5_0, 1.25 for q6_k, q3_k, q5_1 and q5_k, 1.5 for q2_k, beside the stored
weight; float32 holds 4. It does not serve what ``int4-cpp`` or ``int8-cpp`` serve (4-bit codes, symmetric int8
per channel): those kernels read a tighter packing. Priority 28: under those two (30), above ``int4-torch`` (20)
and ``bf16-gemm`` (15). It takes 1..8 tokens, not the 16 of the int4/int8 GEMVs: reading 1.125–1.5 bytes per
weight it is already near float32 at 8 (session 14, 1 thread, q6_k 4096×4096: 8.4 ms vs 9.5; 1536×1536: 1.01 vs
0.96) and behind it at 12 (12.2 vs 11.1), where ``grid8-cpp-gemm`` takes over. Non-affine grids (IQ lookup
types, nf4, fp4/fp8) are not served: they run ``bf16-gemm`` or the dequantize reference.
"""

from __future__ import annotations

import torch

from lowbit.kernels import native
from lowbit.kernels.base import KERNELS, Kernel, prepared, register_kernel

BLOCKS = (64, 32, 16)  # activation blocks the GEMV takes (multiples of 16)
MAX_TOKENS = 8  # the tokens the GEMV takes (a GEMM is faster above: see the module docstring)


def _ggml_type(m):
    from lowbit.layouts.ggml import BLOCK_TYPES
    from lowbit.layouts.ggml.base import BlockType

    name = m.qweight.scheme.block.ggml
    bt = BLOCK_TYPES.get(name) if name in BLOCK_TYPES else None
    if bt is None or bt.values.__func__ is not BlockType.values.__func__ or bt.lo < 0 or bt.hi > 255:
        return None  # lookup grids (IQ types) have no affine form
    return bt


def _width(m) -> tuple[int, int] | None:
    """``(grid group width, code levels − 1)`` of ``m``'s stored weight when it is an affine grid of ≤ 8 bits."""
    from lowbit.primitives.numformats import IntFormat

    sch = m.qweight.scheme
    if sch.block is not None:
        bt = _ggml_type(m)
        return None if bt is None else (bt.sub, bt.hi)
    fmt = sch.number_format
    if not isinstance(fmt, IntFormat) or fmt.bits > 8:
        return None
    if sch.granularity == "group":
        return (sch.group_size, fmt.levels - 1) if m.in_features % sch.group_size == 0 else None
    if sch.granularity in ("channel", "tensor"):
        return m.in_features, fmt.levels - 1
    return None


def block_of(m) -> int | None:
    """The block ``B`` this kernel runs ``m`` with (the largest of 64, 32, 16 dividing its grid's group), or None."""
    w = _width(m)
    return None if w is None else next((b for b in BLOCKS if w[0] % b == 0), None)


def _serves(m) -> bool:
    if (m.act_scheme is not None or m.input_scale is not None or m.qweight_codes.device.type != "cpu"
            or block_of(m) is None or native.library() is None):
        return False
    return not any(KERNELS[k].serves(m) for k in ("int4-cpp", "int8-cpp"))  # their packing is tighter


def _common_zero(s: torch.Tensor, off: torch.Tensor) -> int | None:
    """The integer z with ``off = −z·s`` in every group (a symmetric grid: ``value = (code − z)·s``), or None."""
    live = s != 0
    if not bool((off[~live] == 0).all()):
        return None
    z = -off[live] / s[live]
    if z.numel() == 0:
        return 0
    z0 = float(z.reshape(-1)[0])
    return int(z0) if z0 == round(z0) and bool((z == z0).all()) else None


def grid8_parts(m) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Signed int8 codes ``(out, in)``, float32 ``scale`` and ``minv`` ``(out, in / B)`` and ``B``, with
    ``value = code·scale + minv``; for a symmetric grid (every group's zero the same integer: q6_k, q3_k, q5_0,
    q8_0, ``intN-…-sym``) the codes are centred on it and ``minv`` is empty ``(out, 0)``: ``value = code·scale``,
    4 bytes per block less to read."""
    q = m.qweight
    rows, cols = q.shape
    width, top = _width(m)
    B = block_of(m)
    shift = 128 if top > 127 else 0
    if q.scheme.block is not None:
        bt = _ggml_type(m)
        codes, p = bt.unpack(q.codes.view(-1, bt.type_size))
        s, off = bt.grid(p)  # (blocks, sub-blocks, 1): value = code·s + off
        s, off = s.reshape(rows, -1), off.reshape(rows, -1)
        z = _common_zero(s, off)
        sym = z is not None and bt.lo - z >= -127 and bt.hi - z <= 127
        shift = z if sym else shift
        minv = None if sym else off + shift * s
    else:
        codes = q.codes_grouped()
        sg, zp = q.qparams()  # (R, G, 1); R = 1 for a per-tensor scale
        qmin = q.scheme.number_format.qmin
        s = sg.reshape(sg.shape[0], -1).expand(rows, -1)
        sym = zp is None
        if sym:  # value = (code + qmin)·s
            shift, minv = -qmin, None
        else:
            minv = ((shift - (zp - qmin)) * sg).reshape(sg.shape[0], -1).expand(rows, -1)
    codes = (codes.reshape(rows, cols).to(torch.int16) - shift).to(torch.int8).contiguous()
    rep = width // B
    s = s.to(torch.float32).repeat_interleave(rep, 1).contiguous()
    minv = (torch.empty(rows, 0) if minv is None else
            minv.to(torch.float32).repeat_interleave(rep, 1).contiguous())
    return codes, s, minv, B


def _prepare(m):
    codes, scale, minv, B = grid8_parts(m)
    bias = None if m.bias is None else m.bias.detach().to(torch.float32).contiguous()
    return codes, scale, minv, B, bias, native.ISAS.index(native.best_isa())


def columns(state, cols: torch.Tensor) -> torch.Tensor:
    """The repacked weight's columns ``cols`` ``(out, len(cols))`` in float32 (the tile's arithmetic)."""
    codes, scale, minv, B = state[:4]
    blk = cols // B
    w = codes[:, cols].to(torch.float32) * scale[:, blk]
    return w + minv[:, blk] if minv.numel() else w


_gemv = native.affine_gemv("g8_gemv")


def _run(m, state, x: torch.Tensor) -> torch.Tensor:
    return _gemv(state, m.out_features, lambda cols: columns(state, cols))(x)


def _fuse(mods):
    """One GEMV over the layers' rows stacked (same block and path); each layer's state becomes a view of its
    rows of the stacked one, so the repacked weight is held once."""
    return native.fuse_affine(mods, [prepared(m, KERNEL) for m in mods], KERNEL.name, _gemv,
                              lambda m, cols: columns(m._kernel_state[KERNEL.name], cols))


KERNEL = register_kernel(Kernel("grid8-cpp", 28, _serves, _run, prepare=_prepare, max_tokens=MAX_TOKENS,
                       dtypes=(torch.float32, torch.bfloat16, torch.float16), fuse=_fuse,
                       doc="weight-only affine grids of up to 8 bits (GGML q2_k..q8_0, int2-int8 groups), "
                           "repacked to int8 codes, lowbit's C++ GEMV, 1-8 tokens"))
