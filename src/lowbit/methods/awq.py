"""AWQ (Lin et al. 2024): activation-aware per-input-channel scaling, plus an output-aware clip search.

Two pure pieces:

* :func:`search_scales` — for layers sharing one input X (n, in), find s (in,) minimising
  Σ ‖X Wᵀ − (X / s) Q(W · s)ᵀ‖², with s = mean|x|^α normalised, α on a grid in [0, 1]. The caller folds
  1/s into the op that produces X (a norm's weight or a linear's rows), so the float function is unchanged.
* :func:`hessian_clip` — per (row, group) clipping shrink minimising the output error dᵀ H_g d, where d is
  the group's weight error and H_g the group's diagonal block of XᵀX.

The registered method ``awq`` quantizes one (already scaled) layer by RTN with that clip search; ``awq+gptq``
hands the scaled layer to GPTQ.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from lowbit.core.qtensor import QTensor
from lowbit.core.scheme import Scheme
from lowbit.layouts import layout_of
from lowbit.methods.gptq import GptqOptions
from lowbit.methods.registry import LayerStats, MethodConfig, QuantResult, get_method, register_method
from lowbit.primitives.observers import minmax
from lowbit.primitives.quant import group_view, ungroup

SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def _fake(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """RTN min-max quantize → dequantize of a (out, in) weight, float32; a GGML type is rounded on its
    layout's grouped proxy (same width and sub-block), as AWQ's search only ranks candidate scalings."""
    scheme = layout_of(scheme).proxy(scheme)
    xg = group_view(w, scheme.granularity, scheme.group_size)
    grid = scheme.grid
    s, z = grid.qparams(*minmax(xg, grid)) if grid.has_scale else (None, None)
    return ungroup(grid.fake(xg, s, z), tuple(w.shape))


def search_scales(x: torch.Tensor, weights: list[torch.Tensor], scheme: Scheme, n_grid: int = 20
                  ) -> tuple[torch.Tensor, dict]:
    """Per-input-channel scales (in,) for layers reading ``x`` (n, in); 1.0 everywhere when scaling doesn't help.

    >>> attn = model.model.layers[0].self_attn
    >>> x = torch.randn(512, 256) * torch.linspace(0.1, 5.0, 256)   # (tokens, hidden): some channels much larger
    >>> weights = [m.weight.detach() for m in (attn.q_proj, attn.k_proj, attn.v_proj)]   # all three read x
    >>> s, info = search_scales(x, weights, parse_scheme("int4-g128"))
    >>> s.shape, info["alpha"] > 0, info["loss"] < info["loss_unscaled"]
    (torch.Size([256]), True, True)
    """
    x = x.to(torch.float32)
    x_mean = x.abs().mean(dim=0).clamp(min=1e-8)  # (in,)
    refs = [x @ w.T for w in weights]  # each (n, out)
    best_s = torch.ones_like(x_mean)
    best_loss, best_a = None, 0.0
    losses = []
    for i in range(n_grid + 1):
        a = i / n_grid
        s = x_mean.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        xs = x / s
        loss = sum(float((xs @ _fake(w * s, scheme).T - r).square().sum()) for w, r in zip(weights, refs, strict=True))
        losses.append(loss)
        if best_loss is None or loss < best_loss:
            best_loss, best_s, best_a = loss, s, a
    info = {"alpha": best_a, "loss": best_loss, "loss_unscaled": losses[0]}
    if _fake_rounds_on_a_proxy(scheme) and best_a > 0:
        # The proxy only ranks scalings. A GGML type's real fit can hold a grid the weights already sit on
        # (a Q4_1 model's blocks fit Q5_1/Q4_1 exactly) that any scaling loses: check the pick against none.
        real = _real_fit_loss(x, weights, refs, best_s, scheme)
        unscaled = _real_fit_loss(x, weights, refs, torch.ones_like(x_mean), scheme)
        info.update(real_loss=real, real_loss_unscaled=unscaled)
        if unscaled <= real:
            best_s, info["alpha"] = torch.ones_like(x_mean), 0.0
    return best_s, info


def _fake_rounds_on_a_proxy(scheme: Scheme) -> bool:
    """:func:`_fake` rounds ``scheme`` on a stand-in grid (its layout's proxy), not on its own fit."""
    return layout_of(scheme).proxy(scheme) != scheme


def _real_fit_loss(x: torch.Tensor, weights: list[torch.Tensor], refs: list[torch.Tensor], s: torch.Tensor,
                   scheme: Scheme) -> float:
    """Σ ‖X Wᵀ − (X / s) Q(W · s)ᵀ‖² with Q the layout's own fit, weighted by E[(x / s)²] as quantization is."""
    xs = x / s
    imp = xs.square().mean(dim=0)
    layout = layout_of(scheme)
    return sum(float((xs @ layout.quantize(w * s, scheme, importance=imp).dequantize(torch.float32).T - r)
                     .square().sum()) for w, r in zip(weights, refs, strict=True))


def hessian_clip(w: torch.Tensor, xtx: torch.Tensor, scheme: Scheme, shrinks: tuple[float, ...] = SHRINKS
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping range (lo, hi) per group minimising the group's output error (block-diagonal Hessian)."""
    grid = scheme.grid
    xg = group_view(w, scheme.granularity, scheme.group_size)  # (R, G, g)
    R, G, g = xg.shape
    if scheme.granularity == "tensor":
        return minmax(xg, grid)
    n_in = w.shape[1]
    H = torch.nn.functional.pad(xtx.to(torch.float32), (0, G * g - n_in, 0, G * g - n_in))
    Hb = torch.stack([H[j * g:(j + 1) * g, j * g:(j + 1) * g] for j in range(G)])  # (G, g, g)
    lo0, hi0 = minmax(xg, grid)
    best_lo, best_hi, best_err = lo0, hi0, None
    for a in shrinks:
        lo, hi = lo0 * a, hi0 * a
        s, z = grid.qparams(lo, hi)
        d = grid.fake(xg, s, z) - xg  # (R, G, g)
        err = torch.einsum("rgi,gij,rgj->rg", d, Hb, d).unsqueeze(-1)  # (R, G, 1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


def output_loss(w: torch.Tensor, w_hat: torch.Tensor, xtx: torch.Tensor, tokens: int) -> float:
    """‖X Wᵀ − X Ŵᵀ‖² / tokens from XᵀX."""
    d = (w - w_hat).to(torch.float64)
    return float(torch.einsum("oi,ij,oj->", d, xtx.to(torch.float64), d)) / max(tokens, 1)


@dataclass(frozen=True)
class AwqOptions:
    awq_grid: int = field(default=20, metadata={"help": "points of the scale search's alpha grid in [0, 1]"})


@dataclass(frozen=True)
class AwqGptqOptions(GptqOptions, AwqOptions):
    pass


def _without_awq(config: MethodConfig) -> MethodConfig:
    own = AwqOptions.__dataclass_fields__
    return replace(config, options={k: v for k, v in config.options.items() if k not in own})


@register_method("awq", needs=("xtx",), transform="awq", options=AwqOptions, fallback="hqq")
def awq(weight: torch.Tensor, stats: LayerStats, scheme: Scheme, config: MethodConfig) -> QuantResult:
    """Activation-aware input scaling, then RTN with an output-aware clip search (the block search, weighted
    by E[x²], for GGML types)."""
    w = weight.to(torch.float32)
    if scheme.layout != "affine":  # a GGML type's own fit is already an importance-weighted search
        return get_method("rtn")(weight, stats, scheme, replace(_without_awq(config), importance=True))
    if stats.xtx is None or not scheme.grid.has_scale:
        return get_method("rtn")(weight, stats, scheme, _without_awq(config))
    lo, hi = hessian_clip(w, stats.xtx, scheme)
    q = QTensor.quantize(w, scheme, lo, hi)
    q.dtype = weight.dtype
    loss = output_loss(w, q.dequantize(torch.float32), stats.xtx, stats.tokens)
    return QuantResult(q, loss)


@register_method("awq+gptq", needs=("xtx",), transform="awq", options=AwqGptqOptions, fallback="hqq")
def awq_gptq(weight: torch.Tensor, stats: LayerStats, scheme: Scheme, config: MethodConfig) -> QuantResult:
    """AWQ's input scaling, then GPTQ's rounding of the scaled layer."""
    return get_method("gptq")(weight, stats, scheme, _without_awq(config))
