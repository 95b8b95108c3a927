"""The calibration runner: capture block 0's inputs, then walk the blocks one at a time.

Per block: hooks observe each layer's input statistics (X^T X, E[x²], absmax, a row sample) →
the caller quantizes the layers → the block's outputs are recomputed with the quantized weights and
become the next block's inputs. Only one block's statistics and the calibration activations
(``windows × tokens × hidden`` floats) are held at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.methods.registry import LayerStats
from lowbit.model.device import module_device
from lowbit.primitives.observers import HistogramObserver


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early (we have what we came for)."""


@dataclass
class BlockInput:
    hidden: torch.Tensor  # (B, T, H)
    kwargs: dict[str, Any]
    first_window: int  # index of the batch's first calibration window, for error messages


def capture_block_inputs(model: nn.Module, block: nn.Module, windows: torch.Tensor,
                         batch_size: int = 8) -> list[BlockInput]:
    """Run ``model`` on ``windows`` (N, T) up to ``block`` and return what ``block`` was called with (on the
    model's device)."""
    captured: list[BlockInput] = []
    device = module_device(model)
    state = {"start": 0}

    def pre_hook(mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache",
                                                            "layer_past", "cache_position")}
        captured.append(BlockInput(hidden.detach(), kw, state["start"]))
        raise _StopForward

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                state["start"] = start
                batch = windows[start : start + batch_size].to(device)
                try:
                    model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if len(captured) != -(-windows.shape[0] // batch_size):
        raise LowbitError("calibration: the first block was not reached by the model's forward pass")
    return captured


def _block_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def run_block(block: nn.Module, inputs: list[BlockInput]) -> list[BlockInput]:
    """The block's outputs for every batch: the next block's inputs."""
    outs = []
    with torch.no_grad():
        for bi in inputs:
            h = _block_out(block(bi.hidden, **bi.kwargs))
            outs.append(BlockInput(h.detach(), bi.kwargs, bi.first_window))
    return outs


@dataclass
class StatsCollector:
    """Accumulates one layer's input statistics from a forward hook."""

    name: str
    want_xtx: bool
    sample_rows: int = 0
    xtx: torch.Tensor | None = None
    sq_sum: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    tokens: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)
    window: int = 0
    act_observer: str | None = None  # minmax | percentile | entropy: per-tensor range for static activations
    hist: HistogramObserver | None = None
    cross: torch.Tensor | None = None  # Σ x_ref xᵀ (in, in), when the float path's inputs are given

    def update(self, x: torch.Tensor, x_ref: torch.Tensor | None = None, shared: dict | None = None) -> None:
        """Add one batch of inputs ``x`` (..., in). ``shared``: products already computed from the same
        tensor by another layer in this batch (q/k/v and gate/up read one input), filled in here for the next.
        """
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)  # (tokens, in)
        shared = {} if shared is None else shared
        if x_ref is not None:
            xr = x_ref.reshape(-1, x_ref.shape[-1]).to(torch.float32)  # (tokens, in), same tokens as x
            if self.cross is None:
                self.cross = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            self.cross += (xr.T @ x).double()
        if "amax" not in shared:
            shared["amax"] = x.abs().amax(dim=0)
        amax = shared["amax"]
        if not torch.isfinite(amax).all():
            raise LowbitError(f"layer {self.name}: NaN/Inf in its input activations "
                              f"(calibration batch starting at window {self.window})")
        if self.sq_sum is None:
            self.sq_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.absmax = torch.zeros(x.shape[1], device=x.device)
            if self.want_xtx:
                self.xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        if self.act_observer in ("percentile", "entropy"):
            self.hist = self.hist or HistogramObserver()
            self.hist.update(x)
        if "sq" not in shared:
            shared["sq"] = x.square().sum(dim=0, dtype=torch.float64)
        self.sq_sum += shared["sq"]
        self.absmax = torch.maximum(self.absmax, amax)
        if self.xtx is not None:
            if "xtx" not in shared:
                shared["xtx"] = (x.T @ x).double()
            self.xtx += shared["xtx"]
        if self.sample_rows:
            g = torch.Generator().manual_seed(self.tokens)  # on the CPU: the same rows on every device
            k = min(x.shape[0], max(1, self.sample_rows // 16))
            self.samples.append(x[torch.randperm(x.shape[0], generator=g)[:k].to(x.device)].clone())
        self.tokens += x.shape[0]

    def merge(self, other: StatsCollector) -> StatsCollector:
        """Add what ``other`` saw of the same layer (another shard of the calibration windows): sums add,
        maxima take the max, samples are kept in order; merged statistics equal one pass over both shards
        up to float summation order.
        """
        if other.name != self.name or other.want_xtx != self.want_xtx:
            raise LowbitError(f"calibration: cannot merge statistics of {other.name} into {self.name}")
        if other.tokens == 0:
            return self
        if self.tokens == 0:
            for f in ("xtx", "sq_sum", "absmax", "cross", "hist"):
                setattr(self, f, getattr(other, f))
            self.samples = list(other.samples)
            self.tokens = other.tokens
            return self

        def add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            return None if a is None or b is None else a + b

        self.xtx, self.sq_sum, self.cross = add(self.xtx, other.xtx), add(self.sq_sum, other.sq_sum), add(
            self.cross, other.cross)
        assert self.absmax is not None and other.absmax is not None
        self.absmax = torch.maximum(self.absmax, other.absmax)
        if other.hist is not None:
            self.hist = other.hist if self.hist is None else self.hist.merge(other.hist)
        self.samples += other.samples
        self.tokens += other.tokens
        return self

    def stats(self) -> LayerStats:
        if self.tokens == 0:
            return LayerStats()
        assert self.sq_sum is not None
        sample = torch.cat(self.samples)[: self.sample_rows] if self.samples else None
        act_range = None
        if self.act_observer == "minmax":
            act_range = float(self.absmax.max())
        elif self.act_observer == "percentile" and self.hist is not None:
            act_range = self.hist.percentile(99.99)
        elif self.act_observer == "entropy" and self.hist is not None:
            act_range = self.hist.entropy()
        return LayerStats(
            act_range=act_range,
            xtx=None if self.xtx is None else self.xtx.to(torch.float32),
            sq_mean=(self.sq_sum / self.tokens).to(torch.float32),
            absmax=self.absmax,
            tokens=self.tokens,
            sample=sample,
            xtx_cross=None if self.cross is None else self.cross.to(torch.float32),
        )


@dataclass
class FloatPath:
    """The float model's copy of the current block and its inputs on the float model's path, batch for
    batch aligned with the quantized path's inputs; ``layers`` maps the collected layers' names to the
    copy's modules."""

    block: nn.Module
    inputs: list[BlockInput]
    layers: dict[str, nn.Module]


def _run_until(block: nn.Module, bi: BlockInput) -> None:
    try:
        block(bi.hidden, **bi.kwargs)
    except _StopForward:
        pass


def collect_stats(block: nn.Module, inputs: list[BlockInput], layers: dict[str, nn.Module],
                  want_xtx: set[str], sample_rows: int = 0, stop_after: Iterable[str] = (),
                  act_observers: dict[str, str] | None = None,
                  float_path: FloatPath | None = None, outputs: list[torch.Tensor] | None = None,
                  kept_inputs: dict[str, list[torch.Tensor]] | None = None) -> dict[str, LayerStats]:
    """Run the block over ``inputs`` with hooks on ``layers`` (block-relative names -> modules).

    The forward stops early once every layer in ``stop_after`` has seen its input. With ``float_path``,
    the float block also runs on the float path's inputs and each layer's ``xtx_cross`` (Σ x_float xᵀ)
    is collected beside ``xtx``. Layers that read the same input tensor share its products (one XᵀX for
    q, k and v). ``outputs`` (a list, with no ``stop_after``) receives the block's output per batch, and
    ``kept_inputs`` (name -> list) the raw inputs of the named layers per batch.
    """
    if outputs is not None and stop_after:
        raise ValueError("collect_stats: outputs need the whole forward (no stop_after)")
    keep = kept_inputs or {}
    obs = act_observers or {}
    collectors = {n: StatsCollector(n, n in want_xtx, sample_rows, act_observer=obs.get(n)) for n in layers}
    stop = set(stop_after)
    seen: set[str] = set()
    ref_x: dict[str, torch.Tensor] = {}
    # id() of an input tensor seen in this batch -> its products; the entry holds the tensor itself, so its
    # id cannot be reused by another tensor before the batch ends.
    products: dict[int, dict] = {}

    def make_hook(n: str):
        def hook(mod, args):
            x = args[0]
            shared = products.setdefault(id(x), {"tensor": x})
            collectors[n].update(x, ref_x.pop(n, None) if float_path is not None else None, shared)
            if n in keep:
                keep[n].append(x.detach())
            seen.add(n)
            if stop and stop <= seen:
                raise _StopForward

        return hook

    def make_ref_hook(n: str):
        def hook(mod, args):
            ref_x[n] = args[0].detach()
            seen.add(n)
            if stop and stop <= seen:
                raise _StopForward

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    if float_path is not None:
        if len(float_path.inputs) != len(inputs):
            raise LowbitError("calibration: the float path and the quantized path hold different batches")
        handles += [m.register_forward_pre_hook(make_ref_hook(n)) for n, m in float_path.layers.items()]
    try:
        with torch.no_grad():
            for b, bi in enumerate(inputs):
                for c in collectors.values():
                    c.window = bi.first_window
                if float_path is not None:
                    seen.clear()
                    _run_until(float_path.block, float_path.inputs[b])
                seen.clear()
                products.clear()
                if outputs is not None:
                    outputs.append(_block_out(block(bi.hidden, **bi.kwargs)).detach())
                else:
                    _run_until(block, bi)
    finally:
        for h in handles:
            h.remove()
    return {n: c.stats() for n, c in collectors.items()}
