"""The kernel interface, its registry and the dispatch every quantized layer's forward goes through.

A :class:`Kernel` serves the layers it declares (``serves``: layout, scheme, activation scheme, device and
CPU facts, checked once per layer) at the batch sizes it declares (``min_tokens``..``max_tokens``: rows of
the input, i.e. batch × sequence), in the activation dtypes it declares. ``prepare(module)`` packs the
weight once (at the first call; the result is dropped with the layer's other caches on a move or a
``load_state_dict``); ``run(module, state, x)`` computes ``x Ŵᵀ + b``. Among the kernels that can serve a
call, the fastest on this machine runs (measured once per kind of call and remembered per machine:
:mod:`lowbit.kernels.tuning`); with ``LOWBIT_KERNEL_TUNING=off``, or under an explicit mode, the highest
``priority`` wins, so the choice is a pure function of (layer, batch size, dtype, mode).

Reference kernels (``reference=True``) compute exactly what dequantizing the weight and running the float
op computes; every fast kernel is tested against them. :func:`use_kernels` switches what may run:

>>> with use_kernels("reference"):  # doctest: +SKIP
...     logits = model(ids).logits       # the dequantize reference everywhere
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.kernels import tuning
from lowbit.registry import Registry


@dataclass(frozen=True)
class Kernel:
    name: str
    priority: int  # higher wins among the kernels that can serve a call
    serves: Callable[[Any], bool]  # static facts of the layer (scheme, act scheme, device, CPU)
    run: Callable[[Any, Any, torch.Tensor], torch.Tensor]  # (module, prepared state, x (..., in)) -> y
    prepare: Callable[[Any], Any] | None = None  # packs the weight once; its result is run's state
    min_tokens: int = 1
    max_tokens: int | None = None
    dtypes: tuple[torch.dtype, ...] | None = None  # activation dtypes it takes (None: any)
    reference: bool = False  # the dequantize reference's arithmetic exactly
    accepts: Callable[[Any, torch.Tensor], bool] | None = None  # a per-call condition beyond size and dtype
    doc: str = ""
    measured: bool = True  # False: wins whenever it serves, never timed against the others (tuning.py)
    # Layers reading one input as one call: ``fuse(modules)`` -> ``x -> their outputs concatenated`` (along the
    # last dim), or None when these layers cannot be stacked (:func:`stacked`).
    fuse: Callable[[Sequence[Any]], Callable[[torch.Tensor], torch.Tensor] | None] | None = None

    def takes(self, module: Any, x: torch.Tensor, tokens: int) -> bool:
        return (self.min_tokens <= tokens and (self.max_tokens is None or tokens <= self.max_tokens)
                and (self.dtypes is None or x.dtype in self.dtypes)
                and (self.accepts is None or self.accepts(module, x)))


KERNELS: Registry[Kernel] = Registry("kernel", LowbitError)

MODES = ("auto", "reference")
_mode: tuple[str, ...] | str = os.environ.get("LOWBIT_KERNELS", "auto")


HUGE_ACTIVATION = 256.0  # |x| above this goes around the packed int4/int8 kernels, in float32


def exceeds(x: torch.Tensor, limit: float = HUGE_ACTIVATION) -> bool:
    """Whether max |x| is above ``limit`` or NaN (as max(max x, −min x): one pass each, no |x| copy)."""
    return x.numel() > 0 and not float(torch.maximum(x.max(), x.min().neg())) <= limit


def split_dominant(x2: torch.Tensor, limit: float = HUGE_ACTIVATION):
    """``x2`` ``(rows, in)`` without its huge elements (``|x| > limit``), and those elements apart: ``(x2, None)``
    when there are none (one max per call: the common case costs one reduction), else
    ``(rest, (cols, values))`` with ``values`` ``(rows, len(cols))`` holding the huge elements (zero
    elsewhere). torch's packed int4/int8 CPU kernels lose precision on rows holding such an activation among
    small ones (SmolLM2's down_proj sees 3·10⁴ on a window's first token: 3.7% error of the layer's output,
    where a bf16 GEMM errs by 0.4%), so kernels add those few columns' products in float32."""
    if not exceeds(x2, limit):
        return x2, None
    big = x2.abs() > limit
    cols = big.any(0).nonzero().flatten()
    values = torch.where(big[:, cols], x2[:, cols], torch.zeros((), dtype=x2.dtype)).to(torch.float32)
    return x2.masked_fill(big, 0), (cols, values)


def run_packed_bf16(m: Any, x: torch.Tensor, packed_mm: Callable[[torch.Tensor], torch.Tensor],
                    columns: Callable[[torch.Tensor], torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """The frame torch's packed bf16 kernels share: huge activations taken apart (:func:`split_dominant`) and
    multiplied in float32 with the weight's ``columns(cols)`` ``(out, n)``, ``packed_mm`` of the rest in bf16,
    the bias, and the input's dtype and leading shape."""
    lead = x.shape[:-1]
    x2, dominant = split_dominant(x.reshape(-1, x.shape[-1]))
    y = packed_mm(x2.to(torch.bfloat16)).to(torch.float32)
    if dominant is not None:
        cols, values = dominant
        y = y.addmm_(values, columns(cols).T)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*lead, m.out_features)


def register_kernel(kernel: Kernel) -> Kernel:
    """Add ``kernel`` to the registry (its name must be new)."""
    return KERNELS.add(kernel.name, kernel)


def kernel_names() -> list[str]:
    return KERNELS.names()


def check_mode(mode: str | Sequence[str]) -> tuple[str, ...] | str:
    """``mode`` as :func:`use_kernels` takes it ("a,b" names split); unknown kernel names raise."""
    if isinstance(mode, str):
        if mode in MODES:
            return mode
        mode = [m.strip() for m in mode.split(",") if m.strip()]
    names = tuple(mode)
    for n in names:
        KERNELS.get(n)  # unknown names: "unknown kernel 'x' (known: …)"
    return names


@contextlib.contextmanager
def use_kernels(mode: str | Sequence[str]) -> Iterator[None]:
    """Run the block with ``mode``: ``"auto"`` (the fastest kernel that serves each call), ``"reference"``
    (reference kernels only), or kernel names (those, plus the references where none of them serves)."""
    global _mode
    old, _mode = _mode, check_mode(mode)
    try:
        yield
    finally:
        _mode = old


def kernel_mode() -> tuple[str, ...] | str:
    return _mode


def _allowed(k: Kernel, mode: tuple[str, ...] | str) -> bool:
    if mode == "auto":
        return True
    if mode == "reference":
        return k.reference
    return k.reference or k.name in mode


def candidates(module: Any, mode: tuple[str, ...] | str | None = None) -> list[Kernel]:
    """The kernels that serve ``module`` under ``mode`` (default: the current one), best first."""
    mode = _mode if mode is None else mode
    ks = [k for k in KERNELS.values() if _allowed(k, mode) and k.serves(module)]
    return sorted(ks, key=lambda k: -k.priority)


def choose(module: Any, x: torch.Tensor) -> Kernel:
    """The kernel that runs ``module(x)``. Under mode ``auto`` with several kernels able to run the call, the
    fastest on this machine (measured once per kind of call, :mod:`lowbit.kernels.tuning`); otherwise, or with
    ``LOWBIT_KERNEL_TUNING=off``, the first of its candidates (by priority) that takes this batch size and dtype."""
    mode = getattr(module, "kernel_mode", None) or _mode  # a layer may pin its own (full-integer: reference)
    cache = module._kernel_candidates
    if cache is None or cache[0] != mode:
        cache = module._kernel_candidates = (mode, candidates(module, mode), {})
    tokens = x.numel() // max(1, x.shape[-1])
    tune = mode == "auto" and tuning.enabled()
    # measured choices hold per bucket of token counts; priority choices per exact count (a pure function)
    memo_key = (tune, x.dtype, x.device.type, tuning.bucket(tokens) if tune else tokens, torch.get_num_threads())
    k = cache[2].get(memo_key)
    if k is not None and k.takes(module, x, tokens):
        return k
    takers = [k for k in cache[1] if k.takes(module, x, tokens)]
    if not takers:
        raise LowbitError(f"no kernel serves {type(module).__name__}({module.qweight.scheme.name}) for "
                          f"{tokens} tokens of {x.dtype} under kernel mode {mode!r}")
    if not tune or len(takers) == 1:
        if not tune and all(c.accepts is None for c in cache[1]):  # no per-call condition changes the answer
            cache[2][memo_key] = takers[0]
        return takers[0]
    fixed = [t for t in takers if not t.measured]
    if fixed:
        return fixed[0]
    k = tuning.fastest(module, x, tokens, [t for t in takers if t.measured])
    cache[2][memo_key] = k
    return k


def prepared(module: Any, k: Kernel) -> Any:
    """``k``'s packed weight for ``module``, made at first use and kept in ``module._kernel_state``."""
    if k.prepare is None:
        return None
    states = module._kernel_state
    state = states.get(k.name)
    if state is None:
        state = states[k.name] = k.prepare(module)
    return state


def stacked(modules: Sequence[Any], tokens: int, dtype: torch.dtype = torch.float32
            ) -> tuple[Kernel, Callable[[torch.Tensor], torch.Tensor]] | None:
    """One call computing every layer of ``modules`` (layers that read the same input, e.g. a block's q, k and
    v projections) on ``tokens``-row inputs of ``dtype``: ``(kernel, run)`` with ``run(x)`` the layers'
    outputs concatenated along the last dim, from the highest-priority kernel under the current mode that
    serves every layer, takes such calls and can stack them (``Kernel.fuse``); None when none can. The
    arithmetic is the kernel's own on each layer, so ``run(x)`` equals ``cat([m(x) for m in modules], -1)``
    wherever that kernel runs each ``m(x)``."""
    if not modules or any(not hasattr(m, "_kernel_candidates") for m in modules):
        return None
    def serving(m):
        return candidates(m, getattr(m, "kernel_mode", None) or _mode)  # as choose() reads a layer's mode

    probe = torch.empty(tokens, modules[0].in_features, dtype=dtype, device="meta")
    for k in serving(modules[0]):
        if k.fuse is None or not k.takes(modules[0], probe, tokens):
            continue
        if all(k in serving(m) and m.in_features == modules[0].in_features for m in modules[1:]):
            run = k.fuse(modules)
            if run is not None:
                return k, run
    return None


def dispatch(module: Any, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` through its chosen kernel, preparing the kernel's packed weight at first use."""
    k = choose(module, x)
    state = prepared(module, k)
    module.__dict__["_kernel"] = k  # the last kernel that ran (inspection, tests); not nn.Module's slow setattr
    return k.run(module, state, x)
