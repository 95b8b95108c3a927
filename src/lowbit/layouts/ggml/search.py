"""Importance-weighted searches for the scales (and mins) of GGML blocks, vectorised over all blocks.

Every search works on a grouped view ``x`` of shape ``(N, S, g)``: N blocks of S sub-blocks of g weights,
with per-element weights ``w`` of the same shape (or None for plain MSE). A grid maps integer codes
``c`` to values ``scale * c + offset`` with one ``(scale, offset)`` per sub-block, both ``(N, S, 1)``.

The continuous searches try a handful of candidate step sizes at once (one Python iteration per candidate,
never per block), fit the least-squares scale (and min) for the codes each candidate gives, and keep the
candidate with the smallest weighted error. :func:`refine_two_level` then handles the k-quants' second level:
sub-block scales stored as small integers times a per-super-block fp16 scale, refined by alternating
"nearest codes" and least-squares steps and keeping, per block, the best point it has seen.

>>> x = torch.randn(4, 1, 32)
>>> s = search_sym(x, None, -8, 7, SYM_TARGETS_4BIT)  # (4, 1, 1) signed scales
>>> bool((sq_error(x, None, s, -8 * s, nearest(x, s, -8 * s, 0, 15)) <= (x * x).sum(-1, keepdim=True)).all())
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP16_MAX = 65504.0
# Candidate levels for the element of largest magnitude (symmetric grids). Negative targets put it on the
# longer side of a two's-complement range ([-8, 7]: the scale comes out negative, as llama.cpp's does).
SYM_TARGETS_4BIT = (-9.0, -8.5, -8.25, -8.0, -7.75, -7.5, -7.25, -7.0, -6.5, 6.5, 7.0, 7.25, 7.5, 8.0)
# Offsets added to the number of steps between min and max (affine grids).
AFFINE_DELTAS = (-1.0, -0.75, -0.5, -0.35, -0.2, -0.1, 0.0, 0.15, 0.3, 0.5, 0.8)


def fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16 value (kept as float32), saturating instead of overflowing."""
    return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)


def saliency(x: torch.Tensor) -> torch.Tensor:
    """Data-free per-weight importance ``|x| + rms(x)`` over each block (rows of ``x``), as llama.cpp weighs
    k-quant searches: large weights count more, small ones never count for nothing.

    Plain MSE lets a search clip a block's largest weight; on SmolLM2 Q4_0 that costs KL 0.307 where
    this weighting gives 0.271 (llama.cpp's reference: 0.277).
    """
    return x.abs() + x.square().mean(-1, keepdim=True).sqrt()


def wsum(a: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Σ_last (w * a), keeping the dim; plain sum when ``w`` is None."""
    return (a if w is None else a * w).sum(-1, keepdim=True)


def safe_inv(s: torch.Tensor) -> torch.Tensor:
    """1 / s, and 0 where s is 0 (for the small per-group tensors only: ``torch.where`` is slow at full size)."""
    nz = s != 0
    return torch.where(nz, 1.0 / torch.where(nz, s, torch.ones_like(s)), torch.zeros_like(s))


def nearest(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Codes in [lo, hi] (float32) nearest to ``x`` on the grid ``scale * c + offset``; 0-scale groups give lo.

    Multiplies by the reciprocal scale: at an exact tie the code may differ by one from a division's, which
    leaves the error the same to the last bit of the scale.
    """
    return (x - offset).mul_(safe_inv(scale)).round_().clamp_(lo, hi)


def sq_error(x: torch.Tensor, w: torch.Tensor | None, scale: torch.Tensor, offset: torch.Tensor,
             codes: torch.Tensor) -> torch.Tensor:
    """Weighted squared error ``(N, S, 1)`` of ``codes`` on the grid."""
    d = (codes * scale).add_(offset).sub_(x).square_()
    return wsum(d, w)


def block_error(err: torch.Tensor) -> torch.Tensor:
    """Per-block error ``(N, 1, 1)`` from per-sub-block errors ``(N, S, 1)``."""
    return err.sum(1, keepdim=True)


def extreme(x: torch.Tensor) -> torch.Tensor:
    """The signed element of largest magnitude per group ``(..., 1)`` (the max on ties)."""
    hi, lo = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
    return torch.where(hi >= -lo, hi, lo)


def search_sym(x: torch.Tensor, w: torch.Tensor | None, kmin: int, kmax: int,
               targets: tuple[float, ...]) -> torch.Tensor:
    """Best signed scale per sub-block ``(N, S, 1)`` for values ``s * k``, k integer in [kmin, kmax].

    Each target t puts the extreme element at level t (``s = a / t``); the codes that gives are re-fitted by
    least squares (``s = Σwxk / Σwk²``) and scored by the error reduction ``(Σwxk)² / Σwk²``.
    """
    inv_a = safe_inv(extreme(x))  # (N, S, 1)
    best_s = torch.zeros_like(inv_a)
    best_score = torch.full_like(inv_a, -1.0)
    wx = x if w is None else x * w
    for t in targets:
        k = (x * (inv_a * t)).round_().clamp_(kmin, kmax)  # (N, S, g)
        sxk = (k * wx).sum(-1, keepdim=True)
        skk = (k.square() if w is None else k.square().mul_(w)).sum(-1, keepdim=True)
        inv_kk = safe_inv(skk)
        score = sxk * sxk * inv_kk
        better = score > best_score
        best_s = torch.where(better, sxk * inv_kk, best_s)
        best_score = torch.where(better, score, best_score)
    return best_s


@dataclass
class Moments:
    """Per-group weighted sums of the data that do not depend on the codes: Σw, Σwx, Σwx², and w·x."""

    sw: torch.Tensor
    sx: torch.Tensor
    sxx: torch.Tensor
    wx: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, w: torch.Tensor | None) -> Moments:
        sw = torch.full_like(x[..., :1], x.shape[-1]) if w is None else w.sum(-1, keepdim=True)
        wx = x if w is None else x * w
        return cls(sw, wx.sum(-1, keepdim=True), (wx * x).sum(-1, keepdim=True), wx)


def lsq_affine(x: torch.Tensor, w: torch.Tensor | None, c: torch.Tensor, nonpos_offset: bool,
               mom: Moments | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares ``(scale, offset)`` for fixed codes ``c`` and the error they reach, all ``(N, S, 1)``.

    ``nonpos_offset`` forces offset <= 0 (k-quants store ``-dmin * m`` with m >= 0).
    """
    mom = mom or Moments.of(x, w)
    sw, sx, sxx = mom.sw, mom.sx, mom.sxx
    sc = wsum(c, w)
    scc = (c.square() if w is None else c.square().mul_(w)).sum(-1, keepdim=True)
    sxc = (c * mom.wx).sum(-1, keepdim=True)
    det = sw * scc - sc * sc
    good = det > 1e-12 * (sw * scc).clamp(min=1e-30)
    inv_det = safe_inv(torch.where(good, det, torch.zeros_like(det)))
    s = torch.where(good, (sw * sxc - sx * sc) * inv_det, torch.zeros_like(det))
    b = torch.where(good, (scc * sx - sc * sxc) * inv_det, sx * safe_inv(sw))
    if nonpos_offset:
        clip = b > 0
        s = torch.where(clip, sxc * safe_inv(scc), s)
        b = torch.where(clip, torch.zeros_like(b), b)
    # err = Σw(x - s c - b)², expanded (float64: the terms cancel to a small difference)
    s64, b64 = s.double(), b.double()
    err = (sxx.double() - 2 * s64 * sxc.double() - 2 * b64 * sx.double() + s64 * s64 * scc.double()
           + 2 * s64 * b64 * sc.double() + b64 * b64 * sw.double())
    return s, b, err.clamp(min=0).float()


def search_affine(x: torch.Tensor, w: torch.Tensor | None, nmax: int, deltas: tuple[float, ...],
                  nonpos_offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``(scale, offset)`` per sub-block for values ``scale * c + offset``, c integer in [0, nmax].

    Candidate step counts ``nmax + δ`` between min and max give codes; each is re-fitted by least squares.
    """
    lo = x.amin(-1, keepdim=True)
    hi = x.amax(-1, keepdim=True)
    if nonpos_offset:
        lo = lo.clamp(max=0)
    inv_span = safe_inv(hi - lo)  # 0 for flat groups: every candidate gives code 0
    xs = x - lo
    mom = Moments.of(x, w)
    best_s = torch.zeros_like(lo)
    best_b = lo.clone()
    best_err = torch.full_like(lo, float("inf"))
    for dl in deltas:
        c = (xs * (inv_span * (nmax + dl))).round_().clamp_(0, nmax)
        s, b, err = lsq_affine(x, w, c, nonpos_offset, mom)
        better = err < best_err
        best_s = torch.where(better, s, best_s)
        best_b = torch.where(better, b, best_b)
        best_err = torch.where(better, err, best_err)
    return best_s, best_b


def refine_sym_scale(x: torch.Tensor, w: torch.Tensor | None, s: torch.Tensor, kmin: int,
                     kmax: int) -> torch.Tensor:
    """Re-fit a single scale per block ``(N, 1, 1)`` to the codes it gives (one least-squares step)."""
    k = nearest(x, s, torch.zeros_like(s), kmin, kmax)
    wk = k if w is None else k * w
    skk = (wk * k).sum(-1, keepdim=True)
    return torch.where(skk > 0, (wk * x).sum(-1, keepdim=True) * safe_inv(skk), s)


def pick(better: torch.Tensor, new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-block choice between two parameter sets; ``better`` is ``(N,)`` bool."""
    out = {}
    for k, v in new.items():
        m = better.reshape(-1, *([1] * (v.dim() - 1)))
        out[k] = torch.where(m, v, old[k])
    return out
