"""Quantize / dequantize on grouped views, quantization parameters and fake quantization.

Every granularity is one layout: a weight is seen as a 2-D matrix (rows = output channels,
cols = everything else) and cut into groups along the columns, giving a view ``(R, G, g)``:

* per-tensor:  R = 1,    G = 1,            g = numel
* per-channel: R = rows, G = 1,            g = cols
* per-group:   R = rows, G = ceil(cols/g), g = group size (the last group zero-padded when ragged)

Scales and zero-points have shape ``(R, G, 1)``. Zero padding is harmless: the affine range always
contains 0, so padded elements quantize exactly to 0 and never widen a group's range.

>>> w = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
>>> xg = group_view(w, "group", 2)           # (1, 2, 2)
>>> grid = Grid(get_format("uint2"), symmetric=False)
>>> s, z = grid.qparams(xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True))
>>> s.flatten().tolist(), z.flatten().tolist()   # 1/3 stored as float16, rounded up so the grid spans [0, 1]
([0.33349609375, 1.0], [0.0, 0.0])
>>> ungroup(grid.fake(xg, s, z), w.shape).tolist()   # 1 is 3 steps of that scale
[[0.0, 1.00048828125, 2.0, 3.0]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.primitives.numformats import FloatFormat, IntFormat, LookupFormat, NumberFormat, get_format

__all__ = ["Grid", "group_view", "ungroup", "as_matrix", "fake_quantize", "round_ste", "cast_ste", "get_format"]


def as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of the 2-D view of a tensor: dim 0 is the output channel."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    rows = shape[0]
    cols = 1
    for d in shape[1:]:
        cols *= d
    return rows, cols


def group_dims(shape: tuple[int, ...], granularity: str, group_size: int | None) -> tuple[int, int, int]:
    """(R, G, g) of the grouped view for a tensor of ``shape``."""
    rows, cols = as_matrix(shape)
    if granularity in ("tensor", "none"):
        return 1, 1, rows * cols
    if granularity == "channel":
        return rows, 1, cols
    if granularity == "group":
        assert group_size is not None and group_size > 0
        return rows, -(-cols // group_size), group_size
    raise ValueError(f"unknown granularity {granularity!r}")


def group_view(x: torch.Tensor, granularity: str, group_size: int | None = None) -> torch.Tensor:
    """float32 view ``(R, G, g)`` of ``x``; a ragged last group is padded with zeros."""
    R, G, g = group_dims(tuple(x.shape), granularity, group_size)
    m = x.detach().reshape(R, -1) if granularity not in ("tensor", "none") else x.detach().reshape(1, -1)
    m = m.to(torch.float32)
    pad = G * g - m.shape[1]
    if pad:
        m = torch.nn.functional.pad(m, (0, pad))
    return m.reshape(R, G, g)


def ungroup(xg: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`group_view`: drop the padding and restore ``shape``."""
    rows, cols = as_matrix(tuple(shape))
    n = rows * cols
    R = xg.shape[0]
    flat = xg.reshape(R, -1)[:, : n // R]
    return flat.reshape(tuple(shape))


@dataclass(frozen=True)
class Grid:
    """A number format plus how scales and zero-points are chosen and stored.

    ``scale_dtype``/``zero_dtype`` name torch dtypes; ``zero_dtype="int"`` stores integer zero-points
    on the code grid (as GPTQ/AWQ do), a float dtype stores a float zero-point (as HQQ does).
    """

    fmt: NumberFormat
    symmetric: bool = True
    scale_dtype: str = "float16"
    zero_dtype: str | None = "int"

    @property
    def has_scale(self) -> bool:
        return not (isinstance(self.fmt, FloatFormat) and self.fmt.bits == 16)

    @property
    def has_zero(self) -> bool:
        return isinstance(self.fmt, IntFormat) and not self.symmetric

    def _store_scale(self, s: torch.Tensor) -> torch.Tensor:
        dt = getattr(torch, self.scale_dtype)
        if dt != torch.float32:
            # Round the scale *up* to its storage dtype so the stored grid still spans [lo, hi]:
            # rounding down would clip the extremes by up to qmax * eps(dtype) steps.
            r = s.clamp(max=float(torch.finfo(dt).max)).to(dt)
            # next representable value up: for positive 16-bit floats, the bit pattern + 1
            up = (r.view(torch.int16) + 1).view(dt)
            s = torch.where(r.to(torch.float32) < s, up, r).to(torch.float32)
        # A scale that rounds to 0 (an all-zero group) would divide by zero; any scale encodes 0 exactly.
        return torch.where(s > 0, s, torch.ones_like(s))

    def qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Scale and zero-point (float32, already rounded to their storage dtypes) for a range [lo, hi]."""
        fmt = self.fmt
        if not self.has_scale:
            return None, None
        if isinstance(fmt, IntFormat) and not self.symmetric:
            lo = lo.clamp(max=0)
            hi = hi.clamp(min=0)
            s = self._store_scale((hi - lo) / (fmt.qmax - fmt.qmin))
            z = fmt.qmin - lo / s
            if self.zero_dtype == "int":
                z = z.round().clamp(fmt.qmin, fmt.qmax)
            else:
                z = z.to(getattr(torch, self.zero_dtype)).to(torch.float32)
            return s, z
        amax = torch.maximum(lo.abs(), hi.abs())
        return self._store_scale(amax / fmt.max_value), None

    def encode(self, xg: torch.Tensor, s: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
        return self.fmt.encode(xg, s, z)

    def decode(self, codes: torch.Tensor, s: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
        return self.fmt.decode(codes, s, z)

    def fake(self, xg: torch.Tensor, s: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
        """Quantize then dequantize (no gradient trick; see :func:`fake_quantize`)."""
        fmt = self.fmt
        if isinstance(fmt, IntFormat) and s is not None:
            # Same arithmetic as encode→decode, in float and in place (no uint8 round trip).
            offset = -fmt.qmin if z is None else z - fmt.qmin
            q = torch.addcdiv(torch.as_tensor(offset, dtype=torch.float32), xg, s)
            q.round_().clamp_(0, fmt.levels - 1).sub_(offset)
            return q.mul_(s)
        return self.decode(self.encode(xg, s, z), s, z)

    def sq_error(self, xg: torch.Tensor, s: torch.Tensor | None, z: torch.Tensor | None,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
        """Per-group sum of (weighted) squared rounding error ``(R, G, 1)``."""
        d = self.fake(xg, s, z).sub_(xg).square_()
        if weight is not None:
            d.mul_(weight)
        return d.sum(dim=-1, keepdim=True)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def cast_ste(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype``'s values (kept in ``x``'s dtype, saturating at its largest finite value),
    the gradient straight through: how a learned scale trains at the precision it is stored in.

    >>> cast_ste(torch.tensor([1 / 3]), torch.float16).item()
    0.333251953125
    """
    if dtype == x.dtype:
        return x
    big = float(torch.finfo(dtype).max)
    return x + (x.detach().clamp(-big, big).to(dtype).to(x.dtype) - x).detach()


def fake_quantize(x: torch.Tensor, grid: Grid, s: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """Differentiable quantize→dequantize of a grouped tensor ``(R, G, g)``.

    Gradients flow straight through the rounding to ``x`` and to ``s``/``z`` where they require grad
    (LSQ-style); outside the clipping range the gradient w.r.t. ``x`` is zero.
    """
    fmt = grid.fmt
    if isinstance(fmt, IntFormat):
        q = x / s if z is None else x / s + z
        q = torch.clamp(round_ste(q), fmt.qmin, fmt.qmax)
        return (q if z is None else q - z) * s
    if isinstance(fmt, LookupFormat):
        y = x / s
        return (y + (fmt.round(y) - y).detach()) * s
    y = x if s is None else x / s
    y = y + (fmt.round(y) - y).detach()
    return y if s is None else y * s


def resolve_format(name: str, symmetric: bool) -> NumberFormat:
    """The code format of a scheme: asymmetric integer schemes use the unsigned grid of the same width."""
    fmt = get_format(name)
    if isinstance(fmt, IntFormat) and fmt.signed and not symmetric:
        return get_format(f"uint{fmt.bits}")
    if isinstance(fmt, IntFormat) and not fmt.signed and symmetric:
        return get_format(f"int{fmt.bits}")
    return fmt
