"""Number formats: the grids a float value can be rounded onto.

Each format knows its bit width, its representable range and how to round a float tensor onto it.
Three families:

* ``IntFormat`` — uniform integer grids, signed (``int4``: -8..7) or unsigned (``uint4``: 0..15).
* ``FloatFormat`` — torch's own low-precision floats (fp16, bf16, fp8 e4m3fn / e5m2).
* ``LookupFormat`` — a fixed table of levels in [-1, 1] (``nf4``), codes are indices into it.

>>> get_format("int4").qmin, get_format("int4").qmax
(-8, 7)
>>> get_format("fp8_e4m3fn").max_value
448.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import SchemeError
from lowbit.registry import Registry

FORMATS: Registry[NumberFormat] = Registry("number format", SchemeError)


def register_format(fmt: NumberFormat) -> NumberFormat:
    return FORMATS.add(fmt.name, fmt)


def get_format(name: str) -> NumberFormat:
    return FORMATS.get(name)


def format_names() -> list[str]:
    return FORMATS.names()


@dataclass(frozen=True)
class NumberFormat:
    name: str
    bits: int

    kind = "abstract"

    @property
    def max_value(self) -> float:
        raise NotImplementedError

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Round ``x`` (already divided by its scale) onto the grid, returning float32 grid values."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None) -> torch.Tensor:
        """Codes (uint8, ``bits`` wide; float formats: their raw bytes) for ``x`` given scale and zero."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None) -> torch.Tensor:
        """float32 values of ``codes``; inverse of :meth:`encode` up to rounding."""
        raise NotImplementedError


@dataclass(frozen=True)
class IntFormat(NumberFormat):
    signed: bool = True

    kind = "int"

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def levels(self) -> int:
        return 1 << self.bits

    @property
    def max_value(self) -> float:
        return float(self.qmax)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(x), self.qmin, self.qmax)

    def encode(self, x, scale, zero):
        # code = clamp(round(x / s + z - qmin), 0, 2^b - 1): the stored codes are unsigned.
        offset = -self.qmin if zero is None else zero - self.qmin
        q = torch.addcdiv(torch.as_tensor(offset, dtype=torch.float32), x, scale) if torch.is_tensor(
            offset
        ) else x / scale + offset
        q.round_().clamp_(0, self.levels - 1)
        return q.to(torch.uint8)

    def decode(self, codes, scale, zero):
        q = codes.to(torch.float32, copy=True)  # one new buffer, then in place (fresh buffers cost page faults)
        offset = -self.qmin if zero is None else zero - self.qmin
        if not (isinstance(offset, int) and offset == 0):
            q.sub_(offset)
        return q.mul_(scale) if torch.is_tensor(scale) and q.shape == torch.broadcast_shapes(q.shape, scale.shape) \
            else q * scale


@dataclass(frozen=True)
class FloatFormat(NumberFormat):
    dtype_name: str = "float16"

    kind = "float"

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype_name)

    @property
    def max_value(self) -> float:
        return float(torch.finfo(self.dtype).max)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        # Saturate first: torch's fp8 casts map out-of-range values to NaN (e4m3fn) or inf.
        m = self.max_value
        return x.clamp(-m, m).to(self.dtype).to(torch.float32)

    def encode(self, x, scale, zero):
        y = x if scale is None else x / scale
        if self.bits == 8:
            m = self.max_value
            y = y.clamp(-m, m)
        # Raw bytes of the cast: (..., n) -> (..., n * bits / 8) uint8.
        return y.to(self.dtype).contiguous().view(torch.uint8)

    def decode(self, codes, scale, zero):
        y = codes.contiguous().view(self.dtype).to(torch.float32)
        return y if scale is None else y * scale


@dataclass(frozen=True)
class LookupFormat(NumberFormat):
    table: tuple[float, ...] = ()

    kind = "lookup"

    @property
    def max_value(self) -> float:
        return max(abs(v) for v in self.table)

    def levels_tensor(self, device: torch.device | None = None) -> torch.Tensor:
        return torch.tensor(self.table, dtype=torch.float32, device=device)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest table level for every element (ties go to the lower level)."""
        levels = self.levels_tensor(x.device)
        mids = (levels[1:] + levels[:-1]) / 2
        return torch.bucketize(x.contiguous(), mids).to(torch.uint8)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return self.levels_tensor(x.device)[self.codes(x).long()]

    def encode(self, x, scale, zero):
        return self.codes(x / scale)

    def decode(self, codes, scale, zero):
        return self.levels_tensor(codes.device)[codes.long()] * scale


for _b in (2, 3, 4, 5, 6, 8):
    register_format(IntFormat(f"int{_b}", _b, signed=True))
    register_format(IntFormat(f"uint{_b}", _b, signed=False))
register_format(FloatFormat("fp16", 16, "float16"))
register_format(FloatFormat("bf16", 16, "bfloat16"))
register_format(FloatFormat("fp8_e4m3fn", 8, "float8_e4m3fn"))
register_format(FloatFormat("fp8_e5m2", 8, "float8_e5m2"))
# NormalFloat4 (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) normalised to [-1, 1], with an exact zero.
register_format(
    LookupFormat(
        "nf4",
        4,
        table=(
            -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
            0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
            0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
        ),
    )
)
