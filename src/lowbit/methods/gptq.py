"""GPTQ (Frantar et al. 2022): quantize a layer column by column, pushing each column's rounding error onto
the columns not yet quantized through the inverse Hessian of the layer's reconstruction loss.

For a linear layer ``y = x W^T`` with calibration inputs X ``(tokens, in)``, the loss of a quantized Ŵ is
``||X W^T - X Ŵ^T||² / tokens = trace((W-Ŵ) XtX (W-Ŵ)^T) / tokens``. Its Hessian w.r.t. one row of W is
``H = 2 XtX / tokens`` (the same for every row). Quantizing column j with error ``e_j = w_j - q_j`` is best
compensated by moving the later columns by ``-e_j Hinv[j, j:] / Hinv[j, j]``; with ``U`` the upper Cholesky
factor of ``Hinv`` the remaining-column inverses the paper needs are exactly the rows of ``U``.

>>> x = torch.randn(512, 64); w = torch.randn(32, 64)
>>> stats = LayerStats(xtx=x.T @ x, tokens=512)
>>> r = gptq(w, stats, parse_scheme("int4-g32"), MethodConfig())
>>> r.loss < r.info["rtn_loss"]
True
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from lowbit.core.qtensor import QTensor
from lowbit.core.scheme import Scheme
from lowbit.errors import LowbitError
from lowbit.layouts import ColumnGrid, layout_of
from lowbit.methods.registry import (
    LayerStats,
    MethodConfig,
    QuantResult,
    method_options,
    parse_options,
    register_method,
)
from lowbit.methods.rtn import quantize_rtn
from lowbit.primitives.quant import as_matrix

__all__ = ["GptqOptions", "float_target_weight", "gptq", "gptq_quantize", "hessian_inverse_factor",
           "reconstruction_loss"]

log = logging.getLogger(__name__)

# A Cholesky pivot² below this fraction of the largest diagonal entry counts as numerically singular.
MIN_PIVOT = 1e-8


def hessian_inverse_factor(
    h: torch.Tensor, damp: float = 0.01, damp_max: float = 1.0
) -> tuple[torch.Tensor, float, bool]:
    """Upper Cholesky factor U of ``(H + δ·mean(diag H)·I)^-1`` (float64), raising δ ×10 until it works.

    Returns ``(U, δ used, whether δ had to be raised)``; raises LowbitError if δ would exceed ``damp_max``.

    >>> h = torch.tensor([[2.0, 2.0], [2.0, 2.0]], dtype=torch.float64)  # singular
    >>> u, d, raised = hessian_inverse_factor(h, damp=0.0)
    >>> d > 0 and raised
    True
    """
    n = h.shape[0]
    mean_diag = float(h.diagonal().mean())
    max_diag = float(h.diagonal().max())
    ratio, raised = float(damp), False
    while True:
        hd = h.clone()
        hd.diagonal().add_(ratio * mean_diag)
        lower, info = torch.linalg.cholesky_ex(hd)  # (n, n)
        if int(info) == 0 and float(lower.diagonal().min()) ** 2 >= MIN_PIVOT * max_diag:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)  # (n, n) upper
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                return u, ratio, raised
        nxt = ratio * 10 if ratio > 0 else 1e-4
        if nxt > damp_max * (1 + 1e-9):
            raise LowbitError(
                f"gptq: the Hessian ({n}x{n}) is not positive definite even with dampening {ratio:g} "
                f"(option 'damp_max' = {damp_max:g}): the calibration statistics (xtx) look broken"
            )
        ratio, raised = nxt, True


def reconstruction_loss(w: torch.Tensor, w_hat: torch.Tensor, xtx: torch.Tensor, tokens: int) -> float:
    """``||X W^T - X Ŵ^T||² / tokens`` from ``XtX`` ``(in, in)``: ``trace(D XtX D^T) / tokens``, D = W - Ŵ."""
    d = (w.reshape(w.shape[0], -1).float() - w_hat.reshape(w.shape[0], -1).float())  # (out, in)
    return float(((d @ xtx.float()).double() * d.double()).sum()) / max(tokens, 1)


def gptq_quantize(
    weight: torch.Tensor,
    xtx: torch.Tensor,
    tokens: int,
    scheme: Scheme,
    observer: str = "minmax",
    importance: torch.Tensor | None = None,
    block_size: int | None = None,
    damp: float = 0.01,
    damp_max: float = 1.0,
    act_order: bool | None = None,
    static_groups: bool | None = None,
    refit: bool = True,
) -> tuple[QTensor, torch.Tensor, dict]:
    """GPTQ of ``weight`` ``(out, in)`` given ``xtx`` = Σ x xᵀ ``(in, in)`` over ``tokens`` inputs, onto any
    layout: the layout gives the grid of each column group (a group, a GGML block, the whole row).

    Returns ``(qtensor, Ŵ float32 (out, in), info)``. ``act_order`` quantizes columns by decreasing H_ii and
    implies static groups (every group's grid fitted from the original weights up front); without it each
    group's grid is fitted from the error-updated weights when the sweep reaches it. None: the layout's
    default. ``importance`` (``(in,)``, e.g. E[x²]) weights the grid fits (a GGML layout weighs them by the
    Hessian's diagonal when None). ``refit`` then re-solves the grids' float parameters for the chosen codes
    on the full Hessian where the layout has that step (:meth:`Layout.refit`; GGML blocks).

    >>> x = torch.randn(256, 48); w = torch.randn(16, 48)
    >>> q, w_hat, info = gptq_quantize(w, x.T @ x, 256, parse_scheme("int3-g16"))
    >>> torch.equal(q.dequantize(), w_hat)
    True
    """
    t0 = time.perf_counter()
    layout = layout_of(scheme)
    layout.check(scheme, tuple(weight.shape))
    rows, n = as_matrix(tuple(weight.shape))
    if xtx.shape != (n, n):
        raise LowbitError(
            f"gptq: xtx has shape {tuple(xtx.shape)}, expected ({n}, {n}) for a weight {tuple(weight.shape)}"
        )
    if tokens <= 0:
        raise LowbitError("gptq: the statistics saw no tokens: run calibration first")
    block_size = layout.gptq_batch if block_size is None else block_size
    if block_size < 1:
        raise LowbitError(f"gptq: option 'block_size' must be positive, got {block_size}")
    w0 = weight.detach().reshape(rows, n).to(torch.float32)
    if not bool(torch.isfinite(w0).all()):
        raise LowbitError("gptq: the weight holds NaN or Inf values")
    h = xtx.detach().to(device=w0.device, dtype=torch.float64) * (2.0 / tokens)  # (n, n) Hessian of the loss
    if not bool(torch.isfinite(h).all()):
        raise LowbitError("gptq: xtx holds NaN or Inf values")
    if bool((h.diagonal() < 0).any()):
        raise LowbitError("gptq: xtx has negative diagonal entries (it is not a sum of x xᵀ)")

    # Inputs that never fire: their weights cannot matter, quantize them as exact zeros.
    dead = h.diagonal() == 0  # (n,)
    hdiag = (h.diagonal() / 2).float()  # (n,) E[x²]
    h.diagonal()[dead] = 1.0
    w = w0.clone()
    w[:, dead] = 0.0
    imp = None if importance is None else importance.detach().float().to(w.device)
    imp = layout.gptq_importance(hdiag, imp)

    g = layout.group_width(scheme, n)
    n_groups = -(-n // g)
    act_order = layout.gptq_act_order if act_order is None else bool(act_order)
    static = bool(static_groups) or act_order or n_groups == 1

    def fit(k: int, cols: torch.Tensor) -> ColumnGrid:  # cols (rows, gk): group k's current weights
        sl = slice(k * g, min(n, (k + 1) * g))
        return layout.fit_group(cols, scheme, hdiag[sl], None if imp is None else imp[sl], observer, rows)

    grids: list[ColumnGrid | None] = [None] * n_groups
    if static:
        for k in range(n_groups):
            grids[k] = fit(k, w[:, k * g:(k + 1) * g])

    perm = None
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)  # (n,)
        w = w[:, perm]
        h = h[perm][:, perm]
    u64, damp_used, raised = hessian_inverse_factor(h, damp, damp_max)
    u = u64.to(torch.float32)  # (n, n) upper
    orig = (perm if perm is not None else torch.arange(n)).tolist()  # original column of each processed one

    # Work on Wᵀ (n, rows) so a column of W is a contiguous row.
    wt = w.t().contiguous()  # (n, rows)
    qt = torch.empty_like(wt)  # (n, rows) quantized columns
    lat = torch.empty_like(wt)  # (n, rows) each column as it was rounded (the earlier columns' errors added)
    bs = block_size
    if not static and g <= bs:
        bs = (bs // g) * g  # whole groups per block: a group's current values all live in the block
    i1 = 0
    while i1 < n:
        i2 = min(i1 + bs, n)
        if not static and g > bs:
            i2 = min(i2, (i1 // g + 1) * g)  # blocks never straddle a group start
        w1 = wt[i1:i2].clone()  # (b, rows) current weights of the block's columns
        e1 = torch.empty_like(w1)  # (b, rows) scaled errors
        u1 = u[i1:i2, i1:i2]  # (b, b)
        for i in range(i2 - i1):
            j = orig[i1 + i]
            k = j // g
            if not static and j % g == 0:
                end = min(j + g, n)  # the last group may be ragged
                src = w1[i : i + end - j] if end <= i2 else wt[j:end]  # (gk, rows); wt is current at i == 0
                grids[k] = fit(k, src.t())
            col = w1[i]  # (rows,)
            lat[i1 + i] = col
            q = grids[k].round(j - k * g, col)  # type: ignore[union-attr]
            qt[i1 + i] = q
            err = (col - q).div_(u1[i, i])  # (rows,)
            e1[i] = err
            w1[i:].addr_(u1[i, i:], err, alpha=-1.0)  # (b-i, rows) -= Hinv row ⊗ error
        if i2 < n:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), e1, alpha=-1.0)  # lazy update of the later columns
        i1 = i2

    w_hat = qt.t()  # (rows, n) in processing order
    if perm is not None:
        w_hat = w_hat[:, torch.argsort(perm)]
    w_hat = w_hat.contiguous()
    latent = lat.t() if perm is None else lat.t()[:, torch.argsort(perm)]
    refitted = layout.refit(scheme, grids, w0.masked_fill(dead, 0.0), xtx.detach().to(w0)) if refit else None  # type: ignore[arg-type]
    if refitted is not None:
        w_hat = refitted
    qtensor = layout.assemble(scheme, tuple(weight.shape), weight.dtype, grids, w_hat)  # type: ignore[arg-type]
    info = {
        "damp": damp_used,
        "damp_raised": raised,
        "dead_columns": int(dead.sum()),
        "act_order": bool(act_order),
        "static_groups": bool(static),
        "refit": refitted is not None,
        "seconds": time.perf_counter() - t0,
        # the weights GPTQ rounded (rows, n): on the grid found they round to its codes, so training from them
        # (lowbit.qat) starts exactly at GPTQ's result with weights that sit between grid points, as in training
        "latent": latent.contiguous(),
    }
    if raised:
        log.warning("gptq: Hessian dampening raised to %g of the mean diagonal", damp_used)
    return qtensor, w_hat, info


def float_target_weight(weight: torch.Tensor, xtx: torch.Tensor, cross: torch.Tensor, damp: float = 0.01
                        ) -> torch.Tensor:
    """The weight W* whose outputs on the quantized path's inputs X̃ best match the float model's ``W X``.

    Later layers see X̃ (the inputs after earlier layers were quantized), not X. Since
    ``‖W X − Ŵ X̃‖² = ‖(W* − Ŵ) X̃‖² + const`` with ``W* = W (Σ x x̃ᵀ)(Σ x̃ x̃ᵀ)⁻¹``, GPTQ on W* with the
    usual Hessian minimises the error against the float outputs and so corrects the error accumulated
    upstream (the asymmetric calibration of GPTAQ, Li et al. 2025). ``xtx`` = Σ x̃ x̃ᵀ, ``cross`` = Σ x x̃ᵀ,
    both ``(in, in)``; the same relative dampening as GPTQ's keeps the solve well posed.

    >>> x = torch.randn(400, 8); w = torch.randn(3, 8)
    >>> torch.allclose(float_target_weight(w, x.T @ x, x.T @ x, damp=0.0), w, atol=1e-4)
    True
    """
    rows, n = as_matrix(tuple(weight.shape))
    if cross.shape != (n, n):
        raise LowbitError(f"gptq: xtx_cross has shape {tuple(cross.shape)}, expected ({n}, {n})")
    a = xtx.detach().to(torch.float64).clone()  # (n, n)
    dead = a.diagonal() == 0
    a.diagonal().add_(damp * float(a.diagonal().mean()))
    a.diagonal()[dead] = 1.0
    rhs = cross.detach().to(torch.float64).T @ weight.detach().reshape(rows, n).to(torch.float64).T  # (n, rows)
    w_star = torch.linalg.solve(a, rhs).T  # (rows, n): W* = W B A⁻¹, A symmetric
    if not bool(torch.isfinite(w_star).all()):
        raise LowbitError("gptq: the float-target solve gave NaN/Inf (the calibration statistics look broken)")
    return w_star.to(torch.float32).reshape(weight.shape)


@dataclass(frozen=True)
class GptqOptions:
    damp: float = field(default=0.01, metadata={"help": "Hessian dampening, a fraction of its mean diagonal"})
    damp_max: float = field(default=1.0, metadata={"help": "give up when dampening would exceed this"})
    block_size: int | None = field(default=None, metadata={
        "help": "columns per lazy-update batch (default: the layout's: 128 grouped, 256 GGML)"})
    act_order: bool | None = field(default=None, metadata={
        "help": "columns by decreasing H_ii with static groups (default: the layout's: on for grouped "
                "schemes, off for GGML blocks)"})
    static_groups: bool | None = field(default=None, metadata={"help": "fit every group's grid up front"})
    refit: bool = field(default=True, metadata={
        "help": "after the sweep, re-solve each row's block scales for the chosen codes on the full Hessian "
                "(GGML types)"})
    float_target: bool = field(default=False, metadata={
        "help": "aim at the float model's outputs (collects cross statistics)", "wants": "cross"})


@register_method("gptq", needs=("xtx",), options=GptqOptions, fallback="hqq")
def gptq(weight: torch.Tensor, stats: LayerStats, scheme: Scheme, config: MethodConfig) -> QuantResult:
    """GPTQ: round column by column, pushing each column's error onto the later ones.

    Options (:class:`GptqOptions`): ``damp`` (0.01), ``damp_max`` (1.0), ``block_size`` (128),
    ``act_order`` (True: columns by decreasing H_ii, with static groups; see bench/RESULTS.md for SmolLM2),
    ``static_groups`` (default: = act_order),
    ``float_target`` (False: aim at the float model's outputs, see :func:`float_target_weight`; needs
    ``stats.xtx_cross``, which the calibration runner collects when the option is set). ``loss`` is the
    output reconstruction loss ``||XWᵀ - XŴᵀ||²/tokens`` (from the float target when set);
    ``info["rtn_loss"]`` the same for min-max RTN.

    >>> x = torch.randn(256, 64)
    >>> r = gptq(torch.randn(8, 64), LayerStats(xtx=x.T @ x, tokens=256), parse_scheme("int4-g32"),
    ...          MethodConfig(options={"act_order": True}))
    >>> r.info["act_order"], r.qtensor.shape
    (True, (8, 64))
    """
    if stats.xtx is None:
        raise LowbitError("gptq needs calibration statistics (xtx): run calibration first")
    o = parse_options("gptq", GptqOptions, method_options(config))
    imp = None
    if config.importance:
        if stats.sq_mean is None:
            raise LowbitError("gptq: importance weighting needs sq_mean statistics: run calibration first")
        imp = stats.sq_mean.detach().float()
    target = weight.detach()
    float_target = o.float_target and stats.xtx_cross is not None
    if float_target:
        assert stats.xtx_cross is not None
        target = float_target_weight(target, stats.xtx, stats.xtx_cross, o.damp)
    q, w_hat, info = gptq_quantize(
        target, stats.xtx, stats.tokens, scheme, observer=config.observer, importance=imp,
        block_size=o.block_size, damp=o.damp, damp_max=o.damp_max, act_order=o.act_order,
        static_groups=o.static_groups, refit=o.refit,
    )
    info["float_target"] = float_target
    w2 = target.reshape(w_hat.shape)  # with float_target, losses are measured from the target (up to a constant)
    loss = reconstruction_loss(w2, w_hat, stats.xtx, stats.tokens)
    rtn_hat = quantize_rtn(weight.detach(), scheme).dequantize(torch.float32).reshape(w_hat.shape)
    info["rtn_loss"] = reconstruction_loss(w2, rtn_hat, stats.xtx, stats.tokens)
    return QuantResult(q, loss, info)
