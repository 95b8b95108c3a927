"""GGML's non-linear 4-bit types: IQ4_NL (32-weight blocks) and IQ4_XS (256-weight super-blocks).

Both store codes that index llama.cpp's 16-entry table ``KVALUES`` (denser near zero, like a normal
distribution's quantiles): value = d * KVALUES[code] for IQ4_NL, value = d * (ls_j - 32) * KVALUES[code]
with a 6-bit ``ls_j`` per 32-weight sub-block for IQ4_XS. ``fit`` searches each (sub-)block's scale —
candidate scales that put the block's extreme on one of the table's ends, each refitted by least squares
for the codes it gives — and IQ4_XS then rounds those scales to integers times an fp16 super-scale and
refines both by alternation, keeping each block's best.

>>> data = IQ4_NL.encode(torch.randn(4, 32))
>>> data.shape, IQ4_NL.dequantize(data).shape
(torch.Size([4, 18]), torch.Size([4, 32]))
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.layouts.ggml import search as S
from lowbit.layouts.ggml.base import U8, BlockType, Params, _f16_bytes, _f16_of, best_subscale

KVALUES = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=torch.float32)
_MIDS = (KVALUES[1:] + KVALUES[:-1]) / 2  # (15,) decision boundaries between neighbouring levels
# the level the block's extreme is put at: near either end of the table (the scale's sign picks the side)
TARGETS = (-127.0, -122.0, -117.0, -112.0, -107.0, 113.0, 108.0, 103.0)


def nearest_level(y: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the table entry nearest to each ``y`` (values in table units)."""
    return torch.bucketize(y.contiguous(), _MIDS)


def _codes(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Codes of ``x`` ``(N, S, g)`` for scales ``d`` ``(N, S, 1)`` (scale 0 gives the level nearest 0)."""
    return nearest_level(x * S.safe_inv(d))


def _lsq_scale(x: torch.Tensor, w: torch.Tensor | None, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares scale for fixed levels ``k`` (values) and the error reduction it gives, both (N, S, 1)."""
    wk = k if w is None else k * w
    skk = (wk * k).sum(-1, keepdim=True)
    sxk = (wk * x).sum(-1, keepdim=True)
    inv = S.safe_inv(skk)
    return sxk * inv, sxk * sxk * inv


def search_scale(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Best continuous scale per group ``(N, S, 1)`` of ``x`` ``(N, S, g)`` on the table."""
    inv_a = S.safe_inv(S.extreme(x))
    best_d = torch.zeros_like(inv_a)
    best = torch.full_like(inv_a, -1.0)
    for t in TARGETS:
        k = KVALUES[nearest_level(x * (inv_a * t))]
        d, score = _lsq_scale(x, w, k)
        for _ in range(2):  # codes for the refitted scale, refitted again
            k2 = KVALUES[_codes(x, d)]
            d2, score2 = _lsq_scale(x, w, k2)
            better2 = score2 > score
            d, score = torch.where(better2, d2, d), torch.where(better2, score2, score)
        better = score > best
        best_d, best = torch.where(better, d, best_d), torch.where(better, score, best)
    return best_d


def _pack_nibbles_16(codes: torch.Tensor) -> torch.Tensor:
    """(M, 32) codes -> (M, 16): byte l = code l | code l+16 << 4."""
    c = codes.reshape(-1, 2, 16).to(U8)
    return c[:, 0] | c[:, 1] << 4


def _unpack_nibbles_16(qs: torch.Tensor) -> torch.Tensor:
    q = qs.reshape(-1, 16)
    return torch.cat([q & 15, q >> 4], dim=1)


class _Lookup(BlockType):
    """Shared steps of the table types: value = scale_j * KVALUES[code] per sub-block j."""

    sub, lo, hi = 32, 0, 15

    @classmethod
    def scales(cls, p: Params) -> torch.Tensor:  # (N, S, 1)
        raise NotImplementedError

    @classmethod
    def quantize(cls, w, p):
        return _codes(cls._view(w), cls.scales(p)).reshape(w.shape).to(U8)

    @classmethod
    def values(cls, codes, p):
        d = cls.scales(p)  # (N, S, 1)
        return (KVALUES[codes.long()].reshape(d.shape[0], d.shape[1], -1) * d).reshape(codes.shape)

    @classmethod
    def _error(cls, x, w, p):
        d = cls.scales(p)
        e = (KVALUES[_codes(x, d)] * d - x).square()
        return (e if w is None else e * w).sum((1, 2))

    @classmethod
    def column_rounder(cls, p: Params) -> Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        d = cls.scales(p)[..., 0]  # (N, S)
        inv = S.safe_inv(d)

        def rnd(j: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            q = nearest_level(x * inv[:, j])
            return q.to(torch.float32), KVALUES[q] * d[:, j]

        return rnd


class IQ4_NL(_Lookup):
    name = "IQ4_NL"

    @classmethod
    def scales(cls, p):
        return p["d"].reshape(-1, 1, 1)

    @classmethod
    def fit(cls, w, importance=None):
        x = cls._view(w)  # (N, 1, 32)
        iw = None if importance is None else cls._view(importance)
        s = search_scale(x, iw)
        ref = S.extreme(x) / -127.0  # llama.cpp's first guess: the extreme on the table's longer end
        return cls._best(x, iw, [{"d": S.fp16(s)}, {"d": S.fp16(ref)}])

    @classmethod
    def pack(cls, codes, p):
        return torch.cat([_f16_bytes(p["d"]), _pack_nibbles_16(codes)], dim=1)

    @classmethod
    def unpack(cls, data):
        return _unpack_nibbles_16(data[:, 2:]), {"d": _f16_of(data[:, :2]).reshape(-1)}

    @classmethod
    def dequantize(cls, data):
        codes, p = cls.unpack(data)
        return p["d"].reshape(-1, 1) * KVALUES[codes.long()]


class IQ4_XS(_Lookup):
    name = "IQ4_XS"

    @classmethod
    def scales(cls, p):
        return p["d"].reshape(-1, 1, 1) * p["sc"].unsqueeze(-1).float()

    @classmethod
    def _ints(cls, s: torch.Tensor, d: torch.Tensor) -> Params:
        sc = torch.where(d != 0, s / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(s))
        return {"d": d.reshape(-1), "sc": sc.round_().clamp_(-32, 31).squeeze(-1).to(torch.int32)}

    @classmethod
    def _super(cls, x: torch.Tensor, w: torch.Tensor | None, p: Params) -> Params:
        """Least-squares d per block for the codes and integer sub-scales of ``p``."""
        a = p["sc"].unsqueeze(-1).float() * KVALUES[_codes(x, cls.scales(p))]  # (N, 8, 32)
        wa = a if w is None else a * w
        saa = (wa * a).sum((1, 2))
        d = torch.where(saa > 0, (wa * x).sum((1, 2)) * S.safe_inv(saa), p["d"])
        return dict(p, d=S.fp16(d))

    @classmethod
    def _neighbours(cls, x: torch.Tensor, w: torch.Tensor | None, p: Params) -> Params:
        def err(q: Params) -> torch.Tensor:
            dj = cls.scales(q)
            e = (KVALUES[_codes(x, dj)] * dj - x).square()
            return (e if w is None else e * w).sum(-1)  # (N, 8)

        return best_subscale(p, -32, 31, err)

    @classmethod
    def fit(cls, w, importance=None):
        x = cls._view(w)  # (N, 8, 32)
        iw = None if importance is None else cls._view(importance)
        s = search_scale(x, iw)  # (N, 8, 1) continuous sub-block scales
        d = S.fp16(S.extreme(s.transpose(1, 2)).transpose(1, 2) / -32.0)  # the largest |s| -> -32
        best = cls._neighbours(x, iw, cls._ints(s, d))
        best_err = cls._error(x, iw, best)
        p = best
        for _ in range(2):
            p = cls._neighbours(x, iw, cls._super(x, iw, p))
            err = cls._error(x, iw, p)
            better = err < best_err
            best, best_err = S.pick(better, p, best), torch.where(better, err, best_err)
        return best

    @classmethod
    def pack(cls, codes, p):
        ls = (p["sc"] + 32).to(torch.int32)  # (N, 8) 6-bit
        lo = (ls & 15).to(U8).reshape(-1, 4, 2)
        scales_l = lo[:, :, 0] | lo[:, :, 1] << 4  # (N, 4)
        hi = (ls >> 4) & 3  # (N, 8)
        h = torch.zeros(ls.shape[0], dtype=torch.int32)
        for j in range(8):
            h |= hi[:, j] << (2 * j)
        scales_h = torch.stack([h & 255, h >> 8], 1).to(U8)  # little-endian uint16
        qs = _pack_nibbles_16(codes.reshape(-1, 32)).reshape(-1, 128)
        return torch.cat([_f16_bytes(p["d"]), scales_h, scales_l, qs], dim=1)

    @classmethod
    def unpack(cls, data):
        h = data[:, 2].to(torch.int32) | data[:, 3].to(torch.int32) << 8  # (N,)
        sl = data[:, 4:8].to(torch.int32)
        lo = torch.stack([sl & 15, sl >> 4], dim=2).reshape(-1, 8)
        hi = torch.stack([(h >> (2 * j)) & 3 for j in range(8)], dim=1)
        sc = (lo | hi << 4) - 32
        codes = _unpack_nibbles_16(data[:, 8:].reshape(-1, 16)).reshape(-1, 256)
        return codes, {"d": _f16_of(data[:, :2]).reshape(-1), "sc": sc}

    @classmethod
    def dequantize(cls, data):
        codes, p = cls.unpack(data)
        return (cls.scales(p) * KVALUES[codes.long()].reshape(-1, 8, 32)).reshape(-1, 256)
