"""The GGML family as a layout: a scheme ``q4_k`` … stores its weight as that type's blocks along each row.

``fit`` is the type's importance-weighted block search: each weight counts by its magnitude (``|w| + rms``
of its block, as llama.cpp's k-quants weigh it) times ``importance`` of its input channel (E[x²] from
calibration, llama.cpp's imatrix) when given. Rows are encoded in chunks so memory stays bounded.

>>> from lowbit.layouts import layout_of
>>> s = parse_scheme("q6_k")
>>> q = layout_of(s).quantize(torch.randn(4, 512), s)
>>> q.codes.numel() == 4 * 2 * 210, q.bits_per_weight
(True, 6.5625)
"""

from __future__ import annotations

import torch

from lowbit.core.qtensor import QTensor
from lowbit.core.scheme import Scheme, parse_scheme
from lowbit.errors import LowbitError
from lowbit.layouts.base import Layout, register_layout
from lowbit.layouts.ggml import BLOCK_TYPES, BlockType
from lowbit.layouts.ggml import search as S
from lowbit.layouts.ggml.search import saliency
from lowbit.primitives.quant import as_matrix, cast_ste, round_ste

STEPS = (1.0, 0.5, 0.25)  # fractions of the step to the refit optimum each row tries (fp16 rounding)
CHUNK = 1 << 20  # weights fitted per step: big enough to amortise thread start-up, small enough for cache
# the grouped grid of each type's sub-block (same width, same sharing of one scale): searches that round a
# weight many times (AWQ's 21 scalings per layer pair) rank candidates on it, not on the slower block search
PROXY = {"q8_0": "int8-g32-sym", "q4_0": "int4-g32-sym", "q4_1": "int4-g32", "q5_0": "int5-g32-sym",
         "q5_1": "int5-g32", "q2_k": "int2-g16", "q3_k": "int3-g16-sym", "q4_k": "int4-g32", "q5_k": "int5-g32",
         "q6_k": "int6-g16-sym", "iq4_nl": "nf4-g32", "iq4_xs": "nf4-g32"}


def block_type(scheme: Scheme) -> type[BlockType]:
    assert scheme.block is not None
    return BLOCK_TYPES[scheme.block.ggml]


class _BlockGrid:
    """One column block of GPTQ's sweep: the block's fitted params and the codes rounded so far."""

    def __init__(self, bt: type[BlockType], p: dict[str, torch.Tensor], rows: int):
        self.bt, self.p = bt, p
        self.rnd = bt.column_rounder(p)
        self.codes = torch.zeros(rows, bt.block_size, dtype=torch.uint8)

    def round(self, i: int, col: torch.Tensor) -> torch.Tensor:
        q, v = self.rnd(i // self.bt.sub, col)
        self.codes[:, i] = q.to(torch.uint8)
        return v


@register_layout
class GGMLLayout(Layout):
    family = "ggml"
    gptq_act_order = False  # measured on SmolLM2: each block fitted on the error-updated weights when reached
    gptq_batch = 256

    def gptq_importance(self, hdiag, importance):
        """The Hessian's diagonal (E[x²]) unless the method gives its own; every weight counts a little."""
        imp = (hdiag if importance is None else importance).float()
        return imp + 1e-6 * imp.mean().clamp(min=1e-30)

    def proxy(self, scheme):
        return parse_scheme(PROXY[scheme.name])

    def check(self, scheme, shape):
        bs = scheme.block.block_size
        cols = as_matrix(tuple(shape))[1]
        if len(shape) != 2 or cols % bs:
            raise LowbitError(f"{scheme.name}: a weight {list(shape)} does not split into rows of whole blocks of "
                              f"{bs} (plan a fallback type, as llama.cpp does)")

    def nbytes(self, scheme, shape):
        rows, cols = as_matrix(tuple(shape))
        return rows * (cols // scheme.block.block_size) * scheme.block.type_size

    def _weights(self, w: torch.Tensor, bt: type[BlockType], importance: torch.Tensor | None) -> torch.Tensor:
        elem = saliency(w.reshape(-1, bt.block_size)).reshape(w.shape)
        return elem if importance is None else elem.mul_(importance.float().reshape(1, -1))

    def fit(self, w, scheme, importance=None, observer="minmax"):
        self.check(scheme, tuple(w.shape))
        bt = block_type(scheme)
        w = w.detach().float()
        return bt.fit(w.reshape(-1, bt.block_size), self._weights(w, bt, importance).reshape(-1, bt.block_size))

    def encode(self, w, scheme, params):
        bt = block_type(scheme)
        x = w.detach().float().reshape(-1, bt.block_size)
        return QTensor(bt.pack(bt.quantize(x, params), params).reshape(-1), None, None, tuple(w.shape), w.dtype,
                       scheme)

    def quantize(self, w, scheme, importance=None, observer="minmax"):
        """The block search in row chunks (fit + encode of each chunk: blocks never span rows)."""
        self.check(scheme, tuple(w.shape))
        bt = block_type(scheme)
        rows, cols = w.shape
        x = w.detach().float()
        if not bool(torch.isfinite(x).all()):
            raise LowbitError("the tensor holds NaN or Inf values")
        step = max(1, CHUNK // cols)
        parts = []
        for r0 in range(0, rows, step):
            xc = x[r0:r0 + step]
            parts.append(bt.encode(xc, self._weights(xc, bt, importance)).reshape(-1))
        return QTensor(torch.cat(parts), None, None, (rows, cols), w.dtype, scheme)

    # -- QAT -----------------------------------------------------------------------------------
    def learnable(self, q):
        """Each block's parameters as stored (fp16 super-scales and mins train; integer sub-scales stay): the
        type's own grid, so the trained blocks are written as they trained. Types whose values are not affine
        in their codes (the IQ lookup grids) have no trainable form."""
        bt = block_type(q.scheme)
        if bt.values.__func__ is not BlockType.values.__func__:
            raise LowbitError(f"{q.scheme.name}: its blocks are not affine in their codes; no trainable form")
        _, p = bt.unpack(q.codes.view(-1, bt.type_size))
        return {k: v.float() if v.is_floating_point() else v for k, v in p.items()}

    @staticmethod
    def _stored(params):
        return {k: cast_ste(v, torch.float16) if v.is_floating_point() else v for k, v in params.items()}

    def _blocks(self, w, q, params):
        bt = block_type(q.scheme)
        p = {k: v.detach() for k, v in self._stored(params).items()}
        x = w.detach().float().reshape(-1, bt.block_size)
        return bt, bt.pack(bt.quantize(x, p), p)

    def learned_qtensor(self, w, q, params):
        _, data = self._blocks(w, q, params)
        return QTensor(data.reshape(-1), None, None, tuple(q.shape), q.dtype, q.scheme)

    def learned_fake(self, w, q, params):
        bt, data = self._blocks(w, q, params)
        exact = bt.dequantize(data).reshape(w.shape)
        s, off = bt.grid(self._stored(params))  # (N, S, 1), differentiable in the float parameters
        x = w.reshape(s.shape[0], s.shape[1], -1)
        soft = (round_ste((x - off) * S.safe_inv(s)).clamp(bt.lo, bt.hi) * s + off).reshape(w.shape)
        return exact + (soft - soft.detach())

    # -- GPTQ ----------------------------------------------------------------------------------
    def group_width(self, scheme, cols):
        return scheme.block.block_size

    def fit_group(self, w, scheme, hdiag, importance, observer, rows_total):
        bt = block_type(scheme)
        imp = hdiag if importance is None else importance  # already floored by gptq_importance
        p = bt.fit(w.float().contiguous(), imp.float().reshape(1, -1).expand(w.shape[0], -1))
        return _BlockGrid(bt, p, w.shape[0])

    def refit(self, scheme, grids, target, xtx):
        bg: list[_BlockGrid] = grids  # type: ignore[assignment]
        if not bg or not any(v.is_floating_point() for v in bg[0].p.values()):
            return None
        return refit_blocks(bg, target.float(), xtx.float())

    def assemble(self, scheme, shape, dtype, grids, w_hat):
        bt = block_type(scheme)
        bg: list[_BlockGrid] = grids  # type: ignore[assignment]
        rows, nb = shape[0], len(bg)
        codes = torch.stack([g.codes for g in bg], dim=1).reshape(rows * nb, bt.block_size)  # block (r, b)
        params = {k: torch.stack([g.p[k] for g in bg], dim=1).reshape(rows * nb, *bg[0].p[k].shape[1:])
                  for k in bg[0].p}
        return QTensor(bt.pack(codes, params).reshape(-1), None, None, tuple(shape), dtype, scheme)


def _basis(g: _BlockGrid, keys: list[str]) -> torch.Tensor:
    """``(rows, K, block_size)``: the values each float parameter of ``g`` contributes per unit (the decode
    is linear in them: value = Σ_k p_k · basis_k for fixed codes and integer sub-scales)."""
    parts = []
    for k in keys:
        p = {n: (torch.ones_like(v) if n == k else torch.zeros_like(v)) if n in keys else v for n, v in g.p.items()}
        parts.append(g.bt.values(g.codes, p))
    return torch.stack(parts, dim=1)


def _row_losses(d: torch.Tensor, xtx: torch.Tensor) -> torch.Tensor:
    """``(rows,)`` output errors d XᵀX dᵀ of the rows of ``d`` ``(rows, cols)`` (float64)."""
    d = d.double()
    return ((d @ xtx.double()) * d).sum(1)


def refit_blocks(bg: list[_BlockGrid], target: torch.Tensor, xtx: torch.Tensor) -> torch.Tensor:
    """Least-squares float parameters (fp16 scales, mins) of every block of each row jointly, for the codes
    GPTQ chose, on the full Hessian. Returns the new Ŵ ``(rows, cols)``; ``bg`` is updated in place.

    For one row, Ŵ_r = Σ_{b,k} p_{bk} B_{bk} with B the basis of block b's parameter k, so the best p solves
    (B H Bᵀ) p = B H w_r: a (blocks·K)-square system per row, H = XᵀX. The optimum can sit along directions
    that fp16 rounding ruins (outlier channels, near-duplicate inputs), so each row takes the best of the
    steps p₀ + α (p* − p₀), α ∈ STEPS, rounded to fp16, or keeps p₀.
    """
    keys = [k for k, v in bg[0].p.items() if v.is_floating_point()]
    rows, bs, nb, nk = bg[0].codes.shape[0], bg[0].bt.block_size, len(bg), len(keys)
    hb = xtx.double().reshape(nb, bs, nb, bs)  # float64: H's entries span many decades (outlier channels)
    basis = torch.stack([_basis(g, keys) for g in bg], dim=1)  # (rows, nb, K, bs)
    p0 = torch.stack([torch.stack([g.p[k].reshape(rows) for k in keys], dim=1) for g in bg], dim=1)  # (rows, nb, K)
    best = torch.zeros(rows, nb * nk, dtype=torch.float64)  # the optimum p* - p0, per row
    step = max(1, CHUNK * 4 // (nb * nk * nb * bs))  # bounds the (rows, nb, K, nb, bs) product
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        b = basis[r0:r1].double()
        hbt = torch.einsum("rika,iajb->rikjb", b, hb)  # (r, nb, K, nb, bs)
        a = torch.einsum("rikjb,rjlb->rikjl", hbt, b).reshape(r1 - r0, nb * nk, nb * nk)
        resid = target[r0:r1].double().reshape(r1 - r0, nb, bs) - (b * p0[r0:r1].double().unsqueeze(-1)).sum(2)
        rhs = torch.einsum("rikjb,rjb->rik", hbt, resid).reshape(r1 - r0, -1)
        a.diagonal(dim1=1, dim2=2).add_(1e-9 * a.diagonal(dim1=1, dim2=2).mean(1, keepdim=True).clamp(min=1e-300))
        best[r0:r1] = torch.linalg.solve(a, rhs.unsqueeze(-1)).squeeze(-1).nan_to_num(0.0)

    def values(p: torch.Tensor) -> torch.Tensor:  # (rows, nb, K) -> Ŵ (rows, cols)
        return (basis * p.unsqueeze(-1)).sum(2).reshape(rows, nb * bs)

    w_best = values(p0)
    p_best, err_best = p0, _row_losses(target - w_best, xtx)
    for alpha in STEPS:
        p = S.fp16((p0.double() + alpha * best.reshape(rows, nb, nk)).float())
        w = values(p)
        err = _row_losses(target - w, xtx)
        better = err < err_best
        p_best = torch.where(better.reshape(-1, 1, 1), p, p_best)
        w_best = torch.where(better.unsqueeze(1), w, w_best)
        err_best = torch.where(better, err, err_best)
    for b, g in enumerate(bg):
        for i, k in enumerate(keys):
            g.p[k] = p_best[:, b, i].reshape(g.p[k].shape)
    return w_best
