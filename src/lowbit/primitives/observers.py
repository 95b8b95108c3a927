"""Observers: choose the clipping range [lo, hi] of every group.

Weight observers are pure functions ``(xg, grid, importance) -> (lo, hi)`` on a grouped view
``xg`` of shape ``(R, G, g)``, returning ranges of shape ``(R, G, 1)``. ``importance`` (optional,
broadcastable to ``xg``) weights the error per element, e.g. E[x²] of the layer's input channels.

Activation observers are small stateful classes that see batches one at a time
(:class:`MinMaxObserver`, :class:`HistogramObserver` for percentile and entropy calibration).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.errors import SchemeError
from lowbit.primitives.quant import Grid
from lowbit.registry import Registry

WeightObserver = Callable[..., tuple[torch.Tensor, torch.Tensor]]
OBSERVERS: Registry[WeightObserver] = Registry("observer", SchemeError)


def register_observer(name: str) -> Callable[[WeightObserver], WeightObserver]:
    return OBSERVERS.register(name)


def get_observer(name: str) -> WeightObserver:
    return OBSERVERS.get(name)


def observer_names() -> list[str]:
    return OBSERVERS.names()


@register_observer("minmax")
def minmax(xg: torch.Tensor, grid: Grid, importance: torch.Tensor | None = None):
    """The group's own minimum and maximum: nothing is clipped."""
    lo, hi = torch.aminmax(xg, dim=-1, keepdim=True)
    return lo, hi


@register_observer("percentile")
def percentile(xg: torch.Tensor, grid: Grid, importance: torch.Tensor | None = None, q: float = 99.9):
    """Clip to the q-th / (100-q)-th percentile of each group (outliers saturate)."""
    g = xg.shape[-1]
    k_hi = max(1, min(g, round(g * q / 100)))
    k_lo = max(1, min(g, g - k_hi + 1))
    lo = torch.kthvalue(xg, k_lo, dim=-1, keepdim=True).values
    hi = torch.kthvalue(xg, k_hi, dim=-1, keepdim=True).values
    return lo, hi


MSE_SHRINKS = (1.0, 0.96, 0.92, 0.88, 0.84, 0.8, 0.76, 0.72, 0.66, 0.6)


@register_observer("mse")
def mse(
    xg: torch.Tensor,
    grid: Grid,
    importance: torch.Tensor | None = None,
    shrinks: tuple[float, ...] = MSE_SHRINKS,
    chunk_elems: int = 1 << 21,
):
    """MSE-optimal clipping: per group, the shrink of the min-max range with the least (weighted) error.

    The min-max range (shrink 1.0) is always a candidate and wins ties, so the error is never larger
    than :func:`minmax`'s. Rows are processed in chunks of about ``chunk_elems`` weights (8 MB): small enough
    to stay in cache, large enough that per-op overhead (thread wake-ups) stays negligible.
    """
    lo0, hi0 = minmax(xg, grid)
    chunk_rows = max(1, chunk_elems // max(1, xg.shape[1] * xg.shape[2]))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for r0 in range(0, xg.shape[0], chunk_rows):
        x = xg[r0 : r0 + chunk_rows]
        w = None
        if importance is not None:
            w = importance if importance.shape[0] == 1 else importance[r0 : r0 + chunk_rows]
        l0, h0 = lo0[r0 : r0 + chunk_rows], hi0[r0 : r0 + chunk_rows]
        best_err = None
        bl, bh = best_lo[r0 : r0 + chunk_rows], best_hi[r0 : r0 + chunk_rows]
        for a in shrinks:
            lo, hi = l0 * a, h0 * a
            s, z = grid.qparams(lo, hi)
            err = grid.sq_error(x, s, z, w)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            bl.copy_(torch.where(better, lo, bl))
            bh.copy_(torch.where(better, hi, bh))
    return best_lo, best_hi


class MinMaxObserver:
    """Running min / max of activations (static per-tensor ranges)."""

    def __init__(self) -> None:
        self.lo = float("inf")
        self.hi = float("-inf")

    def update(self, x: torch.Tensor) -> None:
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    def range(self) -> tuple[float, float]:
        if self.lo > self.hi:
            raise ValueError("observer saw no data: run calibration first")
        return self.lo, self.hi


class HistogramObserver:
    """Histogram of |x| over all batches; gives percentile or KL-optimal (entropy) symmetric ranges.

    The entropy threshold follows TensorRT's calibration: for each candidate threshold T the clipped
    histogram P (outliers folded into the last bin) is compared with its requantization Q onto
    ``levels`` bins, and the T with the least KL(P || Q) wins.
    """

    def __init__(self, bins: int = 2048) -> None:
        self.bins = bins
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.amax = 0.0

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().abs().float().reshape(-1)
        m = float(a.max()) if a.numel() else 0.0
        if m > self.amax:
            self._widen(m)
        if self.amax == 0:
            self.hist[0] += a.numel()
            return
        self.hist += torch.histc(a, bins=self.bins, min=0, max=self.amax).double().cpu()  # bins stay on the CPU

    def _widen(self, m: float) -> None:
        """Re-bin the histogram onto the wider range [0, m]."""
        if self.amax > 0:
            centers = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * (self.amax / self.bins)
            idx = (centers / m * self.bins).long().clamp(max=self.bins - 1)
            new = torch.zeros_like(self.hist)
            new.index_add_(0, idx, self.hist)
            self.hist = new
        self.amax = m

    def merge(self, other: HistogramObserver) -> HistogramObserver:
        """Add another observer's counts (e.g. from another process's shard), on the wider of the two ranges."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
        o = HistogramObserver(other.bins)
        o.hist, o.amax = other.hist.clone(), other.amax
        top = max(self.amax, o.amax)
        if top > self.amax:
            self._widen(top)
        if top > o.amax:
            o._widen(top)
        self.hist += o.hist
        return self

    def percentile(self, q: float = 99.99) -> float:
        c = torch.cumsum(self.hist, 0)
        if c[-1] <= 0:
            raise ValueError("observer saw no data: run calibration first")
        i = int(torch.searchsorted(c, c[-1] * q / 100))
        return (i + 1) * self.amax / self.bins

    def entropy(self, levels: int = 128) -> float:
        """KL-optimal clipping threshold for a symmetric grid with ``levels`` positive levels."""
        hist = self.hist
        if hist.sum() <= 0:
            raise ValueError("observer saw no data: run calibration first")
        best_t, best_kl = self.bins, float("inf")
        for t in range(levels, self.bins + 1, max(1, (self.bins - levels) // 256)):
            p = hist[:t].clone()
            p[-1] += hist[t:].sum()
            # Merge t bins into `levels` groups, spread each group's mass over its nonzero bins.
            src = hist[:t]
            gid = (torch.arange(t) * levels) // t  # (t,) group of each bin
            nz = (src > 0).double()
            mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, gid, src)
            count = torch.zeros(levels, dtype=torch.float64).index_add_(0, gid, nz)
            q = nz * (mass / count.clamp(min=1))[gid]
            mask = p > 0
            if (q[mask] <= 0).any():
                continue
            pn, qn = p / p.sum(), q / q.sum()
            kl = float((pn[mask] * (pn[mask] / qn[mask]).log()).sum())
            if kl < best_kl:
                best_kl, best_t = kl, t
        return best_t * self.amax / self.bins


class RangeObserver:
    """Signed histogram of one activation tensor over all batches: the static range [lo, hi] of an asymmetric
    per-tensor grid (TFLite / ONNX full-integer activations), by ``minmax``, ``percentile`` or ``mse``.

    The range always holds 0 (zero must be exact: padding, ReLU). ``mse`` picks, among ranges that clip the
    histogram's tails, the one with the least expected squared error of the ``levels``-step grid (rounding inside,
    clipping outside).

    >>> obs = RangeObserver(); obs.update(torch.linspace(0, 6, 1001)); obs.range("minmax")
    (0.0, 6.0)
    >>> lo, hi = obs.range("percentile"); (lo, round(hi, 2))
    (0.0, 6.0)
    """

    # (TensorRT's KL threshold, applied to each side of 0, chose ranges that cost MobileNetV2 most of its top-1
    # agreement: not offered for asymmetric ranges)
    METHODS = ("minmax", "percentile", "mse")

    def __init__(self, bins: int = 2048) -> None:
        self.bins = bins
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.lo, self.hi = 0.0, 0.0  # the histogram's edges (always around 0)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        v = x.detach().float().reshape(-1)
        if not v.numel():
            return
        if not bool(torch.isfinite(v).all()):
            raise ValueError("NaN/Inf in the activations")
        lo, hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
        if (lo, hi) != (self.lo, self.hi):
            self._rebin(lo, hi)
        if self.hi > self.lo:
            self.hist += torch.histc(v, bins=self.bins, min=self.lo, max=self.hi).double().cpu()
        self.count += v.numel()

    def _rebin(self, lo: float, hi: float) -> None:
        if self.count and self.hi > self.lo:
            width = (self.hi - self.lo) / self.bins
            centers = self.lo + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * width
            idx = ((centers - lo) / (hi - lo) * self.bins).long().clamp(0, self.bins - 1)
            new = torch.zeros_like(self.hist)
            new.index_add_(0, idx, self.hist)
            self.hist = new
        self.lo, self.hi = lo, hi

    def merge(self, other: RangeObserver) -> RangeObserver:
        """Add another observer's counts (another shard of the calibration data)."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
        o = RangeObserver(other.bins)
        o.hist, o.lo, o.hi, o.count = other.hist.clone(), other.lo, other.hi, other.count
        lo, hi = min(self.lo, o.lo), max(self.hi, o.hi)
        for obs in (self, o):
            if (obs.lo, obs.hi) != (lo, hi):
                obs._rebin(lo, hi)
        self.hist += o.hist
        self.count += o.count
        return self

    def _edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)

    def range(self, method: str = "minmax", *, q: float = 99.99, levels: int = 256) -> tuple[float, float]:
        """The range [lo, hi] (lo <= 0 <= hi) that ``method`` picks."""
        if self.count == 0:
            raise ValueError("observer saw no data: run calibration first")
        if method not in self.METHODS:
            raise ValueError(f"unknown activation observer {method!r} (known: {', '.join(self.METHODS)})")
        if method == "minmax" or self.hi <= self.lo:
            return self.lo, self.hi
        if method == "percentile":
            c = torch.cumsum(self.hist, 0) / self.hist.sum()
            edges = self._edges()
            tail = (100.0 - q) / 100.0
            i_lo = int(torch.searchsorted(c, torch.tensor(tail, dtype=torch.float64)))
            i_hi = int(torch.searchsorted(c, torch.tensor(1 - tail, dtype=torch.float64)))
            return min(0.0, float(edges[i_lo])), max(0.0, float(edges[min(i_hi + 1, self.bins)]))
        return self._mse(levels)

    def _mse(self, levels: int) -> tuple[float, float]:
        """Least expected squared error: each end searched on its own (40 candidates a side, from the observed
        end inward to 22% of it); the best pair."""
        centers = (self._edges()[:-1] + self._edges()[1:]) / 2
        p = self.hist / self.hist.sum()
        fracs = [1 - i / 50 for i in range(40)]
        best, best_err = (self.lo, self.hi), float("inf")
        for lo in sorted({self.lo * f for f in fracs}):
            for hi in sorted({self.hi * f for f in fracs}):
                step = (hi - lo) / (levels - 1)
                clipped = centers.clamp(lo, hi)
                inside = (centers == clipped).double()
                err = float((p * ((centers - clipped).square() + step * step / 12 * inside)).sum())
                if err < best_err:
                    best, best_err = (lo, hi), err
        return best
