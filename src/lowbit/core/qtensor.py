"""``QTensor``: densely packed codes + scales + zero-points + shape + scheme.

Layout (see :mod:`lowbit.primitives.quant`): the tensor is viewed as ``(R, G, g)`` groups.

* ``codes``  — flat uint8, ``numel`` codes of ``scheme.bits`` bits packed densely (3-bit costs 3 bits);
  for float formats the raw bytes of the cast values.
* ``scales`` — ``(R, G)`` in the scheme's scale dtype, or None for plain casts.
* ``zeros``  — integer zero-points packed like codes (``bits`` each, ``R*G`` of them), or ``(R, G)`` in a
  float dtype, or None for symmetric schemes.

A GGML block scheme (``q4_k`` …) keeps everything in ``codes``: the type's blocks, byte for byte as a GGUF
file stores them (``rows * cols / block_size`` blocks of ``type_size`` bytes, row-major); ``scales`` and
``zeros`` are None. :mod:`lowbit.layouts` fits and encodes both families.

>>> q = QTensor.quantize(torch.randn(8, 64), Scheme.parse("int4-g32"))
>>> q.bits_per_weight  # 4 + (16-bit scale + 4-bit zero) / 32
4.625
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.scheme import Scheme
from lowbit.errors import LowbitError
from lowbit.primitives.numformats import FloatFormat
from lowbit.primitives.packing import pack, packed_nbytes, unpack
from lowbit.primitives.quant import as_matrix, group_view, ungroup


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass
class QTensor:
    codes: torch.Tensor
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    scheme: Scheme

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_grouped(
        cls,
        codes_g: torch.Tensor,
        s: torch.Tensor | None,
        z: torch.Tensor | None,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        scheme: Scheme,
    ) -> QTensor:
        """Pack grouped codes ``(R, G, g[*bytes])`` and float32 qparams ``(R, G, 1)`` into a QTensor."""
        fmt = scheme.number_format
        codes = ungroup(codes_g, _byte_shape(shape, fmt)).reshape(-1)
        packed = codes.contiguous() if isinstance(fmt, FloatFormat) else pack(codes, fmt.bits)
        scales = None if s is None else s.squeeze(-1).to(getattr(torch, scheme.scale_dtype)).contiguous()
        zeros = None
        if z is not None:
            if scheme.zero_dtype == "int":
                zeros = pack((z.squeeze(-1) - fmt.qmin).to(torch.uint8), fmt.bits)
            else:
                zeros = z.squeeze(-1).to(getattr(torch, scheme.zero_dtype)).contiguous()
        return cls(packed, scales, zeros, tuple(shape), dtype, scheme)

    @classmethod
    def quantize(
        cls,
        x: torch.Tensor,
        scheme: Scheme,
        lo: torch.Tensor | None = None,
        hi: torch.Tensor | None = None,
    ) -> QTensor:
        """Round ``x`` to ``scheme`` with the clipping range [lo, hi] per group (default: min-max)."""
        grid = scheme.grid
        xg = group_view(x, scheme.granularity, scheme.group_size)
        if lo is None or hi is None:
            lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
        s, z = grid.qparams(lo, hi)
        return cls.from_grouped(grid.encode(xg, s, z), s, z, tuple(x.shape), x.dtype, scheme)

    # -- views ----------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return _numel(self.shape)

    def _affine_only(self, what: str) -> None:
        if self.scheme.block is not None:
            raise LowbitError(f"{what}: {self.scheme.name} stores GGML blocks, not grouped codes and scales")

    def qparams(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """float32 scales and zero-points shaped ``(R, G, 1)``."""
        self._affine_only("qparams")
        R, G, _ = self.scheme.group_dims(self.shape)
        s = None if self.scales is None else self.scales.to(torch.float32).reshape(R, G, 1)
        z = None
        if self.zeros is not None:
            if self.scheme.zero_dtype == "int":
                fmt = self.scheme.number_format
                z = unpack(self.zeros, fmt.bits, R * G).to(torch.float32).reshape(R, G, 1) + fmt.qmin
            else:
                z = self.zeros.to(torch.float32).reshape(R, G, 1)
        return s, z

    def codes_grouped(self) -> torch.Tensor:
        """Unpacked codes in the grouped view ``(R, G, g)`` (zero codes in the padding)."""
        self._affine_only("codes_grouped")
        fmt = self.scheme.number_format
        if isinstance(fmt, FloatFormat):
            flat = self.codes
            byte_shape = _byte_shape(self.shape, fmt)
            R, G, g = self.scheme.group_dims(self.shape)
            return group_view_bytes(flat.reshape(byte_shape), self.scheme, g * fmt.bits // 8, R, G)
        codes = unpack(self.codes, fmt.bits, self.numel).reshape(self.shape)
        return group_view(codes, self.scheme.granularity, self.scheme.group_size).to(torch.uint8)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float tensor these codes stand for, in ``dtype`` (default: the original dtype)."""
        if self.scheme.block is not None:
            from lowbit.layouts.ggml import decode_blocks

            return decode_blocks(self.codes, self.scheme.block.ggml, self.shape).to(dtype or self.dtype)
        s, z = self.qparams()
        values = self.scheme.grid.decode(self.codes_grouped(), s, z)
        return ungroup(values, self.shape).to(dtype or self.dtype)

    # -- size -----------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of everything stored: codes, scales and zero-points."""
        n = self.codes.numel() * self.codes.element_size()
        for t in (self.scales, self.zeros):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel

    def expected_nbytes(self) -> dict[str, int]:
        """Bytes each stored part must have for this shape and scheme (used to validate loads)."""
        blk = self.scheme.block
        if blk is not None:
            rows, cols = as_matrix(self.shape)
            if cols % blk.block_size:
                raise LowbitError(f"{self.scheme.name}: row length {cols} is not a multiple of the block of "
                                  f"{blk.block_size}")
            return {"codes": rows * cols // blk.block_size * blk.type_size}
        fmt = self.scheme.number_format
        R, G, _ = self.scheme.group_dims(self.shape)
        out = {"codes": packed_nbytes(self.numel, fmt.bits)}
        if self.scheme.grid.has_scale:
            out["scales"] = R * G * torch.finfo(getattr(torch, self.scheme.scale_dtype)).bits // 8
        if self.scheme.grid.has_zero:
            if self.scheme.zero_dtype == "int":
                out["zeros"] = packed_nbytes(R * G, fmt.bits)
            else:
                out["zeros"] = R * G * torch.finfo(getattr(torch, self.scheme.zero_dtype)).bits // 8
        return out

    def expected_dtypes(self) -> dict[str, torch.dtype]:
        """The dtype each stored part must have (used to validate loads): codes are bytes, scales the scheme's
        scale dtype, zero-points bytes (packed integers) or the scheme's float zero dtype."""
        out = {"codes": torch.uint8}
        if self.scheme.block is None and self.scheme.grid.has_scale:
            out["scales"] = getattr(torch, self.scheme.scale_dtype)
        if self.scheme.block is None and self.scheme.grid.has_zero:
            zd = self.scheme.zero_dtype
            out["zeros"] = torch.uint8 if zd == "int" else getattr(torch, zd)
        return out

    def __repr__(self) -> str:
        return (
            f"QTensor(shape={list(self.shape)}, scheme={self.scheme.name}, "
            f"bpw={self.bits_per_weight:.3f}, nbytes={self.nbytes})"
        )


def _byte_shape(shape: tuple[int, ...], fmt) -> tuple[int, ...]:
    """Shape of the code tensor: float formats store bits/8 bytes per element along the last dim."""
    if not isinstance(fmt, FloatFormat) or fmt.bits == 8:
        return tuple(shape)
    k = fmt.bits // 8
    if len(shape) == 0:
        return (k,)
    return (*shape[:-1], shape[-1] * k)


def group_view_bytes(raw: torch.Tensor, scheme: Scheme, gbytes: int, R: int, G: int) -> torch.Tensor:
    """Grouped view of float-format raw bytes: ``(R, G, gbytes)`` (padding bytes are zero)."""
    m = raw.reshape(R, -1)
    pad = G * gbytes - m.shape[1]
    if pad:
        m = torch.nn.functional.pad(m, (0, pad))
    return m.reshape(R, G, gbytes)
