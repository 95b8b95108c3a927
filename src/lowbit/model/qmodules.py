"""Runtime modules holding QTensors: ``QLinear`` and ``QEmbedding``.

The quantized model stays a normal transformers model: only leaf layers are swapped. Forward goes
through a kernel chosen from a registry (``@register_kernel``); the fallback dequantizes the weight
into the activation dtype and runs the float op. A kernel is ``(module, x) -> y`` plus a predicate
saying whether it can serve a module; the first registered kernel that can, wins (newest first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.qtensor import QTensor
from lowbit.primitives.numformats import FloatFormat
from lowbit.primitives.quant import ungroup


@dataclass(frozen=True)
class Kernel:
    name: str
    can_run: Callable[[nn.Module, torch.Tensor], bool]
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor]


_LINEAR_KERNELS: list[Kernel] = []


def register_kernel(name: str, can_run: Callable[[nn.Module, torch.Tensor], bool]):
    """Register a QLinear kernel; later registrations are tried first."""

    def deco(fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        _LINEAR_KERNELS.insert(0, Kernel(name, can_run, fn))
        return fn

    return deco


def kernel_names() -> list[str]:
    return [k.name for k in _LINEAR_KERNELS]


class QLinear(nn.Module):
    """``y = x Ŵᵀ + b`` with Ŵ stored as a QTensor of shape (out_features, in_features)."""

    def __init__(self, qweight: QTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.act_scheme: str | None = None  # activation quantization, set by W8A8 methods
        self.input_scale: torch.Tensor | None = None  # per-input-channel divisor (SmoothQuant, unfoldable pairs)
        self.act_scale: torch.Tensor | None = None  # static per-tensor activation scale
        self._kernel: Kernel | None = None
        self.weight_cache: torch.Tensor | None = None  # dequantized weight, while cache_weight() holds it

    def cache_weight(self, dtype: torch.dtype = torch.float32) -> None:
        """Keep the dequantized weight in memory (float memory for speed: no dequantize per call) until
        :meth:`drop_cache`. Not saved; weight-only layers only (activation kernels ignore it)."""
        self.weight_cache = self.qweight.dequantize(dtype)
        self._kernel = None  # choose again: the cached kernel now can run

    def drop_cache(self) -> None:
        self.weight_cache = None
        self._kernel = None

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight (float32), for code that reads ``.weight`` (e.g. tied heads, inspection)."""
        return self.qweight.dequantize(torch.float32)

    def linear_with(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x wᵀ + b`` for a float ``w`` (out, in): the arithmetic every weight-only kernel runs."""
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._kernel
        if k is None or not k.can_run(self, x):
            k = next(k for k in _LINEAR_KERNELS if k.can_run(self, x))
            self._kernel = k
        return k.run(self, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.qweight.scheme.name}, bias={self.bias is not None}")


@register_kernel("dequantize", lambda m, x: True)
def _dequant_linear(m: QLinear, x: torch.Tensor) -> torch.Tensor:
    return m.linear_with(x, m.qweight.dequantize(x.dtype))


class QEmbedding(nn.Module):
    """Embedding lookup from a QTensor of shape (num_embeddings, embedding_dim), times ``embed_scale`` if set.

    Rows come out in the float weight's dtype, as the float module's do. Only the looked-up rows are
    dequantized when a row's codes fill whole bytes (e.g. 576 × 3 bits). ``embed_scale`` (a 0-d tensor) is
    what Gemma's ``*ScaledWordEmbedding`` multiplies its rows by (√hidden); it is rebuilt from the config on
    load, like the float module's, so it is not in the state dict.
    """

    def __init__(self, qweight: QTensor, padding_idx: int | None = None, embed_scale: torch.Tensor | None = None):
        super().__init__()
        self.qweight = qweight
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
            return self.finish(F.embedding(ids, q.dequantize(q.dtype), self.padding_idx))
        uniq, table = rows
        # map ids -> position in the unique table
        pos = torch.searchsorted(uniq, ids.contiguous())
        return self.finish(table[pos].to(q.dtype))

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


# -- activation quantization (W8A8) -------------------------------------------------------------
ACT_SCHEMES = ("int8-dynamic", "int8-static", "fp8-dynamic")


def quantize_activation(x: torch.Tensor, act_scheme: str, static_scale: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of activations ``x`` (..., in): per token (dynamic) or one scale (static).

    int8: symmetric, codes in [-127, 127] as int8; fp8: e4m3fn values. Returns (codes, scale (..., 1)).
    """
    if act_scheme == "int8-static":
        if static_scale is None:
            raise ValueError("int8-static activations need a calibrated scale: run calibration first")
        s = static_scale.to(x.dtype).reshape(*([1] * x.dim()))
        return torch.clamp(torch.round(x / s), -127, 127).to(torch.int8), s
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8)
    if act_scheme == "int8-dynamic":
        s = amax / 127
        return torch.clamp(torch.round(x / s), -127, 127).to(torch.int8), s
    if act_scheme == "fp8-dynamic":
        s = amax / 448.0
        return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn), s
    raise ValueError(f"unknown activation scheme {act_scheme!r} (known: {', '.join(ACT_SCHEMES)})")


def _w8_int(m: QLinear) -> bool:
    sch = m.qweight.scheme
    return sch.format == "int8" and sch.symmetric and sch.granularity == "channel"


@register_kernel("fake-act", lambda m, x: m.act_scheme is not None)
def _fake_act_linear(m: QLinear, x: torch.Tensor) -> torch.Tensor:
    """Any weight scheme with quantized activations: quantize→dequantize x, then the float matmul."""
    if m.input_scale is not None:
        x = x / m.input_scale.to(x.dtype)
    codes, s = quantize_activation(x, m.act_scheme, m.act_scale)
    xq = codes.to(x.dtype) * s
    return F.linear(xq, m.qweight.dequantize(x.dtype), None if m.bias is None else m.bias.to(x.dtype))


@register_kernel("int8-int8", lambda m, x: m.act_scheme in ("int8-dynamic", "int8-static") and _w8_int(m))
def _int8_linear(m: QLinear, x: torch.Tensor) -> torch.Tensor:
    """int8 activations × int8 weights with int32 accumulation (torch._int_mm), rescaled per token/channel."""
    if m.input_scale is not None:
        x = x / m.input_scale.to(x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    codes, s = quantize_activation(x2, m.act_scheme, m.act_scale)
    w_int8 = getattr(m, "_w_int8", None)
    if w_int8 is None:
        # stored codes are offset by 128 (unsigned); the signed grid is codes - 128
        grouped = m.qweight.codes_grouped().reshape(m.out_features, -1)[:, : m.in_features]
        w_int8 = (grouped.to(torch.int16) - 128).to(torch.int8).T.contiguous()  # (in, out)
        m._w_int8 = w_int8
        m._w_scale = m.qweight.qparams()[0].reshape(1, -1)
    acc = torch._int_mm(codes, w_int8)  # (tokens, out) int32
    y = acc.to(torch.float32) * s.to(torch.float32) * m._w_scale
    if m.bias is not None:
        y = y + m.bias
    return y.to(x.dtype).reshape(*lead, m.out_features)


@register_kernel("cached-weight", lambda m, x: m.act_scheme is None and m.weight_cache is not None
                 and m.weight_cache.dtype == x.dtype)
def _cached_linear(m: QLinear, x: torch.Tensor) -> torch.Tensor:
    """The float matmul with the weight dequantized once by ``cache_weight()``."""
    return m.linear_with(x, m.weight_cache)
