"""Runtime modules holding QTensors: ``QLinear``, ``QConv2d`` and ``QEmbedding``.

The quantized model stays a normal transformers model: only leaf layers are swapped. ``QLinear.forward``
goes through a kernel of :mod:`lowbit.kernels` (the fastest registered one serving the layer at that batch
size; the reference dequantizes the weight into the activation dtype and runs the float op).

Both layers are :class:`QModule`\\ s: the weight's QTensor parts are registered buffers, so ``.to(device)``,
``state_dict`` and ``load_state_dict`` work as on any torch module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.qtensor import QTensor
from lowbit.kernels import ACT_SCHEMES, Kernel, dispatch, kernel_names, quantize_activation  # noqa: F401
from lowbit.primitives.numformats import FloatFormat
from lowbit.primitives.quant import ungroup

QPARTS = ("codes", "scales", "zeros")  # a QTensor's tensor fields; a layout may leave any but codes None


def _moved(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` (what ``nn.Module._apply`` applies) taken for its device only: ``t`` keeps its stored dtype.

    Where torch can swap the storage in place (cpu <-> cuda) ``t`` itself is moved, as torch moves parameters,
    so a part two layers share (a tied head) stays one tensor; otherwise (to or from meta) a new tensor."""
    probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
    new = fn(t) if probe.dtype == t.dtype else t.to(probe.device)
    if new is t:
        return t
    if torch._has_compatible_shallow_copy_type(t, new):
        t.data = new
        return t
    return new


class QModule(nn.Module):
    """Base of the quantized layers: the weight's QTensor parts are buffers, ``qweight`` is their QTensor view.

    Buffers ``qweight_codes`` / ``qweight_scales`` / ``qweight_zeros`` hold the parts (None where the layout
    has none), whatever they mean to the layout; the rest of the QTensor (shape, dtype, scheme) is what the
    layer *is*, kept as attributes, like a float layer's sizes. ``QUANT_BUFFERS`` names every buffer that is
    part of the quantization (subclasses add theirs): ``.to(torch.bfloat16)`` / ``.half()`` never cast those
    (codes stay integers, scales keep their scheme's dtype); they set ``compute_dtype``, the dtype the layer
    computes in. Moves are in place where torch allows (see :func:`_moved`), so layers sharing one QTensor
    still share it on the new device; to and from ``meta`` each layer gets its own copy, as tied parameters
    do. Everything derived from the parts (dequantized or packed weights, the chosen kernel) is dropped on
    every move and on ``load_state_dict``; a state dict must hold the parts in their stored dtypes.

    >>> layer = QLinear(lowbit.quantize_tensor(torch.randn(32, 64), "int4-g32"))
    >>> sorted(layer.state_dict())
    ['qweight_codes', 'qweight_scales', 'qweight_zeros']
    >>> layer = layer.to(torch.bfloat16); layer.qweight_scales.dtype, layer.compute_dtype
    (torch.float16, torch.bfloat16)
    """

    QUANT_BUFFERS: tuple[str, ...] = tuple(f"qweight_{p}" for p in QPARTS)

    def __init__(self, qweight: QTensor):
        super().__init__()
        self.qweight = qweight
        self.compute_dtype: torch.dtype = qweight.dtype

    @property
    def qweight(self) -> QTensor:
        """The QTensor over the buffers (the same object while the buffers are the same tensors)."""
        view = self._qview
        parts = {p: self._buffers[f"qweight_{p}"] for p in QPARTS}
        if any(getattr(view, p) is not t for p, t in parts.items()):
            view = dataclasses.replace(view, **parts)
            self._qview = view
        return view

    @qweight.setter
    def qweight(self, q: QTensor) -> None:
        for p in QPARTS:
            self.register_buffer(f"qweight_{p}", getattr(q, p))
        self._qview = q
        self.drop_cache()

    def drop_cache(self) -> None:
        """Forget everything derived from the parts (subclasses hold the caches)."""

    def _apply(self, fn, recurse=True):
        order = list(self._buffers)
        parts = {k: self._buffers.pop(k) for k in self.QUANT_BUFFERS if k in self._buffers}
        try:
            super()._apply(fn, recurse)  # parameters (a bias) and other buffers, as torch does
        finally:
            rest = dict(self._buffers)
            self._buffers.clear()
            self._buffers.update({k: parts[k] if k in parts else rest[k] for k in order})
        for k, t in parts.items():
            if t is not None:
                self._buffers[k] = _moved(t, fn)
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype, device=self.qweight_codes.device)).dtype
        self.drop_cache()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for k in self.QUANT_BUFFERS:
            mine, theirs = self._buffers.get(k), state_dict.get(prefix + k)
            if isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor) and theirs.dtype != mine.dtype:
                error_msgs.append(f"{prefix}{k}: the state dict holds {theirs.dtype}, the layer stores {mine.dtype} "
                                  f"(quantized parts are loaded as stored, never cast)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.drop_cache()


def quantized_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the quantized layers' own tensors (weight parts, activation scales): savers write
    them through the layer's QTensor and extras, never as plain tensors."""
    return {f"{n}.{k}" if n else k for n, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, QModule) for k in m.QUANT_BUFFERS}


class QLinear(QModule):
    """``y = x Ŵᵀ + b`` with Ŵ stored as a QTensor of shape (out_features, in_features).

    It computes in its input's dtype; ``compute_dtype`` is the default dtype of :meth:`cache_weight`.
    """

    QUANT_BUFFERS = (*QModule.QUANT_BUFFERS, "input_scale", "act_scale")

    def __init__(self, qweight: QTensor, bias: torch.Tensor | None = None):
        super().__init__(qweight)
        self.out_features, self.in_features = qweight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.act_scheme: str | None = None  # activation quantization, set by W8A8 methods
        self.kernel_mode: str | None = None  # kernels this layer may use (None: the current mode; see use_kernels)
        self.input_scale: torch.Tensor | None
        self.act_scale: torch.Tensor | None
        self.register_buffer("input_scale", None)  # per-input-channel divisor (SmoothQuant, unfoldable pairs)
        self.register_buffer("act_scale", None)  # static per-tensor activation scale

    def cache_weight(self, dtype: torch.dtype | None = None) -> None:
        """Keep the dequantized weight (default: in ``compute_dtype``) in memory (float memory for speed: no
        dequantize per call) until :meth:`drop_cache`. Not saved; weight-only layers only (activation kernels
        ignore it)."""
        self.weight_cache = self.qweight.dequantize(dtype or self.compute_dtype)
        self._kernel = self._kernel_candidates = None  # choose again: the cached kernel now can run

    def drop_cache(self) -> None:
        self.weight_cache: torch.Tensor | None = None  # dequantized weight, while cache_weight() holds it
        self._kernel: Kernel | None = None  # the kernel of the last call
        self._kernel_candidates: tuple | None = None  # (kernel mode, kernels serving this layer, best first)
        self._kernel_state: dict[str, object] = {}  # each kernel's prepared (packed) weight

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight (float32), for code that reads ``.weight`` (e.g. tied heads, inspection)."""
        return self.qweight.dequantize(torch.float32)

    def linear_with(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x wᵀ + b`` for a float ``w`` (out, in): the arithmetic every weight-only kernel runs."""
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch(self, x)

    def prepare_kernels(self, tokens: tuple[int, ...] = (1, 512)) -> list[str]:
        """Pack the weight for the kernels that would run ``tokens``-row inputs now (what the first calls
        would do), so the first forward pays no packing; returns their names."""
        from lowbit.kernels.base import choose, prepared

        names = []
        for t in tokens:
            g = torch.Generator(device=self.qweight_codes.device).manual_seed(t)  # timed when kernels are measured
            x = torch.randn(t, self.in_features, generator=g, device=self.qweight_codes.device).to(self.compute_dtype)
            k = choose(self, x)
            prepared(self, k)
            names.append(k.name)
        return names

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.qweight.scheme.name}, bias={self.bias is not None}")


class QConv2d(QModule):
    """A 2-d convolution (regular, pointwise or depthwise) whose weight is a QTensor of shape
    (out_channels, in_channels / groups × kh × kw): one row per output channel, so per-channel schemes scale
    each output channel. It computes by dequantizing (the reference arithmetic), in its input's dtype.

    >>> conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    >>> q = QConv2d.from_float(conv, lowbit.quantize_tensor(conv.weight.detach().reshape(8, -1), "int8"))
    >>> q(torch.randn(1, 8, 5, 5)).shape, q.qweight.scheme.name
    (torch.Size([1, 8, 5, 5]), 'int8')
    """

    def __init__(self, qweight: QTensor, kernel_size: tuple[int, int], bias: torch.Tensor | None = None, *,
                 stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1):
        super().__init__(qweight)
        self.out_channels = qweight.shape[0]
        self.kernel_size, self.groups = tuple(kernel_size), groups
        self.in_channels = qweight.shape[1] // (self.kernel_size[0] * self.kernel_size[1]) * groups
        self.stride, self.padding, self.dilation = tuple(stride), padding, tuple(dilation)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_float(cls, mod: nn.Conv2d, q: QTensor) -> QConv2d:
        return cls(q, mod.kernel_size, mod.bias, stride=mod.stride, padding=mod.padding, dilation=mod.dilation,
                   groups=mod.groups)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight (float32) in the conv's own shape (out, in / groups, kh, kw)."""
        return self.qweight.dequantize(torch.float32).reshape(
            self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def conv_with(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The conv's arithmetic for a float weight ``w`` of the conv's shape."""
        return F.conv2d(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype), self.stride,
                        self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_with(x, self.weight)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, scheme={self.qweight.scheme.name}, bias={self.bias is not None}")


class QEmbedding(QModule):
    """Embedding lookup from a QTensor of shape (num_embeddings, embedding_dim), times ``embed_scale`` if set.

    Rows come out in ``compute_dtype``: the float weight's dtype, as the float module's do, until the model is
    cast (``.to(torch.bfloat16)``). Only the looked-up rows are dequantized when a row's codes fill whole bytes
    (e.g. 576 × 3 bits). ``embed_scale`` (a 0-d tensor) is what Gemma's ``*ScaledWordEmbedding`` multiplies its
    rows by (√hidden); it is rebuilt from the config on load, like the float module's, so it is not in the
    state dict.
    """

    def __init__(self, qweight: QTensor, padding_idx: int | None = None, embed_scale: torch.Tensor | None = None):
        super().__init__(qweight)
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.embed_scale: torch.Tensor | None
        self.register_buffer("embed_scale", None if embed_scale is None else embed_scale.detach().clone(),
                             persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.dequantize(torch.float32)

    def finish(self, rows: torch.Tensor) -> torch.Tensor:
        """The float module's arithmetic after the lookup: the embedding scale, in the rows' dtype."""
        return rows if self.embed_scale is None else rows * self.embed_scale.to(rows.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.qweight
        rows = rows_of(q, ids.reshape(-1).unique())
        if rows is None:
            return self.finish(F.embedding(ids, q.dequantize(self.compute_dtype), self.padding_idx))
        uniq, table = rows
        # map ids -> position in the unique table
        pos = torch.searchsorted(uniq, ids.contiguous())
        return self.finish(table[pos].to(self.compute_dtype))

    def extra_repr(self) -> str:
        scale = "" if self.embed_scale is None else f", embed_scale={float(self.embed_scale):.4g}"
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.qweight.scheme.name}{scale}"


def rows_of(q: QTensor, uniq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Dequantize only rows ``uniq`` (sorted) of a row-grouped QTensor; None when rows are not byte-aligned."""
    scheme = q.scheme
    rows, cols = q.shape
    if scheme.block is not None:  # whole blocks per row: dequantize only the rows looked up
        from lowbit.layouts.ggml import decode_blocks

        row_bytes = cols // scheme.block.block_size * scheme.block.type_size
        return uniq, decode_blocks(q.codes.view(rows, row_bytes)[uniq], scheme.block.ggml, (len(uniq), cols))
    fmt = scheme.number_format
    if scheme.granularity not in ("channel", "group") or (cols * fmt.bits) % 8 or isinstance(fmt, FloatFormat):
        return None
    row_bytes = cols * fmt.bits // 8
    codes = q.codes.view(rows, row_bytes)[uniq]  # (n, row_bytes)
    s, z = q.qparams()
    sub = QTensor(codes.reshape(-1), None, None, (len(uniq), cols), q.dtype, scheme)
    values = scheme.grid.decode(sub.codes_grouped(), s[uniq], None if z is None else z[uniq])
    return uniq, ungroup(values, (len(uniq), cols))
