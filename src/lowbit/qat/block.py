"""Block-wise reconstruction (EfficientQAT's Block-AP): train one block's quantized layers on their exact grids
so the block reproduces the float model's block outputs.

The block's layers arrive quantized by the starting method (GPTQ, AWQ+GPTQ, RTN …). Each becomes a
:class:`~lowbit.qat.modules.QATLinear` whose latent weight starts at the quantized weight Ŵ and whose grid
starts at the method's scales, so step 0 *is* the post-training result. Inputs are the quantized model's own
activations at this block (the earlier blocks already trained), targets the float model's block outputs;
the loss is their squared difference, token by token relative to the target's (:func:`error`). A few
windows are held out: the trained block is kept only when its held-out loss is lower than the starting one,
so training never leaves a block worse than its PTQ start.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.model.calibrate import BlockInput, _block_out
from lowbit.qat.modules import QATLinear, swapped_in, train_steps


@dataclass(frozen=True)
class BlockTrainOptions:
    epochs: float = 2.0  # passes over the training windows
    lr: float = 1e-4  # latent weights (Adam)
    scale_lr: float = 1e-4  # grid parameters (scales, zero-points, mins)
    batch_windows: int = 2  # windows per step
    val_windows: int = 4  # held out to decide whether the trained block is kept
    seed: int = 0
    loss: str = "token"  # "token": each token's squared error relative to its target's; "mse": plain


@dataclass
class BlockTraining:
    """What training did to one block."""

    loss_before: float  # held-out MSE of the block's output at its PTQ start
    loss_after: float  # ... after training
    kept: bool  # the trained layers replaced the PTQ ones
    steps: int
    seconds: float

    def note(self) -> str:
        verdict = "kept" if self.kept else "PTQ kept (training did not lower it)"
        return f"qat block loss {self.loss_before:.3g} -> {self.loss_after:.3g}, {self.steps} steps, {verdict}"


def _slice(v: Any, i: int, j: int, batch: int) -> Any:
    """``v`` restricted to windows ``i:j`` of a batch of ``batch``: tensors whose first dimension is the batch
    are sliced (recursively in tuples and lists), anything else is shared."""
    if isinstance(v, torch.Tensor):
        return v[i:j] if v.dim() > 0 and v.shape[0] == batch and batch > 1 else v
    if isinstance(v, tuple | list):
        return type(v)(_slice(x, i, j, batch) for x in v)
    return v


def split_windows(inputs: Sequence[BlockInput], targets: Sequence[torch.Tensor], per: int
                  ) -> list[tuple[BlockInput, torch.Tensor]]:
    """Minibatches of ``per`` windows cut from the runner's calibration batches (with their targets)."""
    out = []
    for bi, t in zip(inputs, targets, strict=True):
        b = bi.hidden.shape[0]
        for i in range(0, b, per):
            j = min(b, i + per)
            kw = {k: _slice(v, i, j, b) for k, v in bi.kwargs.items()}
            out.append((BlockInput(bi.hidden[i:j], kw, bi.first_window + i), t[i:j]))
    return out


LOSSES = ("token", "mse")


def error(y: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token error ``(…,)`` of block outputs ``y`` against targets ``t`` ``(…, hidden)``: the mean squared
    error (``mse``), or it divided by the target's mean square (``token``): every token counts alike, where
    plain MSE is ruled by the few tokens that carry the model's huge activations (the first of each window
    in SmolLM2, norms ~10³ times the others'), which the next block's RMSNorm scales away anyway."""
    d = (y.float() - t.float()).square().mean(-1)
    return d if kind == "mse" else d / t.float().square().mean(-1).clamp(min=1e-12)


def _loss(block: nn.Module, batches: list[tuple[BlockInput, torch.Tensor]], kind: str) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for bi, t in batches:
            e = error(_block_out(block(bi.hidden, **bi.kwargs)), t, kind)
            total += float(e.sum())
            n += e.numel()
    return total / max(n, 1)


def train_block(block: nn.Module, names: Sequence[str], inputs: Sequence[BlockInput],
                targets: Sequence[torch.Tensor], opts: BlockTrainOptions, *, label: str = "qat",
                progress: bool | None = None, latents: dict[str, torch.Tensor | None] | None = None,
                trained_latents: dict[str, torch.Tensor] | None = None) -> BlockTraining:
    """Train the quantized layers ``names`` (block-relative, each a ``QLinear``) of ``block`` so that
    ``block(inputs)`` approaches ``targets``; the layers end as ``QLinear`` again, holding the trained weights
    (or, when training did not lower the held-out loss, their starting ones).

    ``latents``: per layer, the weight training starts from (the one its method rounded: GPTQ's error-updated
    weights, the float weight for RTN), default the quantized weight itself. The difference matters: a weight
    sitting exactly on a grid point gives its scale no gradient (LSQ's ``round(w/s) − w/s`` is 0 there).
    ``trained_latents``, when given, receives each layer's latent weight as the block ends (trained, or the
    starting one when the PTQ layers are kept): where a later end-to-end step starts from."""
    if opts.loss not in LOSSES:
        raise LowbitError(f"qat: loss {opts.loss!r} is not one of {', '.join(LOSSES)}")
    t0 = time.perf_counter()
    batches = split_windows(inputs, targets, max(1, opts.batch_windows))
    n_val = min(len(batches) // 4, max(0, -(-opts.val_windows // max(1, opts.batch_windows))))
    val = batches[len(batches) - n_val:] if n_val else batches
    train = batches[: len(batches) - n_val] if n_val else batches
    before = _loss(block, val, opts.loss)

    originals = {n: block.get_submodule(n) for n in names}
    latents = latents or {}
    qat = {n: QATLinear(m.qweight, m.qweight.dequantize(torch.float32) if latents.get(n) is None else latents[n],
                        m.bias) for n, m in originals.items()}
    with swapped_in(block, originals, qat):
        weights = [m.weight for m in qat.values()]
        grids = [p for m in qat.values() for p in m.grid_params()]
        steps = max(1, math.ceil(opts.epochs * len(train)))

        def loss_of(i: int) -> torch.Tensor:
            bi, t = train[i]
            return error(_block_out(block(bi.hidden, **bi.kwargs)), t, opts.loss).mean()

        train_steps([{"params": weights, "lr": opts.lr}, {"params": grids, "lr": opts.scale_lr}], steps, len(train),
                    loss_of, seed=opts.seed, label=label, progress=progress)
        after = _loss(block, val, opts.loss)
        kept = bool(after < before)  # False for NaN too
        for n, m in qat.items():
            if kept:
                originals[n].qweight = m.to_qtensor()
            if trained_latents is not None:
                trained_latents[n] = (m.weight if kept else m.start_weight).detach().clone()
    return BlockTraining(before, after, kept, steps, time.perf_counter() - t0)

