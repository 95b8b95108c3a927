"""GGML's block types as lowbit layouts: one small class per storage type (:mod:`.legacy`, :mod:`.kquants`,
:mod:`.iquants`), bit-exact against the ``gguf`` package's reference, and llama.cpp's fallbacks.

>>> bt = BLOCK_TYPES["Q4_K"]
>>> data = bt.encode(torch.randn(3, 256))   # (3, 144) uint8, what a GGUF file stores
>>> decode_blocks(data.reshape(-1), "Q4_K", (3, 256)).shape
torch.Size([3, 256])
"""

from __future__ import annotations

import torch

from lowbit.layouts.ggml import iquants, kquants, legacy  # noqa: F401  (each registers its types)
from lowbit.layouts.ggml.base import BLOCK_TYPES, BlockType

__all__ = ["BLOCK_TYPES", "FALLBACK", "BlockType", "decode_blocks", "fallback_type"]

# a type whose block does not divide a row -> the type llama.cpp tries next (llama-quant.cpp)
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}


def fallback_type(ggml: str, ncols: int) -> str | None:
    """``ggml`` when its block divides a row of ``ncols``, else llama.cpp's fallback; None when none fits
    (llama.cpp then writes F16)."""
    for t in (ggml, FALLBACK.get(ggml)):
        if t is not None and ncols % BLOCK_TYPES[t].block_size == 0:
            return t
    return None


def decode_blocks(data: torch.Tensor, ggml: str, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor of ``shape`` from a GGML type's blocks ``data`` (flat uint8, row-major)."""
    bt = BLOCK_TYPES[ggml]
    return bt.dequantize(data.reshape(-1, bt.type_size)).reshape(shape)
