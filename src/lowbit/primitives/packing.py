"""Dense bit packing of unsigned codes into uint8.

A b-bit code costs exactly b bits: every 8 codes fill b bytes (little-endian bit order, code 0 in
the lowest bits). 2-, 4- and 8-bit codes take shortcuts; 3-, 5- and 6-bit codes go through a 64-bit
accumulator per 8 codes. The last chunk is padded with zero codes, so a packed buffer of n codes is
``packed_nbytes(n, bits)`` bytes.

>>> codes = torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8)
>>> p = pack(codes, 3)
>>> p.numel(), unpack(p, 3, 5).tolist()
(2, [1, 2, 3, 4, 5])
"""

from __future__ import annotations

import torch


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes used by ``n`` codes of ``bits`` bits (whole bytes, the tail padded)."""
    return (n * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a tensor of unsigned codes (< 2**bits) into a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes (1..8 supported)")
    flat = codes.reshape(-1).to(torch.uint8)
    n = flat.numel()
    if bits == 8:
        return flat.clone()
    per_byte = 8 // bits if 8 % bits == 0 else 0
    if per_byte:
        # 1, 2 or 4 bits: several whole codes per byte.
        pad = (-n) % per_byte
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        lanes = flat.view(-1, per_byte)
        out = lanes[:, 0].clone()
        for i in range(1, per_byte):
            out |= lanes[:, i] << (bits * i)
        return out
    # 3, 5, 6, 7 bits: 8 codes -> one 8*bits-bit word -> `bits` bytes.
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    lanes = flat.view(-1, 8).to(torch.int64)  # (n/8, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=flat.device) * bits
    word = (lanes << shifts).sum(dim=1, keepdim=True)  # (n/8, 1), bits never overlap
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=flat.device) * 8
    out = ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)  # (n/8 * bits,)
    return out[: packed_nbytes(n, bits)]


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n`` codes as a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot unpack {bits}-bit codes (1..8 supported)")
    if packed.numel() < packed_nbytes(n, bits):
        raise ValueError(f"packed buffer holds {packed.numel()} bytes, {packed_nbytes(n, bits)} needed")
    flat = packed.reshape(-1)
    if bits == 8:
        return flat[:n].clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.uint8, device=flat.device) * bits
        out = (flat.unsqueeze(1) >> shifts) & mask  # (bytes, per_byte)
        return out.reshape(-1)[:n]
    nbytes_full = ((n + 7) // 8) * bits
    if flat.numel() < nbytes_full:
        flat = torch.cat([flat, flat.new_zeros(nbytes_full - flat.numel())])
    chunks = flat[:nbytes_full].view(-1, bits).to(torch.int64)  # (n/8, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=flat.device) * 8
    word = (chunks << byte_shifts).sum(dim=1, keepdim=True)  # (n/8, 1)
    shifts = torch.arange(8, dtype=torch.int64, device=flat.device) * bits
    out = ((word >> shifts) & mask).to(torch.uint8).reshape(-1)
    return out[:n]
