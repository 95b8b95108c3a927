import pytest
import torch

from lowbit.errors import SchemeError
from lowbit.primitives.numformats import IntFormat, format_names, get_format, register_format


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_int_ranges(bits):
    s, u = get_format(f"int{bits}"), get_format(f"uint{bits}")
    assert isinstance(s, IntFormat) and s.bits == bits == u.bits
    assert (s.qmin, s.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert (u.qmin, u.qmax) == (0, 2**bits - 1)
    x = torch.linspace(-300, 300, 1001)
    r = s.round(x)
    assert r.min() == s.qmin and r.max() == s.qmax
    assert torch.equal(r, torch.round(r))


@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                        ("fp8_e4m3fn", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_float_round_matches_torch_cast(name, dtype):
    fmt = get_format(name)
    x = torch.randn(10000) * 50
    x = x.clamp(-fmt.max_value, fmt.max_value)
    assert torch.equal(fmt.round(x), x.to(dtype).to(torch.float32))
    assert fmt.max_value == float(torch.finfo(dtype).max)


def test_fp8_saturates_instead_of_nan():
    fmt = get_format("fp8_e4m3fn")
    assert fmt.round(torch.tensor([1e6, -1e6])).tolist() == [448.0, -448.0]


def test_nf4_table_rounds_to_nearest():
    fmt = get_format("nf4")
    levels = torch.tensor(fmt.table)
    x = torch.rand(5000) * 2 - 1
    r = fmt.round(x)
    nearest = levels[(x[:, None] - levels[None]).abs().argmin(1)]
    assert torch.allclose((r - x).abs(), (nearest - x).abs())
    assert fmt.bits == 4 and len(fmt.table) == 16 and 0.0 in fmt.table


def test_unknown_format_lists_known():
    with pytest.raises(SchemeError, match="int4"):
        get_format("int7")
    assert "nf4" in format_names()
    with pytest.raises(SchemeError, match=r"^unknown number format 'int7' \(known: bf16, fp16, fp8_e4m3fn, "):
        get_format("int7")


def test_a_format_name_registers_once():
    with pytest.raises(SchemeError, match="number format 'int4' is already registered"):
        register_format(IntFormat("int4", 4))
    assert get_format("int4").signed
