import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.core.qtensor import QTensor
from lowbit.core.scheme import parse_scheme
from lowbit.errors import LowbitError
from lowbit.primitives.quant import group_view

INT_SCHEMES = ["int8", "int8-tensor", "int6-g64", "int5-g64", "int4-g128", "int4-g32-sym", "int4",
               "int3-g64", "int3-g128-sym", "int2-g64", "int4-g128-zf16"]


def _step(q: QTensor) -> torch.Tensor:
    """Per-element quantization step (the scale), in the original shape."""
    s, _ = q.qparams()
    R, G, g = q.scheme.group_dims(q.shape)
    return (s.expand(R, G, g)).reshape(R, -1)[:, : q.numel // R].reshape(q.shape)


@pytest.mark.parametrize("scheme", INT_SCHEMES)
@pytest.mark.parametrize("shape", [(48, 576), (7, 130), (33,), (4, 3, 5, 5)])
def test_int_error_within_half_step(scheme, shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    q = lowbit.quantize_tensor(w, scheme)
    err = (q.dequantize() - w).abs()
    # min-max ranges clip nothing: every element is within half a step (+ float32 rounding).
    assert (err <= 0.5 * _step(q) * (1 + 1e-5) + 1e-9).all()
    assert q.dequantize().shape == w.shape and q.dequantize().dtype == w.dtype


def test_ragged_group_576_by_128():
    w = torch.randn(16, 576)
    q = lowbit.quantize_tensor(w, "int4-g128")
    assert q.scales.shape == (16, 5)  # 4 full groups + one of 64
    # the ragged last group gets its own range: quantize it alone and compare.
    alone = lowbit.quantize_tensor(w[:, 512:].contiguous(), "int4-ch")
    assert torch.equal(q.dequantize()[:, 512:], alone.dequantize())


@pytest.mark.parametrize("scheme,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_casts_bit_exact(scheme, dtype):
    w = torch.randn(32, 100)
    q = lowbit.quantize_tensor(w, scheme)
    assert torch.equal(q.dequantize(), w.to(dtype).to(torch.float32))
    assert q.bits_per_weight == 16.0


@pytest.mark.parametrize("scheme,dtype", [("fp8", torch.float8_e4m3fn), ("fp8-e5m2", torch.float8_e5m2),
                                          ("fp8-tensor", torch.float8_e4m3fn)])
def test_fp8_bit_exact_with_torch_cast(scheme, dtype):
    w = torch.randn(32, 100) * 3
    q = lowbit.quantize_tensor(w, scheme)
    s, _ = q.qparams()
    xg = group_view(w, q.scheme.granularity)
    ref = (xg / s).to(dtype).view(torch.uint8)
    assert torch.equal(q.codes_grouped(), ref)
    assert torch.equal(q.dequantize(), ((xg / s).to(dtype).float() * s).reshape(w.shape))


def test_nf4_error_bound():
    w = torch.randn(64, 256)
    q = lowbit.quantize_tensor(w, "nf4-g64")
    levels = torch.tensor(parse_scheme("nf4-g64").number_format.table)
    max_gap = (levels[1:] - levels[:-1]).max()
    assert ((q.dequantize() - w).abs() <= 0.5 * max_gap * _step(q) + 1e-6).all()


@pytest.mark.parametrize(
    "scheme,bpw",
    [("int4-g128", 4 + 20 / 128), ("int4-g128-sym", 4 + 16 / 128), ("int3-g64", 3 + 19 / 64),
     ("int2-g64", 2 + 18 / 64), ("int8", 8 + 16 / 512), ("nf4-g64", 4 + 16 / 64), ("fp8", 8 + 32 / 512)],
)
def test_bits_per_weight_counts_everything(scheme, bpw):
    q = lowbit.quantize_tensor(torch.randn(256, 512), scheme)
    assert q.bits_per_weight == pytest.approx(bpw)
    assert q.nbytes == q.codes.numel() + q.scales.numel() * q.scales.element_size() + (
        0 if q.zeros is None else q.zeros.numel() * q.zeros.element_size())


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 5, 6, 8]), rows=st.integers(1, 9), cols=st.integers(1, 200),
       g=st.sampled_from([8, 32, 64]), sym=st.booleans(), seed=st.integers(0, 10_000))
def test_requantize_is_identity(bits, rows, cols, g, sym, seed):
    # Dequantized values lie on the grid: quantizing them again with the same qparams is exact.
    torch.manual_seed(seed)
    w = torch.randn(rows, cols)
    scheme = parse_scheme(f"int{bits}-g{g}-{'sym' if sym else 'asym'}")
    q = lowbit.quantize_tensor(w, scheme)
    grid = scheme.grid
    s, z = q.qparams()
    again = grid.encode(group_view(q.dequantize(), "group", g), s, z)
    R, G, gg = scheme.group_dims(tuple(w.shape))
    mask = torch.arange(G * gg).reshape(G, gg) < cols
    assert torch.equal(again[:, mask], q.codes_grouped()[:, mask])


def test_rejects_nan_and_non_float():
    with pytest.raises(LowbitError, match="NaN"):
        lowbit.quantize_tensor(torch.tensor([[1.0, float("nan")]]), "int8")
    with pytest.raises(LowbitError, match="floating"):
        lowbit.quantize_tensor(torch.ones(3, 3, dtype=torch.int32), "int8")


def test_all_zero_group_is_exact():
    w = torch.zeros(4, 64)
    w[0, :32] = torch.randn(32)
    q = lowbit.quantize_tensor(w, "int4-g32")
    assert torch.equal(q.dequantize()[1:], w[1:])
