"""The affine family: grouped codes + scales (+ zero-points), as :class:`~lowbit.core.qtensor.QTensor` stores them.

Covers integer grids (sym / asym, per tensor, channel or group, a ragged last group), fp8 with a scale, the
nf4 lookup grid and plain bf16/fp16 casts. ``fit`` chooses each group's range with an observer (min-max by
default), weighting each input channel's error by ``importance`` when given.

>>> from lowbit.layouts import layout_of
>>> s = parse_scheme("int4-g32")
>>> lay = layout_of(s)
>>> w = torch.randn(4, 64)
>>> torch.equal(lay.encode(w, s, lay.fit(w, s)).dequantize(), lay.quantize(w, s).dequantize())
True
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lowbit.core.qtensor import QTensor
from lowbit.core.scheme import Scheme
from lowbit.errors import LowbitError
from lowbit.layouts.base import Layout, register_layout
from lowbit.primitives.observers import get_observer
from lowbit.primitives.quant import Grid, cast_ste, fake_quantize, group_view, round_ste, ungroup


def importance_view(sq_mean: torch.Tensor, shape: tuple[int, ...], scheme: Scheme) -> torch.Tensor:
    """Per-input-channel importance ``(in,)`` broadcast to the grouped view ``(1|R, G, g)``."""
    rows = shape[0] if len(shape) > 1 else 1
    w = sq_mean.to(torch.float32).reshape(1, -1).expand(rows, -1)
    if scheme.granularity == "tensor":
        return group_view(w, "tensor")
    return group_view(w[:1], "group" if scheme.granularity == "group" else "channel", scheme.group_size)


@dataclass
class AffineParams:
    s: torch.Tensor | None  # (R, G, 1) float32, already rounded to the stored dtype
    z: torch.Tensor | None


@dataclass
class _GroupGrid:
    grid: Grid
    s: torch.Tensor | None  # (R, 1, 1)
    z: torch.Tensor | None

    def round(self, i: int, col: torch.Tensor) -> torch.Tensor:
        rows = col.shape[0]
        return self.grid.fake(col.reshape(rows, 1, 1), self.s, self.z).reshape(rows)


@register_layout
class AffineLayout(Layout):
    family = "affine"
    gptq_act_order = True
    learned_offsets = ("z",)

    def nbytes(self, scheme: Scheme, shape: tuple[int, ...]) -> int:
        return sum(QTensor(torch.empty(0), None, None, tuple(shape), torch.float32, scheme).expected_nbytes().values())

    def fit(self, w, scheme, importance=None, observer="minmax"):
        grid = scheme.grid
        if not grid.has_scale:
            return AffineParams(None, None)
        xg = group_view(w, scheme.granularity, scheme.group_size)
        imp = None if importance is None else importance_view(importance, tuple(w.shape), scheme)
        lo, hi = get_observer(observer)(xg, grid, imp)
        # min/max propagate NaN and Inf, so checking the ranges checks every weight for free.
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise LowbitError("the tensor holds NaN or Inf values")
        return AffineParams(*grid.qparams(lo, hi))

    def encode(self, w, scheme, params):
        xg = group_view(w, scheme.granularity, scheme.group_size)
        return QTensor.from_grouped(scheme.grid.encode(xg, params.s, params.z), params.s, params.z,
                                    tuple(w.shape), w.dtype, scheme)

    def fake(self, w, scheme, params=None):
        p = self.fit(w.detach(), scheme) if params is None else params
        if not w.requires_grad:
            return self.encode(w, scheme, p).dequantize(torch.float32).to(w.dtype)
        R, G, g = scheme.group_dims(tuple(w.shape))
        flat = w.reshape(R, -1)  # (R, cols), or (1, numel) per tensor
        xg = torch.nn.functional.pad(flat, (0, G * g - flat.shape[1])).reshape(R, G, g)
        y = fake_quantize(xg, scheme.grid, p.s, p.z).reshape(R, -1)[:, : flat.shape[1]]  # straight-through
        return y.reshape(w.shape)

    # -- QAT -----------------------------------------------------------------------------------
    def learnable(self, q):
        """Scales ``s`` and zero-points ``z`` ``(R, G, 1)`` (integer zero-points train as floats, rounded on use)."""
        s, z = q.qparams()
        return {k: v for k, v in (("s", s), ("z", z)) if v is not None}

    @staticmethod
    def _stored(scheme: Scheme, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The scale and zero-point as the QTensor will store them (straight-through roundings)."""
        s, z = params.get("s"), params.get("z")
        if s is not None:
            s = cast_ste(s.clamp(min=1e-12), getattr(torch, scheme.scale_dtype))
        if z is not None:
            fmt = scheme.number_format
            z = (round_ste(z).clamp(fmt.qmin, fmt.qmax) if scheme.zero_dtype == "int"
                 else cast_ste(z, getattr(torch, scheme.zero_dtype)))
        return s, z

    def learned_qtensor(self, w, q, params):
        s, z = self._stored(q.scheme, params)
        p = AffineParams(None if s is None else s.detach(), None if z is None else z.detach())
        return replace(self.encode(w.detach().to(torch.float32), q.scheme, p), dtype=q.dtype)

    def learned_fake(self, w, q, params):
        scheme = q.scheme
        if not scheme.grid.has_scale:
            return self.learned_qtensor(w, q, params).dequantize(torch.float32) + (w - w.detach())
        s, z = self._stored(scheme, params)
        # the stored weight's value without packing the codes: encode→decode at the stored scales, in float
        # (Grid.fake: the same arithmetic as dequantize; tests check the two agree bit for bit)
        sd, zd = s.detach(), None if z is None else z.detach()
        exact = ungroup(scheme.grid.fake(group_view(w.detach(), scheme.granularity, scheme.group_size), sd, zd),
                        tuple(w.shape))
        R, G, g = scheme.group_dims(tuple(w.shape))
        flat = w.reshape(R, -1)
        xg = torch.nn.functional.pad(flat, (0, G * g - flat.shape[1])).reshape(R, G, g)
        soft = fake_quantize(xg, scheme.grid, s, z).reshape(R, -1)[:, : flat.shape[1]].reshape(w.shape)
        return exact + (soft - soft.detach())

    # -- GPTQ ----------------------------------------------------------------------------------
    def group_width(self, scheme, cols):
        return scheme.group_size if scheme.granularity == "group" else cols

    def fit_group(self, w, scheme, hdiag, importance, observer, rows_total):
        grid = scheme.grid
        if not grid.has_scale:
            return _GroupGrid(grid, None, None)
        if scheme.granularity == "tensor":
            xg = w.reshape(1, 1, -1)
            imp = None if importance is None else (
                importance.float().reshape(1, -1).expand(w.shape[0], -1).reshape(1, 1, -1))
        else:
            xg = w.unsqueeze(1)  # (rows, 1, g)
            imp = None if importance is None else importance.float().reshape(1, 1, -1)
        lo, hi = get_observer(observer)(xg, grid, imp)
        s, z = grid.qparams(lo, hi)
        return _GroupGrid(grid, s, z)

    def assemble(self, scheme, shape, dtype, grids, w_hat):
        grid = scheme.grid
        gg: list[_GroupGrid] = grids  # type: ignore[assignment]
        s = None if gg[0].s is None else torch.cat([g.s for g in gg], dim=1)  # (R, G, 1)
        z = None if gg[0].z is None else torch.cat([g.z for g in gg], dim=1)
        # Ŵ lies on the grid: re-encoding it with the same qparams gives the codes back exactly.
        xg = group_view(w_hat, scheme.granularity, scheme.group_size)
        return QTensor.from_grouped(grid.encode(xg, s, z), s, z, tuple(shape), dtype, scheme)
