"""GGML block types: one small class per storage type, registered by subclassing.

Each type knows its block (``block_size`` weights in ``type_size`` bytes) and four steps:

* ``fit(w, importance) -> params`` — the block's scales (and mins) exactly as the type stores them (fp16
  super-scales, 4/6/8-bit sub-scales), chosen by an importance-weighted search (:mod:`.search`);
* ``quantize(w, params) -> codes`` — nearest codes ``(N, block_size)`` uint8 on that grid;
* ``pack(codes, params) -> bytes`` ``(N, type_size)`` uint8, and ``unpack`` back;
* ``dequantize(bytes) -> float32`` — the arithmetic of ``gguf.quants`` / ggml, to the bit.

``grid(params)`` gives the per-sub-block ``(scale, offset)`` with value ≈ ``scale * code + offset``, which
is what GPTQ rounds columns against. ``w`` and ``importance`` are ``(N, block_size)``: N blocks, each a
run of consecutive weights of one row. Importance None means plain MSE.

>>> q = BLOCK_TYPES["Q4_K"]
>>> data = q.encode(torch.randn(3, 256))   # (3, 144) uint8, what a GGUF file stores
>>> q.dequantize(data).shape
torch.Size([3, 256])
"""

from __future__ import annotations

from typing import ClassVar

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.io.gguf import search as S

Params = dict[str, torch.Tensor]
BLOCK_TYPES: dict[str, type[BlockType]] = {}
U8 = torch.uint8


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """(N,) fp16-valued float32 -> (N, 2) little-endian bytes."""
    return v.reshape(-1).to(torch.float16).contiguous().view(U8).reshape(-1, 2)


def _f16_of(b: torch.Tensor) -> torch.Tensor:
    """(N, 2) bytes -> (N, 1, 1) float32."""
    return b.contiguous().view(torch.float16).to(torch.float32).reshape(-1, 1, 1)


def _bits_lo_hi(hi: torch.Tensor) -> torch.Tensor:
    """(N, 256) high bits -> (N, 32) bytes: element e goes to byte e % 32, bit e // 32 (Q3_K, Q5_K)."""
    h = hi.reshape(-1, 8, 32).to(U8)
    out = h[:, 0].clone()
    for b in range(1, 8):
        out |= h[:, b] << b
    return out


def _bits_lo_hi_inv(qh: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=U8).reshape(1, 8, 1)
    return ((qh.reshape(-1, 1, 32) >> shifts) & 1).reshape(-1, 256)


def _pack_2bit_128(c: torch.Tensor) -> torch.Tensor:
    """(N, 256) 2-bit codes -> (N, 64): byte 32h+l holds elements 128h + 32r + l at bits 2r."""
    q = c.reshape(-1, 2, 4, 32).to(U8)
    return (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(-1, 64)


def _unpack_2bit_128(qs: torch.Tensor) -> torch.Tensor:
    shifts = torch.tensor([0, 2, 4, 6], dtype=U8).reshape(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 256)


def _pack_nibbles_64(c: torch.Tensor) -> torch.Tensor:
    """(N, 256) 4-bit codes -> (N, 128): byte 32n+l = element 64n+l | element 64n+32+l << 4."""
    q = c.reshape(-1, 4, 2, 32).to(U8)
    return (q[:, :, 0] | q[:, :, 1] << 4).reshape(-1, 128)


def _unpack_nibbles_64(qs: torch.Tensor) -> torch.Tensor:
    q = qs.reshape(-1, 4, 1, 32)
    return torch.cat([q & 15, q >> 4], dim=2).reshape(-1, 256)


def _pack_k_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins (N, 8) -> the 12 bytes of Q4_K / Q5_K."""
    sc, m = sc.to(U8), m.to(U8)
    return torch.cat([sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6,
                      (sc[:, 4:] & 15) | (m[:, 4:] & 15) << 4], dim=1)


def _unpack_k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sc = torch.cat([b[:, :4] & 63, (b[:, 8:] & 15) | (b[:, :4] >> 6) << 4], dim=1)
    m = torch.cat([b[:, 4:8] & 63, (b[:, 8:] >> 4) | (b[:, 4:8] >> 6) << 4], dim=1)
    return sc, m


class BlockType:
    """One GGML storage type. Subclasses set ``name`` (a ``GGMLQuantizationType`` member) and register."""

    name: ClassVar[str] = ""
    ggml: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    sub: ClassVar[int] = 1  # weights sharing one (scale, offset)
    lo: ClassVar[int] = 0  # code range
    hi: ClassVar[int] = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            cls.ggml = GGMLQuantizationType[cls.name]
            cls.block_size, cls.type_size = GGML_QUANT_SIZES[cls.ggml]
            BLOCK_TYPES[cls.name] = cls

    @classmethod
    def bits_per_weight(cls) -> float:
        return 8 * cls.type_size / cls.block_size

    # -- the four steps --------------------------------------------------------------------------
    @classmethod
    def fit(cls, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        raise NotImplementedError

    @classmethod
    def grid(cls, p: Params) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def quantize(cls, w: torch.Tensor, p: Params) -> torch.Tensor:
        s, off = cls.grid(p)
        return S.nearest(cls._view(w), s, off, cls.lo, cls.hi).reshape(w.shape).to(U8)

    @classmethod
    def pack(cls, codes: torch.Tensor, p: Params) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def unpack(cls, data: torch.Tensor) -> tuple[torch.Tensor, Params]:
        raise NotImplementedError

    @classmethod
    def dequantize(cls, data: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- conveniences ----------------------------------------------------------------------------
    @classmethod
    def encode(cls, w: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """fit -> quantize -> pack: ``(N, block_size)`` floats to ``(N, type_size)`` bytes."""
        w = w.reshape(-1, cls.block_size).to(torch.float32)
        imp = None if importance is None else importance.reshape(w.shape).to(torch.float32)
        p = cls.fit(w, imp)
        return cls.pack(cls.quantize(w, p), p)

    @classmethod
    def _view(cls, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(-1, cls.block_size // cls.sub, cls.sub).to(torch.float32)

    @classmethod
    def _error(cls, x: torch.Tensor, w: torch.Tensor | None, p: Params) -> torch.Tensor:
        """Exact weighted squared error ``(N,)`` of each block at its nearest codes on the grid of ``p``."""
        s, off = cls.grid(p)
        return S.block_error(S.sq_error(x, w, s, off, S.nearest(x, s, off, cls.lo, cls.hi))).reshape(-1)

    @classmethod
    def _best(cls, x: torch.Tensor, w: torch.Tensor | None, cands: list[Params]) -> Params:
        """Per block, the candidate with the smallest exact weighted error on its own grid."""
        best, best_err = cands[0], cls._error(x, w, cands[0])
        for p in cands[1:]:
            err = cls._error(x, w, p)
            better = err < best_err
            best, best_err = S.pick(better, p, best), torch.where(better, err, best_err)
        return best


# -- float types: plain casts -----------------------------------------------------------------------
class _Float(BlockType):
    """One weight per block; the "codes" are the value's own bytes (round-to-nearest-even casts)."""

    dtype: ClassVar[torch.dtype]

    @classmethod
    def fit(cls, w, importance=None):
        return {}

    @classmethod
    def quantize(cls, w, p):
        return w.to(cls.dtype).contiguous().reshape(-1).view(U8).reshape(-1, cls.type_size)

    @classmethod
    def pack(cls, codes, p):
        return codes

    @classmethod
    def unpack(cls, data):
        return data, {}

    @classmethod
    def encode(cls, w: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        return cls.quantize(w, {})

    @classmethod
    def dequantize(cls, data: torch.Tensor) -> torch.Tensor:
        return data.contiguous().reshape(-1).view(cls.dtype).to(torch.float32).reshape(-1, 1)


class F32(_Float):
    name, dtype = "F32", torch.float32


class F16(_Float):
    name, dtype = "F16", torch.float16


class BF16(_Float):
    name, dtype = "BF16", torch.bfloat16


# -- 32-weight blocks with one fp16 scale (and min) ---------------------------------------------------
class _Sym32(BlockType):
    """value = d * (code - zero), one fp16 d per 32 weights (Q4_0, Q5_0, Q8_0)."""

    sub = 32
    zero: ClassVar[int]
    targets: ClassVar[tuple[float, ...]]

    @classmethod
    def fit(cls, w, importance=None):
        x = cls._view(w)  # (N, 1, 32)
        iw = None if importance is None else cls._view(importance)
        kmin, kmax = cls.lo - cls.zero, cls.hi - cls.zero
        ref = S.fp16(S.extreme(x) / (-cls.zero if cls.lo == 0 else kmax))  # llama.cpp's reference choice
        cands = [{"d": ref}, {"d": S.fp16(S.refine_sym_scale(x, iw, ref, kmin, kmax))}]
        if cls.targets:
            s = S.fp16(S.search_sym(x, iw, kmin, kmax, cls.targets))
            cands += [{"d": s}, {"d": S.fp16(S.refine_sym_scale(x, iw, s, kmin, kmax))}]
        return cls._best(x, iw, cands)

    @classmethod
    def grid(cls, p):
        d = p["d"].reshape(-1, 1, 1)
        return d, -cls.zero * d


class Q8_0(_Sym32):
    name, zero, lo, hi = "Q8_0", 128, 1, 255  # codes -127..127 (never -128, as ggml's own)
    targets = ()  # 255 levels: the reference scale and its least-squares refit are as good as a search

    @classmethod
    def pack(cls, codes, p):
        q = (codes.to(torch.int16) - 128).to(torch.int8).view(U8)
        return torch.cat([_f16_bytes(p["d"]), q.reshape(-1, 32)], dim=1)

    @classmethod
    def unpack(cls, data):
        return (data[:, 2:].view(torch.int8).to(torch.int16) + 128).to(U8), {"d": _f16_of(data[:, :2])}

    @classmethod
    def dequantize(cls, data):
        q = data[:, 2:].contiguous().view(torch.int8).to(torch.float32)
        return q * _f16_of(data[:, :2]).reshape(-1, 1)


class Q4_0(_Sym32):
    name, zero, lo, hi = "Q4_0", 8, 0, 15
    targets = S.SYM_TARGETS_4BIT

    @classmethod
    def pack(cls, codes, p):
        q = codes.reshape(-1, 2, 16).to(U8)
        return torch.cat([_f16_bytes(p["d"]), q[:, 0] | q[:, 1] << 4], dim=1)

    @classmethod
    def unpack(cls, data):
        qs = data[:, 2:]
        return torch.cat([qs & 15, qs >> 4], dim=1), {"d": _f16_of(data[:, :2])}

    @classmethod
    def dequantize(cls, data):
        codes, p = cls.unpack(data)
        return p["d"].reshape(-1, 1) * (codes.to(torch.int8) - 8).to(torch.float32)


def _pack5(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 32) 5-bit codes -> qh (N, 4) (bit i of a little-endian u32 = high bit of code i), qs (N, 16)."""
    q = codes.reshape(-1, 32).to(U8)
    hb = (q >> 4).reshape(-1, 4, 8)
    qh = hb[:, :, 0].clone()
    for b in range(1, 8):
        qh |= hb[:, :, b] << b
    lo = q & 15
    return qh, lo[:, :16] | lo[:, 16:] << 4


def _unpack5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=U8).reshape(1, 1, 8)
    hb = ((qh.reshape(-1, 4, 1) >> shifts) & 1).reshape(-1, 32)
    return torch.cat([qs & 15, qs >> 4], dim=1) | hb << 4


class Q5_0(_Sym32):
    name, zero, lo, hi = "Q5_0", 16, 0, 31
    targets = tuple(2 * t for t in S.SYM_TARGETS_4BIT)

    @classmethod
    def pack(cls, codes, p):
        qh, qs = _pack5(codes)
        return torch.cat([_f16_bytes(p["d"]), qh, qs], dim=1)

    @classmethod
    def unpack(cls, data):
        return _unpack5(data[:, 2:6], data[:, 6:]), {"d": _f16_of(data[:, :2])}

    @classmethod
    def dequantize(cls, data):
        codes, p = cls.unpack(data)
        return p["d"].reshape(-1, 1) * (codes.to(torch.int8) - 16).to(torch.float32)


class _Affine32(BlockType):
    """value = d * code + m, fp16 d and m per 32 weights (Q4_1, Q5_1)."""

    sub = 32

    @classmethod
    def fit(cls, w, importance=None):
        x = cls._view(w)
        iw = None if importance is None else cls._view(importance)
        s, b = S.search_affine(x, iw, cls.hi, S.AFFINE_DELTAS, nonpos_offset=False)
        first = {"d": S.fp16(s), "m": S.fp16(b)}
        c = S.nearest(x, first["d"], first["m"], 0, cls.hi)
        s2, b2, _ = S.lsq_affine(x, iw, c, nonpos_offset=False)
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        ref = {"d": S.fp16((hi - lo) / cls.hi), "m": S.fp16(lo)}  # llama.cpp's reference choice
        return cls._best(x, iw, [first, {"d": S.fp16(s2), "m": S.fp16(b2)}, ref])

    @classmethod
    def grid(cls, p):
        return p["d"].reshape(-1, 1, 1), p["m"].reshape(-1, 1, 1)

    @classmethod
    def _head(cls, p):
        return [_f16_bytes(p["d"]), _f16_bytes(p["m"])]

    @classmethod
    def dequantize(cls, data):
        codes, p = cls.unpack(data)
        return p["d"].reshape(-1, 1) * codes.to(torch.float32) + p["m"].reshape(-1, 1)


class Q4_1(_Affine32):
    name, lo, hi = "Q4_1", 0, 15

    @classmethod
    def pack(cls, codes, p):
        q = codes.reshape(-1, 2, 16).to(U8)
        return torch.cat([*cls._head(p), q[:, 0] | q[:, 1] << 4], dim=1)

    @classmethod
    def unpack(cls, data):
        qs = data[:, 4:]
        return torch.cat([qs & 15, qs >> 4], dim=1), {"d": _f16_of(data[:, :2]), "m": _f16_of(data[:, 2:4])}


class Q5_1(_Affine32):
    name, lo, hi = "Q5_1", 0, 31

    @classmethod
    def pack(cls, codes, p):
        qh, qs = _pack5(codes)
        return torch.cat([*cls._head(p), qh, qs], dim=1)

    @classmethod
    def unpack(cls, data):
        return _unpack5(data[:, 4:8], data[:, 8:]), {"d": _f16_of(data[:, :2]), "m": _f16_of(data[:, 2:4])}


# -- k-quants: 256-weight super-blocks, integer sub-scales times fp16 super-scales -------------------
from lowbit.io.gguf.kquants import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K  # noqa: E402,F401  (registers them)
