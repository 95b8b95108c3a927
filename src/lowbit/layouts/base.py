"""The layout interface and its registry.

>>> layout_of(parse_scheme("int4-g128")).family
'affine'
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch

from lowbit.core.qtensor import QTensor
from lowbit.core.scheme import Scheme
from lowbit.errors import LowbitError, SchemeError
from lowbit.registry import Registry

Params = Any  # a layout's own fitted parameters (tensors), opaque to methods


class ColumnGrid(Protocol):
    """The grid of one column group, fitted once, as GPTQ's sweep rounds it column by column."""

    def round(self, i: int, col: torch.Tensor) -> torch.Tensor:
        """Values ``(rows,)`` of column ``i`` of the group (0-based within it) rounded onto the grid."""
        ...


class Layout:
    """One storage family. Subclasses set ``family`` and implement the steps; :func:`register_layout`."""

    family: ClassVar[str] = ""
    # GPTQ's column order when the method does not say: True = decreasing Hessian diagonal with every
    # group's grid fitted up front (static groups); False = natural order, each group fitted when reached.
    gptq_act_order: ClassVar[bool] = True
    gptq_batch: ClassVar[int] = 128  # GPTQ's lazy-update batch (columns) when the method does not say

    def gptq_importance(self, hdiag: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor | None:
        """The per-input-channel weights ``(in,)`` GPTQ's grid fits use (None: unweighted)."""
        return importance

    def proxy(self, scheme: Scheme) -> Scheme:
        """A grouped scheme of the same width and sub-block that searches (AWQ's scale search) can round with
        cheaply, in place of this layout's own fit; the scheme itself for the affine family."""
        return scheme

    def check(self, scheme: Scheme, shape: tuple[int, ...]) -> None:
        """Raise a LowbitError when ``shape`` cannot be stored in ``scheme``."""

    def nbytes(self, scheme: Scheme, shape: tuple[int, ...]) -> int:
        raise NotImplementedError

    def fit(self, w: torch.Tensor, scheme: Scheme, importance: torch.Tensor | None = None,
            observer: str = "minmax") -> Params:
        """The stored grid for ``w``; ``importance`` ``(in,)`` weights each input channel's error."""
        raise NotImplementedError

    def encode(self, w: torch.Tensor, scheme: Scheme, params: Params) -> QTensor:
        raise NotImplementedError

    def decode(self, q: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return q.dequantize(dtype)

    def quantize(self, w: torch.Tensor, scheme: Scheme, importance: torch.Tensor | None = None,
                 observer: str = "minmax") -> QTensor:
        """fit then encode."""
        self.check(scheme, tuple(w.shape))
        return self.encode(w, scheme, self.fit(w, scheme, importance, observer))

    def fake(self, w: torch.Tensor, scheme: Scheme, params: Params | None = None) -> torch.Tensor:
        """Differentiable quantize→dequantize: the forward value of the stored grid, the gradient straight
        through to ``w`` (subclasses may also pass gradients to learnable scales)."""
        p = self.fit(w.detach(), scheme) if params is None else params
        wq = self.encode(w.detach(), scheme, p).dequantize(torch.float32).to(w.dtype)
        return w + (wq - w).detach()

    # -- quantization-aware training (lowbit.qat) ------------------------------------------------
    # grid parameters that train additively (offsets in code units); every other float one trains as a
    # multiple of its starting value, p = p0·exp(θ): a step of the learning rate is a relative change whatever
    # the layer's scale, and a scale can never cross zero
    learned_offsets: ClassVar[tuple[str, ...]] = ()

    def learnable(self, q: QTensor) -> dict[str, torch.Tensor]:
        """The parameters of ``q``'s grid as float32/int tensors: training moves the floating-point ones (scales,
        zero-points, mins), the rest stay as stored. A layout without this step cannot be trained."""
        raise LowbitError(f"{q.scheme.name}: the {self.family} layout has no trainable form")

    def learned_qtensor(self, w: torch.Tensor, q: QTensor, params: dict[str, torch.Tensor]) -> QTensor:
        """``w`` ``q.shape`` encoded on the grid of ``params`` (as :meth:`learnable` gave them, trained), each
        parameter first rounded to its stored precision: what training's forward computed, as stored."""
        raise LowbitError(f"{q.scheme.name}: the {self.family} layout has no trainable form")

    def learned_fake(self, w: torch.Tensor, q: QTensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Differentiable form of :meth:`learned_qtensor`: its forward value is that QTensor's dequantized
        weight bit for bit; gradients pass straight through the rounding to ``w`` and (LSQ) to ``params``."""
        raise LowbitError(f"{q.scheme.name}: the {self.family} layout has no trainable form")

    # -- GPTQ's column sweep ---------------------------------------------------------------------
    def group_width(self, scheme: Scheme, cols: int) -> int:
        """Columns sharing one grid (a group, a block; all of them for per-channel grids)."""
        raise NotImplementedError

    def fit_group(self, w: torch.Tensor, scheme: Scheme, hdiag: torch.Tensor, importance: torch.Tensor | None,
                  observer: str, rows_total: int) -> ColumnGrid:
        """The grid of one column group ``w`` ``(rows, g)``; ``hdiag`` ``(g,)`` = E[x²] of its inputs,
        ``importance`` the method's own weighting (None: the layout's default)."""
        raise NotImplementedError

    def assemble(self, scheme: Scheme, shape: tuple[int, ...], dtype: torch.dtype, grids: list[ColumnGrid],
                 w_hat: torch.Tensor) -> QTensor:
        """The QTensor of GPTQ's result ``w_hat`` ``(rows, cols)``, every group on its own grid."""
        raise NotImplementedError

    def refit(self, scheme: Scheme, grids: list[ColumnGrid], target: torch.Tensor, xtx: torch.Tensor
              ) -> torch.Tensor | None:
        """After GPTQ's sweep, re-solve the grids' float parameters for the codes chosen, minimising the
        output error ``(W − Ŵ) XᵀX (W − Ŵ)ᵀ`` against ``target`` W ``(rows, cols)``; updates ``grids`` in place
        and returns the new Ŵ, or None where the layout has no such step."""
        return None


_LAYOUTS: Registry[Layout] = Registry("layout", SchemeError)


def register_layout(cls: type[Layout]) -> type[Layout]:
    _LAYOUTS.add(cls.family, cls())
    return cls


def layout_of(scheme: Scheme) -> Layout:
    """The registered layout storing ``scheme``."""
    return _LAYOUTS.get(scheme.layout)


def layout_names() -> list[str]:
    return _LAYOUTS.names()
