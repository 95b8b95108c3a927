"""GGML block types: bit-exact against the ``gguf`` package's reference dequantize, pack/unpack round trips,
error no worse than the reference quantizers (gguf.quants where it has one, ggml's own C code otherwise),
importance weighting, edge blocks, and lossless re-packing of grids that already fit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from lowbit.core.qtensor import QTensor
from lowbit.core.scheme import parse_scheme
from lowbit.io.gguf import llamacpp
from lowbit.layouts.ggml import BLOCK_TYPES

QUANT = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
LEGACY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # gguf.quants.quantize supports these


def _rows(n_rows: int = 48, n: int = 512, seed: int = 0) -> torch.Tensor:
    """Weight-like rows with outliers, an all-zero block, a constant block and a tiny-valued block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, n, generator=g) * 0.02
    x[1, 7] = 0.9  # outlier
    x[2, 300] = -1.5
    x[3, :256] = 0.0  # all-zero (super-)block
    x[4, 256:] = 0.0123  # constant block
    x[5, :] *= 1e-6  # tiny values (fp16 scales near the subnormal range)
    x[6, :] = x[6, :].abs()  # all positive
    x[7, :] = -x[7, :].abs()  # all negative
    return x


def _theirs(data: torch.Tensor, name: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[name]).copy())


@pytest.mark.parametrize("name", QUANT + ("F16", "BF16", "F32"))
def test_dequantize_bit_exact_vs_gguf(name):
    bt = BLOCK_TYPES[name]
    x = _rows()
    data = bt.encode(x.reshape(-1, bt.block_size))
    assert data.dtype == torch.uint8 and data.shape[1] == bt.type_size
    ours = bt.dequantize(data).reshape(x.shape)
    theirs = _theirs(data.reshape(x.shape[0], -1), name).reshape(x.shape)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))  # bit for bit, signed zeros included
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("name", ("F16", "BF16", "F32"))
def test_float_casts_equal_gguf_quantize(name):
    x = _rows(seed=6)
    x[0, :4] = torch.tensor([1e-40, -0.0, 3.4e38, 65519.0])  # subnormal, signed zero, f16 overflow
    ours = BLOCK_TYPES[name].encode(x).reshape(x.shape[0], -1).numpy()
    with np.errstate(over="ignore"):  # 3.4e38 -> inf in float16, on both sides
        theirs = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType[name])
    assert np.array_equal(ours, np.ascontiguousarray(theirs).view(np.uint8).reshape(x.shape[0], -1))


@pytest.mark.parametrize("name", QUANT)
def test_gguf_reference_bytes_decode_identically(name):
    # our dequantize agrees with theirs on bytes we did not write (llama.cpp's quantizer output)
    x = _rows(seed=3)
    data = torch.from_numpy(llamacpp.quantize_rows(x.numpy(), name))
    bt = BLOCK_TYPES[name]
    ours = bt.dequantize(data.reshape(-1, bt.type_size)).reshape(x.shape)
    assert torch.equal(ours, _theirs(data, name).reshape(x.shape))


@pytest.mark.parametrize("name", QUANT)
def test_pack_unpack_round_trip(name):
    bt = BLOCK_TYPES[name]
    w = _rows(seed=1).reshape(-1, bt.block_size)
    p = bt.fit(w)
    codes = bt.quantize(w, p)
    assert int(codes.min()) >= bt.lo and int(codes.max()) <= bt.hi
    codes2, p2 = bt.unpack(bt.pack(codes, p))
    assert torch.equal(codes2, codes)
    for k, v in p.items():
        assert torch.equal(p2[k].reshape(v.shape).to(v.dtype), v), k
    # the stored grid reproduces the dequantized values (to float rounding of scale * code + offset)
    torch.testing.assert_close(bt.values(codes, p), bt.dequantize(bt.pack(codes, p)), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", QUANT)
def test_error_no_worse_than_reference(name):
    """Plain-MSE error of our blocks vs llama.cpp's quantizer (and gguf.quants' for the legacy types)."""
    x = _rows(96, 1024, seed=2)
    bt = BLOCK_TYPES[name]
    ours = bt.dequantize(bt.encode(x.reshape(-1, bt.block_size))).reshape(x.shape)
    t = gguf.GGMLQuantizationType[name]
    ref = torch.from_numpy(gguf.quants.dequantize(llamacpp.quantize_rows(x.numpy(), name), t).reshape(x.shape).copy())
    e_ours, e_ref = ((ours - x) ** 2).sum().item(), ((ref - x) ** 2).sum().item()
    assert e_ours < (0.99 if name == "Q8_0" else 0.97) * e_ref, (name, e_ours / e_ref)
    if name in LEGACY:
        gq = gguf.quants.quantize(x.numpy(), t)
        assert np.array_equal(gq, llamacpp.quantize_rows(x.numpy(), name))  # the two references agree bit for bit
        # per block, never worse than the reference choice (our candidates include it)
        per_ours = ((ours - x) ** 2).reshape(-1, bt.block_size).sum(1)
        per_ref = ((ref - x) ** 2).reshape(-1, bt.block_size).sum(1)
        assert bool((per_ours <= per_ref * (1 + 1e-6) + 1e-12).all())


@pytest.mark.parametrize("name", ("Q4_0", "Q5_1", "Q3_K", "Q4_K", "Q6_K"))
def test_importance_weighting_lowers_weighted_error(name):
    bt = BLOCK_TYPES[name]
    x = _rows(64, 512, seed=4)
    g = torch.Generator().manual_seed(5)
    imp = torch.rand(1, 512, generator=g) ** 4 * 100 + 0.01  # a few columns matter much more
    imp_full = imp.expand_as(x).reshape(-1, bt.block_size)
    plain = bt.dequantize(bt.encode(x.reshape(-1, bt.block_size))).reshape(x.shape)
    weighted = bt.dequantize(bt.encode(x.reshape(-1, bt.block_size), imp_full)).reshape(x.shape)
    e_plain = (((plain - x) ** 2) * imp).sum()
    e_weighted = (((weighted - x) ** 2) * imp).sum()
    assert e_weighted < 0.95 * e_plain


def test_zero_and_constant_blocks_are_exact():
    for name in QUANT:
        bt = BLOCK_TYPES[name]
        z = torch.zeros(3, bt.block_size)
        assert torch.equal(bt.dequantize(bt.encode(z)), z), name
    c = torch.full((2, 32), 0.0123)
    assert torch.allclose(BLOCK_TYPES["Q4_1"].dequantize(BLOCK_TYPES["Q4_1"].encode(c)), c, rtol=1e-3)


def test_lowbit_int4_g32_sym_repacks_into_q4_0_losslessly():
    # a lowbit int4-g32-sym tensor is a Q4_0 tensor in all but layout: the search finds its grid again
    w = torch.randn(64, 256) * 0.05
    q = QTensor.quantize(w, parse_scheme("int4-g32-sym"))
    deq = q.dequantize(torch.float32)
    bt = BLOCK_TYPES["Q4_0"]
    back = bt.dequantize(bt.encode(deq.reshape(-1, 32))).reshape(deq.shape)
    assert torch.equal(back, deq)


def test_q4_1_grid_fits_q5_1_exactly():
    # 16 levels d*q+m are every other level of d/2*q+m: Q5_1 stores Q4_1 data without loss
    g = torch.Generator().manual_seed(7)
    d = (torch.rand(40, 1, generator=g) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(40, 1, generator=g) * 0.05).half().float()
    codes = torch.randint(0, 16, (40, 32), generator=g).float()
    codes[:, 0], codes[:, 1] = 0, 15
    x = BLOCK_TYPES["Q4_1"].dequantize(BLOCK_TYPES["Q4_1"].pack(codes.to(torch.uint8),
                                                                  {"d": d.reshape(-1), "m": m.reshape(-1)}))
    for name in ("Q4_1", "Q5_1"):
        bt = BLOCK_TYPES[name]
        assert torch.equal(bt.dequantize(bt.encode(x)), x), name


def test_registry_matches_ggml_sizes():
    for name, bt in BLOCK_TYPES.items():
        assert (bt.block_size, bt.type_size) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
    assert BLOCK_TYPES["Q4_K"].bits_per_weight() == 4.5
    assert BLOCK_TYPES["Q6_K"].bits_per_weight() == 6.5625
