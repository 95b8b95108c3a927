"""HQQ-style data-free quantization (after Badri & Shaji 2023, half-quadratic quantization).

Per group, the scale s and zero z are optimised to fit the weights robustly: the rounding residual is split
into a sparse "outlier" part ``e = prox_lp(r)`` (the proximal operator of the lp norm, p < 1, which keeps
large residuals and zeroes small ones) and the rest, and (s, z) are refit in closed form (weighted least
squares) to ``W - e``, so a few badly rounded weights do not drag the grid. The shrinkage strength β grows
by κ each step (the half-quadratic continuation), codes are re-rounded, and the best qparams seen per
group are kept — judged by the weighted weight MSE with the qparams as they will be stored, the min-max RTN
ones included, so the result is never worse than RTN on that objective.

The error is weighted per element by ``rms(group) + |w|`` by default (``weighting="magnitude"``): plain
weight MSE (``"uniform"``) clips the few large weights that a small LLM's outputs depend on and loses to
min-max RTN on KL. Without data, importance from random tokens (``calib="random"``) helps far more; the
SmolLM2 figures of both are in bench/RESULTS.md.

Unlike the reference, residuals are measured in quantization steps (r / s), so β does not depend on the
weights' scale. Integer zero-points are optimised as floats, then rounded and polished with the zero fixed.
Symmetric grids (int-sym, nf4, fp8) optimise the scale only.

>>> w = torch.randn(64, 256)
>>> r = hqq(w, LayerStats(), Scheme.parse("int3-g64"), MethodConfig())
>>> r.info["mse"] < r.info["rtn_mse"]
True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from lowbit.core.qtensor import QTensor
from lowbit.core.scheme import Scheme
from lowbit.errors import LowbitError
from lowbit.methods.registry import LayerStats, MethodConfig, QuantResult, method_options, register_method
from lowbit.methods.rtn import importance_view
from lowbit.primitives.observers import get_observer
from lowbit.primitives.quant import Grid, as_matrix, group_view

__all__ = ["HqqOptions", "hqq", "hqq_quantize", "shrink_lp"]

WEIGHTINGS = ("uniform", "magnitude")
CHUNK_ELEMS = 1 << 16  # elements of the grouped view optimised at once (the working set stays in cache)


@dataclass(frozen=True)
class HqqOptions:
    """``iters`` shrink-and-refit steps, the lp exponent ``p`` (< 1: robust to outliers), the shrinkage
    strength ``beta`` (in steps⁻¹) grown ×``kappa`` per step, ``polish`` final plain least-squares steps and
    the ``init`` observer giving the starting range ("mse" or "minmax"; min-max RTN is always a candidate),
    and the per-element ``weighting`` of the error: "magnitude" (group rms + |w|: large weights kept closer)
    or "uniform" (plain weight MSE, as the reference).
    """

    iters: int = field(default=20, metadata={"help": "shrink-and-refit steps"})
    p: float = field(default=0.7, metadata={"help": "lp exponent (< 1: robust to outliers)"})
    beta: float = field(default=3.0, metadata={"help": "shrinkage strength, in steps⁻¹"})
    kappa: float = field(default=1.1, metadata={"help": "beta grows ×kappa per step"})
    polish: int = field(default=4, metadata={"help": "final plain least-squares steps"})
    init: str = field(default="mse", metadata={"help": "starting range observer: mse | minmax"})
    weighting: str = field(default="magnitude", metadata={"help": "error weighting: magnitude | uniform"})

    def __post_init__(self) -> None:
        if self.iters < 0 or self.polish < 0:
            raise LowbitError("hqq: options 'iters' and 'polish' must be >= 0")
        if not 0 < self.p <= 1:
            raise LowbitError(f"hqq: option 'p' must be in (0, 1], got {self.p}")
        if self.beta <= 0 or self.kappa < 1:
            raise LowbitError(f"hqq: options need beta > 0 and kappa >= 1, got beta={self.beta}, kappa={self.kappa}")
        get_observer(self.init)  # unknown names raise here
        if self.weighting not in WEIGHTINGS:
            raise LowbitError(f"hqq: option 'weighting' must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> HqqOptions:
        known = [f.name for f in fields(cls)]
        unknown = set(options) - set(known)
        if unknown:
            raise LowbitError(f"hqq: unknown option(s) {', '.join(sorted(unknown))} (known: {', '.join(known)})")
        try:
            kw = {k: (str(v) if k in ("init", "weighting") else type(getattr(cls(), k))(v)) for k, v in options.items()}
        except (TypeError, ValueError) as exc:
            raise LowbitError(f"hqq: bad option value: {exc}") from None
        return cls(**kw)


def shrink_lp(r: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding (prox of |·|^p, p ≤ 1): ``sign(r) · relu(|r| - |r|^(p-1) / β)``.

    >>> shrink_lp(torch.tensor([0.0, 0.1, 2.0]), beta=1.0, p=1.0).tolist()
    [0.0, 0.0, 1.0]
    """
    a = r.abs()
    t = a.pow(p - 1).div_(beta) if p != 1 else torch.full_like(a, 1.0 / beta)
    return a.sub_(t).clamp_(min=0).mul_(torch.sign(r))  # |r| = 0 gives 0 - inf -> 0


def _wsum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x * w).sum(-1, keepdim=True)  # (R, G, 1)


def _store(grid: Grid, s: torch.Tensor, z: torch.Tensor | None):
    """qparams as they will be stored: s to the scale dtype (nearest), z to the integer grid or zero dtype."""
    s = s.to(getattr(torch, grid.scale_dtype)).to(torch.float32)
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.full_like(s, float("nan")))
    if z is None:
        return s, None
    fmt = grid.fmt
    if grid.zero_dtype == "int":
        z = z.nan_to_num(0.0).round().clamp(fmt.qmin, fmt.qmax)
    else:
        z = z.to(getattr(torch, grid.zero_dtype)).to(torch.float32)
    return s, z


class _Best:
    """Best stored qparams per group ``(r, G, 1)`` by weighted weight MSE."""

    def __init__(self, grid: Grid, xg: torch.Tensor, w: torch.Tensor):
        self.grid, self.xg, self.w = grid, xg, w
        self.s: torch.Tensor | None = None
        self.z: torch.Tensor | None = None
        self.err = torch.full((*xg.shape[:-1], 1), float("inf"), device=xg.device)

    def offer(self, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Store-round (s, z), keep them where they beat the best so far; return the codes ``(r, G, g)``."""
        s, z = _store(self.grid, s, z)
        codes = self.grid.encode(self.xg, s, z)
        err = _wsum((self.grid.decode(codes, s, z) - self.xg).square_(), self.w)
        better = err < self.err  # NaN candidates never win; ties keep the earlier one (RTN is offered first)
        self.err = torch.where(better, err, self.err)
        self.s = s if self.s is None else torch.where(better, s, self.s)
        if z is not None:
            self.z = z if self.z is None else torch.where(better, z, self.z)
        return codes


def _fit_affine(q: torch.Tensor, t: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor):
    """Weighted least squares ``t ≈ s (q - z)`` for (s, z) per group; keeps (s, z) where it is degenerate."""
    wsum = w.sum(-1, keepdim=True).clamp(min=1e-30)
    mq, mt = _wsum(q, w) / wsum, _wsum(t, w) / wsum  # (R, G, 1)
    dq = q - mq
    var = _wsum(dq * dq, w)
    a = _wsum(dq * (t - mt), w) / var
    ok = torch.isfinite(a) & (a > 0) & (var > 0)
    a_safe = torch.where(ok, a, s)
    return a_safe, torch.where(ok, mq - mt / a_safe, z)


def _fit_scale(v: torch.Tensor, t: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Weighted least squares ``t ≈ s v`` for s per group."""
    a = _wsum(v * t, w) / _wsum(v * v, w)
    return torch.where(torch.isfinite(a) & (a > 0), a, s)


def _optimise(xg: torch.Tensor, w: torch.Tensor, grid: Grid, o: HqqOptions):
    """Best stored (s, z) for a chunk of groups ``xg`` ``(r, G, g)`` with element weights ``w`` ``(1, G, g)``.

    Each step quantizes with the stored (rounded) qparams, scores them, then refits. Returns
    ``(s, z, err, rtn_err)``, each ``(r, G, 1)`` (z None for symmetric grids).
    """
    best = _Best(grid, xg, w)
    best.offer(*grid.qparams(*torch.aminmax(xg, dim=-1, keepdim=True)))  # min-max RTN
    rtn_err = best.err
    lo, hi = get_observer(o.init)(xg, grid, w)  # the starting range
    s, z = grid.qparams(lo, hi)
    float_zero = z is not None and grid.zero_dtype == "int"  # iterate the zero as a float, round to score
    if float_zero:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        s = ((hi - lo) / (grid.fmt.qmax - grid.fmt.qmin)).clamp(min=1e-12)
        z = grid.fmt.qmin - lo / s
    b = o.beta
    ones = torch.ones_like(s)
    for step in range(o.iters + o.polish + 1):
        codes = best.offer(s, z)
        if step == o.iters + o.polish:
            break
        polishing = step >= o.iters
        if float_zero and polishing:
            if step == o.iters:  # polish the best point with its integer zero fixed
                s, z = best.s.clone(), best.z.clone()
                codes = grid.encode(xg, s, z)
        elif float_zero:
            codes = grid.encode(xg, s, z)  # codes of the float iterate, not of its rounding
        else:
            s, z = _store(grid, s, z)
        # (r, G, g) grid values at unit scale; with a zero-point the integer levels q, x ≈ s (q - z)
        v = grid.decode(codes, ones, None if z is None else torch.zeros_like(z))
        t = xg
        if not polishing:  # shrink-and-refit; the `polish` steps are plain least squares
            r = xg / s - (v if z is None else v - z)  # rounding residual in steps
            t = torch.addcmul(xg, shrink_lp(r, b, o.p), s, value=-1.0)
            b *= o.kappa
        if z is None:
            s = _fit_scale(v, t, w, s)
        elif float_zero and polishing:
            s = _fit_scale(v - z, t, w, s)
        else:
            s, z = _fit_affine(v, t, w, s, z)
    return best.s, best.z, best.err, rtn_err


def hqq_quantize(
    weight: torch.Tensor,
    scheme: Scheme,
    options: HqqOptions | None = None,
    importance: torch.Tensor | None = None,
) -> tuple[QTensor, dict[str, Any]]:
    """Optimise every group's scale (and zero) of ``weight`` for ``scheme``; returns ``(qtensor, info)``.

    ``importance`` ``(in,)`` (optional, e.g. E[x²]) weights the error per input channel.
    ``info``: ``mse`` / ``rtn_mse`` (mean squared weight error, optimised / min-max RTN, importance-weighted
    when given) and ``improved`` (fraction of groups whose error beats min-max RTN's).

    >>> q, info = hqq_quantize(torch.randn(32, 128), Scheme.parse("int4-g64-zf16"), HqqOptions(iters=10))
    >>> info["mse"] <= info["rtn_mse"]
    True
    """
    o = options or HqqOptions()
    grid = scheme.grid
    shape = tuple(weight.shape)
    xg = group_view(weight, scheme.granularity, scheme.group_size)  # (R, G, g), ragged tail zero-padded
    if not bool(torch.isfinite(xg).all()):
        raise LowbitError("hqq: the weight holds NaN or Inf values")
    if not grid.has_scale:  # plain casts: nothing to optimise
        q = QTensor.from_grouped(grid.encode(xg, None, None), None, None, shape, weight.dtype, scheme)
        return q, {"mse": float((q.dequantize(torch.float32) - weight.float()).square().mean()), "improved": 0.0}
    # Per-element weights (1, G, g): 0 on the padding, optionally × importance.
    if scheme.granularity == "tensor":
        w = torch.ones_like(xg)
    else:
        w = group_view(torch.ones(1, as_matrix(shape)[1], device=weight.device), scheme.granularity,
                       scheme.group_size)
    if importance is not None:
        w = w * importance_view(importance, shape, scheme)
    if o.weighting == "magnitude":  # data-free emphasis on large weights: (group rms + |x|) per element
        rms = (_wsum(xg.square(), w) / w.sum(-1, keepdim=True).clamp(min=1e-30)).sqrt_()
        w = w * (rms + xg.abs())

    R, G, g = xg.shape
    step = max(1, CHUNK_ELEMS // (G * g))  # rows per chunk: the working set stays in cache
    parts = [_optimise(xg[r0 : r0 + step], w if w.shape[0] == 1 else w[r0 : r0 + step], grid, o)
             for r0 in range(0, R, step)]
    s = torch.cat([pt[0] for pt in parts])  # (R, G, 1)
    z = None if parts[0][1] is None else torch.cat([pt[1] for pt in parts])
    err, rtn_err = torch.cat([pt[2] for pt in parts]), torch.cat([pt[3] for pt in parts])
    q = QTensor.from_grouped(grid.encode(xg, s, z), s, z, shape, weight.dtype, scheme)
    n = max(weight.numel(), 1)
    info = {
        "mse": float(err.sum()) / n,
        "rtn_mse": float(rtn_err.sum()) / n,
        "improved": float((err < rtn_err).float().mean()),
    }
    return q, info


@register_method("hqq", options=HqqOptions, layouts=("affine",))
def hqq(weight: torch.Tensor, stats: LayerStats, scheme: Scheme, config: MethodConfig) -> QuantResult:
    """HQQ-style data-free qparam optimisation; ``config.options`` are :class:`HqqOptions` fields. With
    ``config.importance`` and ``stats.sq_mean`` the error is weighted per input channel. ``loss`` is the
    (weighted) mean squared weight error, ``info["rtn_mse"]`` the same for min-max RTN.

    >>> r = hqq(torch.randn(16, 128), LayerStats(), Scheme.parse("int4-g64"), MethodConfig(options={"iters": 10}))
    >>> r.loss <= r.info["rtn_mse"]
    True
    """
    o = HqqOptions.from_options(method_options(config))
    imp = None
    if config.importance:
        if stats.sq_mean is None:
            raise LowbitError("hqq: importance weighting needs sq_mean statistics: run calibration first")
        imp = stats.sq_mean.detach().float()
    q, info = hqq_quantize(weight, scheme, o, imp)
    return QuantResult(q, info["mse"], {**info, "options": o.to_dict()})
