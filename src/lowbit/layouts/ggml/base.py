"""The GGML block type base: one small class per storage type, registered by subclassing.

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

from collections.abc import Callable
from typing import ClassVar

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.layouts.ggml import search as S
from lowbit.registry import Registry

Params = dict[str, torch.Tensor]
BLOCK_TYPES: Registry[type[BlockType]] = Registry("GGML type")
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


def best_subscale(p: Params, lo: int, hi: int, err: Callable[[Params], torch.Tensor]) -> Params:
    """Per sub-block, the best of ``p["sc"]`` - 1, + 0, + 1 (clamped to [lo, hi]; super-scales fixed), judged by
    ``err(q)`` ``(N, S)``: each sub-block's exact error on the grid of ``q``."""
    best, best_e = p, None
    for dsc in (0, -1, 1):
        q = dict(p, sc=(p["sc"] + dsc).clamp(lo, hi))
        e = err(q)
        if best_e is None:
            best_e = e
            continue
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best = dict(best, sc=torch.where(better, q["sc"], best["sc"]))
    return best


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
            BLOCK_TYPES.add(cls.name, cls)

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

    @classmethod
    def values(cls, codes: torch.Tensor, p: Params) -> torch.Tensor:
        """The values ``(N, block_size)`` that ``codes`` stand for on the grid of ``p`` (float32)."""
        s, off = cls.grid(p)  # (N, S, 1)
        return (codes.reshape(s.shape[0], s.shape[1], -1).float() * s + off).reshape(codes.shape)

    @classmethod
    def column_rounder(cls, p: Params) -> Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """For GPTQ: ``round(j, x) -> (codes, values)`` of one column ``x`` ``(N,)`` (one weight of each of the
        N blocks of ``p``) lying in sub-block ``j``, on the grid of ``p``. The grid is computed once."""
        s, off = cls.grid(p)  # (N, S, 1)
        s, off = s[..., 0], off[..., 0]
        inv = S.safe_inv(s)

        def rnd(j: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            q = ((x - off[:, j]) * inv[:, j]).round_().clamp_(cls.lo, cls.hi)
            return q, q * s[:, j] + off[:, j]

        return rnd

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
