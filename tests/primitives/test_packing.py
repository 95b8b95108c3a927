import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.primitives.packing import pack, packed_nbytes, unpack


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]), n=st.integers(0, 300), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_bit_exact(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    p = pack(codes, bits)
    assert p.dtype == torch.uint8
    assert p.numel() == packed_nbytes(n, bits) == (n * bits + 7) // 8
    assert torch.equal(unpack(p, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_dense_size(bits):
    # 3-bit costs 3 bits, not 4: 8 codes in 3 bytes.
    assert pack(torch.zeros(8, dtype=torch.uint8), bits).numel() == bits


def test_known_layout_low_bits_first():
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    # 3-bit codes 1..8 mod 8: bits 001 010 011 100 101 110 111 000 (code 0 lowest)
    p = pack(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8), 3)
    word = sum(int(b) << (8 * i) for i, b in enumerate(p.tolist()))
    assert [(word >> (3 * i)) & 7 for i in range(8)] == [1, 2, 3, 4, 5, 6, 7, 0]


def test_unpack_rejects_short_buffer():
    with pytest.raises(ValueError, match="bytes"):
        unpack(torch.zeros(2, dtype=torch.uint8), 3, 8)
