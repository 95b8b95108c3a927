"""``QATLinear``: a linear layer that trains on the exact grid it will be stored on.

It holds a latent float weight (a parameter) and its layout's grid parameters (scales, zero-points, GGML
super-scales and mins: the floating-point ones are parameters, integer sub-scales stay buffers). Its forward
uses the layout's differentiable form (:meth:`lowbit.layouts.base.Layout.learned_fake`), whose value is
bit for bit the weight :meth:`to_qtensor` stores, so what training sees is what every runtime computes; the
gradient passes straight through the rounding to the weight and, LSQ-style, to the grid. Grid parameters
train as ``θ``: scales as ``s0·exp(θ)`` (relative steps, never crossing zero), code-unit offsets as ``z0 + θ``.

>>> q = lowbit.quantize_tensor(torch.randn(16, 64), "int4-g32")
>>> layer = QATLinear(q, q.dequantize(torch.float32))
>>> torch.equal(layer.fake_weight(), layer.to_qtensor().dequantize(torch.float32))
True
>>> sorted(n for n, _ in layer.named_parameters())
['grid_s', 'grid_z', 'weight']
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from lowbit.core.qtensor import QTensor
from lowbit.layouts import layout_of
from lowbit.model.qmodules import QConv2d


class QATLinear(nn.Module):
    """``y = x fake(W)ᵀ + b`` with ``W`` the latent weight ``(out, in)`` and ``fake`` the layout's trainable form of
    ``q``'s grid (``q`` gives the scheme, the shape and the grid's starting parameters)."""

    def __init__(self, q: QTensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.template = q
        self.layout = layout_of(q.scheme)
        self.out_features, self.in_features = q.shape
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone().reshape(q.shape))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32).clone(), requires_grad=False)
        self._grid: list[str] = []
        for k, v in self.layout.learnable(q).items():
            self.register_buffer(f"start_{k}", v.detach().clone() if not v.is_floating_point()
                                 else v.detach().to(torch.float32).clone())
            if v.is_floating_point():  # θ: p = p0 + θ (offsets) or p0·exp(θ) (scales), 0 at the start
                self.register_parameter(f"grid_{k}", nn.Parameter(torch.zeros_like(v, dtype=torch.float32)))
            self._grid.append(k)
        with torch.no_grad():  # start exactly at q: a latent weight that would round elsewhere starts at its value
            stored = q.dequantize(torch.float32).reshape(q.shape)
            off = self.fake_weight() != stored  # (a GGML type's scales refit after its codes were chosen, e.g.)
            if bool(off.any()):
                self.weight[off] = stored[off]
        self.start_weight = self.weight.detach().clone()  # not a buffer: what training started from
        # the bias the forward adds, from the bias parameter: None adds it as it is; the full-integer scheme puts
        # it on its accumulator's grid (lowbit.qat.static), whose scale moves with the trained grids
        self.bias_grid: Callable[[QATLinear], torch.Tensor] | None = None

    def grid_params(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.startswith("grid_")]

    def grid_values(self) -> dict[str, torch.Tensor]:
        """The grid's parameters as they are now (trained), before rounding to their stored precision."""
        out = {}
        for k in self._grid:
            p0 = getattr(self, f"start_{k}")
            theta = getattr(self, f"grid_{k}", None)
            if theta is None:
                out[k] = p0
            elif k in self.layout.learned_offsets:
                out[k] = p0 + theta
            else:
                out[k] = p0 * torch.exp(theta)
        return out

    def fake_weight(self) -> torch.Tensor:
        return self.layout.learned_fake(self.weight, self.template, self.grid_values())

    def current_bias(self) -> torch.Tensor | None:
        if self.bias is None or self.bias_grid is None:
            return self.bias
        return self.bias_grid(self)

    def current_weight(self) -> torch.Tensor:
        """The fake weight, (out, in), for this forward."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            # the fake weight's intermediates (several weight-sized tensors per layer) are recomputed in the
            # backward pass instead of kept: end-to-end training holds every layer's at once otherwise
            return checkpoint(self.fake_weight, use_reentrant=False)
        return self.fake_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.current_bias()
        return F.linear(x, self.current_weight().to(x.dtype), None if b is None else b.to(x.dtype))

    @torch.no_grad()
    def to_qtensor(self) -> QTensor:
        """The trained weight as its layout stores it."""
        return self.layout.learned_qtensor(self.weight, self.template, self.grid_values())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.template.scheme.name}"


class QATConv2d(QATLinear):
    """A :class:`~lowbit.model.qmodules.QConv2d` in training: its weight matrix (out, in / groups × kh × kw) is a
    :class:`QATLinear`'s, fake-quantized on the same grid; the forward is the conv's.

    >>> conv = QConv2d.from_float(torch.nn.Conv2d(4, 8, 3), lowbit.quantize_tensor(torch.randn(8, 36), "int8"))
    >>> layer = QATConv2d.from_qconv(conv)
    >>> x = torch.randn(1, 4, 6, 6)
    >>> torch.equal(layer(x), conv(x)), type(layer.to_qconv()).__name__
    (True, 'QConv2d')
    """

    def __init__(self, q: QTensor, weight: torch.Tensor, bias: torch.Tensor | None, *, kernel_size, stride, padding,
                 dilation, groups: int):
        super().__init__(q, weight, bias)
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), padding
        self.dilation, self.groups = tuple(dilation), groups
        self.in_channels = q.shape[1] // (self.kernel_size[0] * self.kernel_size[1]) * groups

    @classmethod
    def from_qconv(cls, m: QConv2d) -> QATConv2d:
        return cls(m.qweight, m.qweight.dequantize(torch.float32), m.bias, kernel_size=m.kernel_size,
                   stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.current_weight().reshape(self.out_features, self.in_channels // self.groups, *self.kernel_size)
        b = self.current_bias()
        return F.conv2d(x, w.to(x.dtype), None if b is None else b.to(x.dtype), self.stride, self.padding,
                        self.dilation, self.groups)

    @torch.no_grad()
    def to_qconv(self) -> QConv2d:
        """The trained layer as the QConv2d every method produces."""
        return QConv2d(self.to_qtensor(), self.kernel_size, None if self.bias is None else self.current_bias(),
                       stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_features}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, scheme={self.template.scheme.name}")


@contextlib.contextmanager
def swapped_in(root: nn.Module, originals: dict[str, nn.Module], qat: dict[str, QATLinear]) -> Iterator[None]:
    """``qat``'s layers in place of ``originals`` (same names, relative to ``root``) for the block, with every other
    parameter of ``root`` frozen; the originals are back on exit, whether the block finished or raised (a caller
    that keeps the training sets their ``qweight`` inside the block)."""
    from lowbit.model.quantize import _set_module

    frozen = [p for p in root.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for n, m in qat.items():
        _set_module(root, n, m)
    try:
        yield
    finally:
        for n, orig in originals.items():
            _set_module(root, n, orig)
        for p in frozen:
            p.requires_grad_(True)


# Adam's epsilon: its default (1e-8) is larger than these gradients' typical size (block losses of ~1e-2
# spread over millions of weights), which would quietly shrink every step to a fraction of the learning rate
ADAM_EPS = 1e-20


def train_steps(groups: list[dict], steps: int, items: int, loss_of: Callable[[int], torch.Tensor], *, seed: int,
                label: str, every: int = 8, postfix: str = "loss", progress: bool | None = None,
                start: int = 0, adam: dict[str, torch.Tensor] | None = None,
                on_checkpoint: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
                checkpoint_seconds: float = 300.0) -> None:
    """``steps`` Adam steps on the parameter ``groups`` (each with its ``lr``, decayed to 0 on a cosine), each on
    ``loss_of(i)`` for one of ``items`` training items, visited in a seeded random order, epoch after epoch; a
    non-finite loss (a learning rate far too high) stops training where it is.

    Resumable: ``on_checkpoint(done, adam)`` is called every ``checkpoint_seconds`` of training and after the last
    step, with the steps done and Adam's state (:func:`adam_state`); ``start`` and ``adam`` (the parameters
    restored by the caller) continue from such a point, in the same item order and learning rates, so the result
    is the uninterrupted run's."""
    opt = torch.optim.Adam(groups, eps=ADAM_EPS)
    base = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(start):  # the items the earlier run visited, drawn again from the same generator
        if not order:
            order = torch.randperm(items, generator=gen).tolist()
        order.pop()
    if adam is not None:
        load_adam_state(opt, adam)
    if start:
        for g, lr in zip(opt.param_groups, base, strict=True):
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * start / steps))
    last = time.monotonic()
    bar = tqdm(range(start, steps), desc=label, leave=False, initial=start, total=steps,
               disable=None if progress is None else not progress)
    for step in bar:
        if not order:
            order = torch.randperm(items, generator=gen).tolist()
        loss = loss_of(order.pop())
        if not torch.isfinite(loss):
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for g, lr in zip(opt.param_groups, base, strict=True):
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
        if on_checkpoint is not None and (step + 1 == steps or time.monotonic() - last >= checkpoint_seconds):
            on_checkpoint(step + 1, adam_state(opt))
            last = time.monotonic()
        if step % every == 0:
            bar.set_postfix({postfix: f"{loss.item():.4g}"})


def adam_state(opt: torch.optim.Adam) -> dict[str, torch.Tensor]:
    """Adam's moments and step counts as flat tensors ``adam.{i}.{name}``, ``i`` a parameter's position over the
    optimizer's groups (what :func:`load_adam_state` takes back into an optimizer over the same parameters)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {f"adam.{i}.{k}": v.detach() for i, p in enumerate(params) for k, v in opt.state.get(p, {}).items()
            if isinstance(v, torch.Tensor)}


def load_adam_state(opt: torch.optim.Adam, flat: dict[str, torch.Tensor]) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    for key, v in flat.items():
        _, i, k = key.split(".", 2)
        p = params[int(i)]
        opt.state[p][k] = v.to(p.device) if k != "step" else v
