"""The k-quants: 256-weight super-blocks whose sub-block scales (and mins) are small integers times fp16
super-scales. Two families:

* with mins (Q2_K, Q4_K, Q5_K): value = (d * sc_j) * code - dmin * m_j, sc_j and m_j unsigned;
* symmetric (Q3_K, Q6_K): value = (d * sc_j) * (code - zero), sc_j signed.

``fit`` first searches each sub-block's continuous scale (and min), then quantizes them to the stored
integers and refines by alternation — nearest codes; least-squares sub-scales for those codes, rounded to
integers; least-squares super-scales for those integers, rounded to fp16 — keeping each block's best.

>>> data = Q6_K.encode(torch.randn(2, 256))
>>> data.shape
torch.Size([2, 210])
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lowbit.layouts.ggml import search as S
from lowbit.layouts.ggml.base import (
    U8,
    BlockType,
    Params,
    _bits_lo_hi,
    _bits_lo_hi_inv,
    _f16_bytes,
    _f16_of,
    _pack_2bit_128,
    _pack_k_scales,
    _pack_nibbles_64,
    _unpack_2bit_128,
    _unpack_k_scales,
    _unpack_nibbles_64,
    best_subscale,
)

REFINE_STEPS = 2


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b != 0, a / torch.where(b != 0, b, torch.ones_like(b)), torch.zeros_like(a))


def _keep(cls: type[BlockType], x: torch.Tensor, w: torch.Tensor | None, q: Params, best: Params,
          best_err: torch.Tensor) -> tuple[Params, torch.Tensor]:
    """Per block, ``q`` where it beats ``best``."""
    err = cls._error(x, w, q)
    better = err < best_err
    return S.pick(better, q, best), torch.where(better, err, best_err)


class _KMin(BlockType):
    """Super-block with unsigned sub-scales and mins: value = (d * sc) * code - dmin * m."""

    nsc: ClassVar[int]  # largest stored sub-scale / min
    deltas: ClassVar[tuple[float, ...]] = S.AFFINE_DELTAS

    @classmethod
    def grid(cls, p):
        d, dmin = p["d"].reshape(-1, 1, 1), p["dmin"].reshape(-1, 1, 1)
        return d * p["sc"].unsqueeze(-1).float(), -(dmin * p["m"].unsqueeze(-1).float())

    @classmethod
    def _ints(cls, s: torch.Tensor, m: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor) -> Params:
        sc = _safe_div(s, d).round_().clamp_(0, cls.nsc)
        mi = _safe_div(m, dmin).round_().clamp_(0, cls.nsc)
        return {"d": d.reshape(-1), "dmin": dmin.reshape(-1), "sc": sc.squeeze(-1).to(torch.int32),
                "m": mi.squeeze(-1).to(torch.int32)}

    @classmethod
    def _neighbours(cls, x: torch.Tensor, w: torch.Tensor | None, p: Params) -> Params:
        """Per sub-block, the best of sc ± 1 × m ± 1 (super-scales fixed), by exact error."""
        best, best_e = p, None
        for dsc in (0, -1, 1):
            for dm in (0, -1, 1):
                q = dict(p, sc=(p["sc"] + dsc).clamp(0, cls.nsc), m=(p["m"] + dm).clamp(0, cls.nsc))
                s, off = cls.grid(q)
                e = S.sq_error(x, w, s, off, S.nearest(x, s, off, 0, cls.hi)).squeeze(-1)  # (N, S)
                if best_e is None:
                    best_e = e
                    continue
                better = e < best_e
                best_e = torch.where(better, e, best_e)
                best = dict(best, sc=torch.where(better, q["sc"], best["sc"]), m=torch.where(better, q["m"], best["m"]))
        return best

    @classmethod
    def _super(cls, x: torch.Tensor, w: torch.Tensor | None, p: Params) -> Params:
        """Least-squares (d, dmin) per block for the codes and integers of ``p``: x ≈ d (sc c) - dmin m."""
        sg, off = cls.grid(p)
        c = S.nearest(x, sg, off, 0, cls.hi)
        a = p["sc"].unsqueeze(-1).float() * c  # (N, S, g)
        bm = p["m"].unsqueeze(-1).float().expand_as(c)
        wa = a if w is None else a * w
        wb = bm if w is None else bm * w
        saa, sab, sbb = (wa * a).sum((1, 2)), (wa * bm).sum((1, 2)), (wb * bm).sum((1, 2))
        sax, sbx = (wa * x).sum((1, 2)), (wb * x).sum((1, 2))
        det = saa * sbb - sab * sab
        ok = det > 1e-9 * (saa * sbb).clamp(min=1e-30)
        d = torch.where(ok, _safe_div(sax * sbb - sab * sbx, det), _safe_div(sax, saa))
        dmin = torch.where(ok, _safe_div(sab * sax - saa * sbx, det), p["dmin"])
        return dict(p, d=S.fp16(d.clamp(min=0)), dmin=S.fp16(dmin.clamp(min=0)))

    @classmethod
    def fit(cls, w, importance=None):
        x = cls._view(w)  # (N, S, g)
        iw = None if importance is None else cls._view(importance)
        s, b = S.search_affine(x, iw, cls.hi, cls.deltas, nonpos_offset=True)
        s, m = s.clamp(min=0), (-b).clamp(min=0)  # (N, S, 1) continuous sub-scales and mins
        d = S.fp16(s.amax(1, keepdim=True) / cls.nsc)  # (N, 1, 1)
        dmin = S.fp16(m.amax(1, keepdim=True) / cls.nsc)
        best = cls._neighbours(x, iw, cls._ints(s, m, d, dmin))
        best_err = cls._error(x, iw, best)
        p = best
        for _ in range(REFINE_STEPS):
            p = cls._neighbours(x, iw, cls._super(x, iw, p))
            best, best_err = _keep(cls, x, iw, p, best, best_err)
        return best


class _KSym(BlockType):
    """Super-block with signed sub-scales: value = (d * sc) * (code - zero)."""

    zero: ClassVar[int]
    scmin: ClassVar[int]
    scmax: ClassVar[int]
    targets: ClassVar[tuple[float, ...]]

    @classmethod
    def grid(cls, p):
        s = p["d"].reshape(-1, 1, 1) * p["sc"].unsqueeze(-1).float()
        return s, -cls.zero * s

    @classmethod
    def _ints(cls, s: torch.Tensor, d: torch.Tensor) -> Params:
        sc = _safe_div(s, d).round_().clamp_(cls.scmin, cls.scmax)
        return {"d": d.reshape(-1), "sc": sc.squeeze(-1).to(torch.int32)}

    @classmethod
    def _neighbours(cls, x: torch.Tensor, w: torch.Tensor | None, p: Params) -> Params:
        """Per sub-block, the best of sc - 1, sc, sc + 1 (d fixed), by exact error."""

        def err(q: Params) -> torch.Tensor:
            s, off = cls.grid(q)
            return S.sq_error(x, w, s, off, S.nearest(x, s, off, 0, cls.hi)).squeeze(-1)  # (N, S)

        return best_subscale(p, cls.scmin, cls.scmax, err)

    @classmethod
    def _super(cls, x: torch.Tensor, w: torch.Tensor | None, p: Params) -> Params:
        """Least-squares d per block for the codes and integers of ``p``: x ≈ d (sc k)."""
        sg, off = cls.grid(p)
        a = p["sc"].unsqueeze(-1).float() * (S.nearest(x, sg, off, 0, cls.hi) - cls.zero)  # (N, S, g)
        wa = a if w is None else a * w
        saa = (wa * a).sum((1, 2))
        return dict(p, d=S.fp16(torch.where(saa > 0, _safe_div((wa * x).sum((1, 2)), saa), p["d"])))

    @classmethod
    def fit(cls, w, importance=None):
        x = cls._view(w)
        iw = None if importance is None else cls._view(importance)
        s = S.search_sym(x, iw, -cls.zero, cls.hi - cls.zero, cls.targets)  # (N, S, 1) continuous
        d = S.fp16(S.extreme(s.transpose(1, 2)).transpose(1, 2) / cls.scmin)  # largest |s| -> scmin
        best = cls._neighbours(x, iw, cls._ints(s, d))
        best_err = cls._error(x, iw, best)
        p = best
        for _ in range(REFINE_STEPS):
            p = cls._neighbours(x, iw, cls._super(x, iw, p))
            best, best_err = _keep(cls, x, iw, p, best, best_err)
        return best


class Q2_K(_KMin):
    name, sub, lo, hi, nsc = "Q2_K", 16, 0, 3, 15
    deltas = (-0.5, -0.3, -0.15, 0.0, 0.15, 0.3, 0.5, 0.75, 1.0)

    @classmethod
    def pack(cls, codes, p):
        sc = p["sc"].to(U8) | p["m"].to(U8) << 4
        return torch.cat([sc, _pack_2bit_128(codes), _f16_bytes(p["d"]), _f16_bytes(p["dmin"])], dim=1)

    @classmethod
    def unpack(cls, data):
        sc = data[:, :16]
        p = {"d": _f16_of(data[:, 80:82]).reshape(-1), "dmin": _f16_of(data[:, 82:84]).reshape(-1),
             "sc": (sc & 15).to(torch.int32), "m": (sc >> 4).to(torch.int32)}
        return _unpack_2bit_128(data[:, 16:80]), p

    @classmethod
    def dequantize(cls, data):
        codes, p = cls.unpack(data)
        dl = p["d"].reshape(-1, 1, 1) * p["sc"].float().unsqueeze(-1)  # (N, 16, 1)
        ml = p["dmin"].reshape(-1, 1, 1) * p["m"].float().unsqueeze(-1)
        return (dl * codes.reshape(-1, 16, 16).float() - ml).reshape(-1, 256)


class Q4_K(_KMin):
    name, sub, lo, hi, nsc = "Q4_K", 32, 0, 15, 63

    @classmethod
    def pack(cls, codes, p):
        return torch.cat([_f16_bytes(p["d"]), _f16_bytes(p["dmin"]), _pack_k_scales(p["sc"], p["m"]),
                          _pack_nibbles_64(codes)], dim=1)

    @classmethod
    def unpack(cls, data):
        sc, m = _unpack_k_scales(data[:, 4:16])
        p = {"d": _f16_of(data[:, :2]).reshape(-1), "dmin": _f16_of(data[:, 2:4]).reshape(-1),
             "sc": sc.to(torch.int32), "m": m.to(torch.int32)}
        return _unpack_nibbles_64(data[:, 16:]), p

    @classmethod
    def dequantize(cls, data):
        codes, p = cls.unpack(data)
        dl = p["d"].reshape(-1, 1, 1) * p["sc"].float().unsqueeze(-1)  # (N, 8, 1)
        ml = p["dmin"].reshape(-1, 1, 1) * p["m"].float().unsqueeze(-1)
        return (dl * codes.reshape(-1, 8, 32).float() - ml).reshape(-1, 256)


class Q5_K(Q4_K):
    name, sub, lo, hi, nsc = "Q5_K", 32, 0, 31, 63

    @classmethod
    def pack(cls, codes, p):
        c = codes.to(U8)
        return torch.cat([_f16_bytes(p["d"]), _f16_bytes(p["dmin"]), _pack_k_scales(p["sc"], p["m"]),
                          _bits_lo_hi(c >> 4), _pack_nibbles_64(c & 15)], dim=1)

    @classmethod
    def unpack(cls, data):
        sc, m = _unpack_k_scales(data[:, 4:16])
        p = {"d": _f16_of(data[:, :2]).reshape(-1), "dmin": _f16_of(data[:, 2:4]).reshape(-1),
             "sc": sc.to(torch.int32), "m": m.to(torch.int32)}
        return _unpack_nibbles_64(data[:, 48:]) | _bits_lo_hi_inv(data[:, 16:48]) << 4, p


class Q3_K(_KSym):
    name, sub, lo, hi, zero, scmin, scmax = "Q3_K", 16, 0, 7, 4, -32, 31
    targets = (-5.0, -4.5, -4.25, -4.0, -3.75, -3.5, -3.0, 3.0, 3.25, 3.5, 4.0)

    @classmethod
    def pack(cls, codes, p):
        c = codes.to(U8)
        l6 = (p["sc"] + 32).to(U8)  # (N, 16) 6-bit
        low = (l6[:, :8] & 15) | (l6[:, 8:] & 15) << 4
        h = (l6 >> 4).reshape(-1, 4, 4)  # element j = 4r + i -> byte 8 + i, bits 2r
        high = h[:, 0] | h[:, 1] << 2 | h[:, 2] << 4 | h[:, 3] << 6
        return torch.cat([_bits_lo_hi(c >> 2), _pack_2bit_128(c & 3), low, high, _f16_bytes(p["d"])], dim=1)

    @classmethod
    def unpack(cls, data):
        b = data[:, 96:108]
        low = torch.cat([b[:, :8] & 15, b[:, :8] >> 4], dim=1)  # (N, 16)
        shifts = torch.tensor([0, 2, 4, 6], dtype=U8).reshape(1, 4, 1)
        high = ((b[:, 8:].reshape(-1, 1, 4) >> shifts) & 3).reshape(-1, 16)
        sc = (low | high << 4).to(torch.int32) - 32
        codes = _unpack_2bit_128(data[:, 32:96]) | _bits_lo_hi_inv(data[:, :32]) << 2
        return codes, {"d": _f16_of(data[:, 108:110]).reshape(-1), "sc": sc}

    @classmethod
    def dequantize(cls, data):
        codes, p = cls.unpack(data)
        dl = p["d"].reshape(-1, 1, 1) * p["sc"].float().unsqueeze(-1)  # (N, 16, 1)
        return (dl * (codes.reshape(-1, 16, 16).to(torch.int8) - 4).float()).reshape(-1, 256)


class Q6_K(_KSym):
    name, sub, lo, hi, zero, scmin, scmax = "Q6_K", 16, 0, 63, 32, -128, 127
    targets = (-33.0, -32.5, -32.0, -31.5, -31.0, 31.0, 31.5, 32.0)

    @classmethod
    def pack(cls, codes, p):
        c = codes.to(U8).reshape(-1, 2, 4, 32)  # (N, half, r, l): element 128 h + 32 r + l
        lo = c & 15
        ql = torch.stack([lo[:, :, 0] | lo[:, :, 2] << 4, lo[:, :, 1] | lo[:, :, 3] << 4], dim=2)
        hb = c >> 4
        qh = hb[:, :, 0] | hb[:, :, 1] << 2 | hb[:, :, 2] << 4 | hb[:, :, 3] << 6
        sc = p["sc"].to(torch.int8).view(U8)
        return torch.cat([ql.reshape(-1, 128), qh.reshape(-1, 64), sc, _f16_bytes(p["d"])], dim=1)

    @classmethod
    def unpack(cls, data):
        ql = data[:, :128].reshape(-1, 2, 2, 32)
        lo = torch.stack([ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)
        shifts = torch.tensor([0, 2, 4, 6], dtype=U8).reshape(1, 1, 4, 1)
        hb = (data[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3
        codes = (lo | hb << 4).reshape(-1, 256)
        sc = data[:, 192:208].contiguous().view(torch.int8).to(torch.int32)
        return codes, {"d": _f16_of(data[:, 208:210]).reshape(-1), "sc": sc}

    @classmethod
    def dequantize(cls, data):
        codes, p = cls.unpack(data)
        dl = p["d"].reshape(-1, 1, 1) * p["sc"].float().unsqueeze(-1)  # (N, 16, 1)
        return (dl * (codes.reshape(-1, 16, 16).to(torch.int8) - 32).float()).reshape(-1, 256)
