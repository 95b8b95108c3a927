"""GGML's float types and 32-weight blocks: F32 / F16 / BF16 casts, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

>>> data = Q4_0.encode(torch.randn(2, 32))   # (2, 18) uint8, what a GGUF file stores
>>> Q4_0.dequantize(data).shape
torch.Size([2, 32])
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lowbit.layouts.ggml import search as S
from lowbit.layouts.ggml.base import U8, BlockType, _f16_bytes, _f16_of


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
