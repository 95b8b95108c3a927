"""Facts about llama.cpp's GGML block types that the scheme layer needs: block and byte sizes, nominal bits.

The arithmetic of each type lives in :mod:`lowbit.layouts.ggml`; this table only names them, so a
``Scheme`` can be parsed and sized without importing that code.

>>> GGML_SCHEMES["q4_k"]
BlockFacts(ggml='Q4_K', block_size=256, type_size=144, bits=4)
>>> GGML_SCHEMES["q4_k"].bits_per_weight
4.5
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType


@dataclass(frozen=True)
class BlockFacts:
    ggml: str  # GGMLQuantizationType member name
    block_size: int  # weights per block
    type_size: int  # bytes per block
    bits: int  # nominal code width

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


def _facts(name: str, bits: int) -> BlockFacts:
    bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    return BlockFacts(name, bs, ts, bits)


# scheme name (lower case) -> facts; the quantized types lowbit encodes
GGML_SCHEMES: dict[str, BlockFacts] = {
    n.lower(): _facts(n, b) for n, b in (
        ("Q8_0", 8), ("Q4_0", 4), ("Q4_1", 4), ("Q5_0", 5), ("Q5_1", 5), ("Q2_K", 2), ("Q3_K", 3), ("Q4_K", 4),
        ("Q5_K", 5), ("Q6_K", 6), ("IQ4_NL", 4), ("IQ4_XS", 4),
    )
}
