"""lowbit's affine integer QTensors as the tensors of onnxruntime's contrib ``com.microsoft.MatMulNBits``.

The op (onnxruntime ``docs/ContribOperators.md``) computes ``Y = A @ dequant(B)ᵀ`` for a weight of N rows
(output features) and K columns (input features), quantized in blocks of ``block_size`` along K:

* ``B``            uint8 ``(N, ceil(K / block_size), block_size * bits / 8)``: each block's codes packed low bits
                   first, the last block of a row zero-padded;
* ``scales``       ``(N, k_blocks)`` in A's dtype (float32 here);
* ``zero_points``  uint8 ``(N, ceil(k_blocks * bits / 8))`` packed as B is, row by row; or float ``(N, k_blocks)``;
                   absent: ``2**(bits - 1)``.

Dequantization is ``(code - zero_point) * scale``. lowbit stores unsigned codes ``q - qmin`` and dequantizes
``(code - (z - qmin)) * s`` (symmetric: ``z = 0``), so codes go in unchanged, the zero point is ``z - qmin``
(lowbit's stored integer zero, or ``2**(bits-1)`` = the op's default for symmetric schemes) and nothing is
quantized again: ORT's weight equals ``qtensor.dequantize(torch.float32)`` exactly. lowbit's dense bit order
(code 0 in the lowest bits) is the op's, so a block of a power-of-two width packs as lowbit packs it.

Block sizes must be powers of two >= 16. A lowbit group size that is not one (48, 96) is stored as blocks of the
largest power of two dividing it, each scale repeated; per-channel and per-tensor scales are repeated over blocks
of :data:`CHANNEL_BLOCK`. onnxruntime 1.32's CPU kernel takes 2, 4 and 8 bits only.

>>> t = matmulnbits_tensors(QTensor.quantize(torch.randn(8, 96), Scheme.parse("int4-g32")))
>>> t.attrs, t.B.shape, t.scales.shape, t.zero_points.shape
({'K': 96, 'N': 8, 'bits': 4, 'block_size': 32}, (8, 3, 16), (8, 3), (8, 2))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lowbit.core.qtensor import QTensor
from lowbit.primitives.numformats import IntFormat
from lowbit.primitives.packing import pack, unpack

ORT_BITS = (2, 4, 8)  # widths onnxruntime 1.32's CPU MatMulNBits runs
MIN_BLOCK = 16
MAX_BLOCK = 256  # the largest block tested here (a larger power-of-two group is stored as blocks of this)
CHANNEL_BLOCK = 128  # blocks a per-channel / per-tensor scale is repeated over


@dataclass
class NBitsTensors:
    """The initializers and attributes of one MatMulNBits node (numpy, as onnx.numpy_helper takes them)."""

    B: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None  # uint8 packed, float32 unpacked, or None (the op's default 2**(bits-1))
    attrs: dict[str, int]


def why_not(q: QTensor) -> str | None:
    """Why ``q`` cannot be a MatMulNBits weight (None: it can)."""
    s = q.scheme
    if s.block is not None:
        return f"{s.name} is a GGML block type (export it as GGUF)"
    if not isinstance(s.number_format, IntFormat):
        return f"{s.name} is not an integer grid (MatMulNBits holds integer codes)"
    if len(q.shape) != 2:
        return f"a weight of shape {list(q.shape)} is not a matrix"
    if s.bits not in ORT_BITS:
        return f"{s.bits}-bit codes: onnxruntime's MatMulNBits runs {', '.join(map(str, ORT_BITS))} bits"
    if s.granularity == "group" and _pow2_divisor(s.group_size) < MIN_BLOCK:
        return (f"groups of {s.group_size}: MatMulNBits blocks are powers of two >= {MIN_BLOCK}, and none divides "
                f"{s.group_size}")
    return None


def _pow2_divisor(n: int) -> int:
    return n & -n


def block_size(q: QTensor) -> int:
    """The MatMulNBits block holding ``q``'s scales exactly: the group size, or its largest power-of-two divisor."""
    s = q.scheme
    if s.granularity == "group":
        return min(_pow2_divisor(s.group_size), MAX_BLOCK)
    return CHANNEL_BLOCK


def _per_block(t: torch.Tensor, rows: int, reps: int, k_blocks: int) -> torch.Tensor:
    """lowbit's ``(R, G, 1)`` qparams as ``(rows, k_blocks)``: each repeated ``reps`` times along K."""
    t = t.reshape(t.shape[0], -1).expand(rows, -1)
    if t.shape[1] == 1:  # per channel / per tensor: one value for every block of the row
        return t.expand(rows, k_blocks).contiguous()
    return t.repeat_interleave(reps, dim=1)[:, :k_blocks].contiguous()


def matmulnbits_tensors(q: QTensor) -> NBitsTensors:
    """B, scales and zero points of MatMulNBits for ``q`` ``(N, K)``, from lowbit's own codes (no re-quantization).

    Raises ValueError where the op cannot hold the layout (see :func:`why_not`)."""
    why = why_not(q)
    if why is not None:
        raise ValueError(why)
    s = q.scheme
    fmt = s.number_format
    n, k = q.shape
    b = block_size(q)
    k_blocks = -(-k // b)
    codes = unpack(q.codes, fmt.bits, q.numel).reshape(n, k)
    codes = torch.nn.functional.pad(codes, (0, k_blocks * b - k))  # (N, k_blocks * b), zero codes in the padding
    packed = pack(codes, fmt.bits).reshape(n, k_blocks, b * fmt.bits // 8)  # rows, blocks: whole bytes each
    scale, zero = q.qparams()  # (R, G, 1) float32
    reps = s.group_size // b if s.granularity == "group" else 1
    scales = _per_block(scale, n, reps, k_blocks)
    zp = None
    if zero is not None:
        offset = _per_block(zero - fmt.qmin, n, reps, k_blocks)  # what lowbit subtracts from a code
        if s.zero_dtype == "int":
            zu = offset.round().to(torch.uint8)
            zu = torch.nn.functional.pad(zu, (0, (-k_blocks) % (8 // fmt.bits)))
            zp = pack(zu, fmt.bits).reshape(n, -1).numpy()  # each row's zero points packed as B's codes are
        else:
            zp = offset.to(torch.float32).numpy()
    attrs = {"K": k, "N": n, "bits": fmt.bits, "block_size": b}
    return NBitsTensors(packed.numpy(), scales.to(torch.float32).numpy(), zp, attrs)
