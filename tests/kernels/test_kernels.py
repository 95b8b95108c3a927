"""Every fast kernel against the dequantize reference: the repacked weight is the stored one exactly, outputs
agree within the kernel's bf16 roundings, and the choice follows the declared batch sizes and priorities."""

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.kernels import KERNELS, candidates, native, use_kernels
from lowbit.kernels.cpu import native_bf16
from lowbit.kernels.int4_torch import int4_parts
from lowbit.model.qmodules import QLinear

INT4 = ["int4-g32", "int4-g64", "int4-g128", "int4-g64-sym", "q4_0", "q4_1", "q4_k"]


def _layer(scheme, out=64, inp=256, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    b = torch.randn(out, generator=g) if bias else None
    return QLinear(lowbit.quantize_tensor(w, scheme), b)


def _hqq_layer(out=64, inp=256):
    from lowbit.core.scheme import Scheme

    scheme = Scheme(format="int4", granularity="group", group_size=64, symmetric=False, zero_dtype="float16")
    return QLinear(lowbit.quantize_tensor(torch.randn(out, inp), scheme), None)


def _bound(x, wabs):
    """|y - y_ref| for bf16 activations, bf16 scales and a bf16 output: a few 2^-9 of sum |x| |w| per output."""
    return 2.0 ** -7 * (x.abs() @ wabs.T) + 1e-5


@pytest.mark.parametrize("scheme", INT4)
def test_int4_repack_is_the_stored_weight(scheme):
    layer = _layer(scheme)
    codes, scale, zero = int4_parts(layer)
    g = layer.in_features // scale.shape[1]
    w = (codes.float() - 8) * scale.repeat_interleave(g, 1) + zero.repeat_interleave(g, 1)
    ref = layer.qweight.dequantize(torch.float32)
    assert torch.allclose(w, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))


def test_int4_repack_float_zero_points():
    layer = _hqq_layer()
    codes, scale, zero = int4_parts(layer)
    w = (codes.float() - 8) * scale.repeat_interleave(64, 1) + zero.repeat_interleave(64, 1)
    assert torch.allclose(w, layer.qweight.dequantize(torch.float32), atol=1e-5)
    assert "int4-torch" in [k.name for k in candidates(layer)]
    from lowbit.kernels.int4_torch import columns

    cols = torch.tensor([0, 63, 64, 255])
    assert torch.allclose(columns(layer, cols), layer.qweight.dequantize(torch.float32)[:, cols], atol=1e-6)


@pytest.mark.parametrize("scheme", [*INT4, "int8"])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_weight_only_kernels_within_bf16_bound(scheme, tokens):
    layer = _layer(scheme)
    x = torch.randn(tokens, layer.in_features)
    with use_kernels("reference"):
        ref = layer(x)
    want = "int8-torch" if scheme == "int8" else "int4-torch"
    with use_kernels([want]):  # torch's kernels (lowbit's C++ ones outrank them at 1-8 tokens: test_cpp_kernels.py)
        y = layer(x)
    assert layer._kernel.name == want and y.dtype == x.dtype and y.shape == ref.shape
    if scheme == "int8":
        wabs = layer.qweight.dequantize(torch.float32).abs()
    else:
        codes, scale, zero = int4_parts(layer)
        g = layer.in_features // scale.shape[1]
        wabs = (codes.float() - 8).abs() * scale.abs().repeat_interleave(g, 1) + zero.abs().repeat_interleave(g, 1)
    err = (y - ref).abs()
    assert torch.all(err <= _bound(x, wabs)), float((err / _bound(x, wabs)).max())
    assert float(err.max()) > 0  # a different arithmetic really ran (bf16), not the reference again


@pytest.mark.skipif(not native_bf16(), reason="bf16-gemm serves only CPUs with native bf16")
@pytest.mark.parametrize("scheme", ["int3-g64", "q6_k", "q2_k", "int4-g16", "nf4-g64"])
def test_bf16_gemm_prefill_within_bound(scheme):
    layer = _layer(scheme)
    x = torch.randn(2, 40, layer.in_features)
    with use_kernels("reference"):
        ref = layer(x)
    with use_kernels(["bf16-gemm"]):  # affine grids: grid8-cpp-gemm outranks it where the C++ kernels are built
        y = layer(x)
    assert layer._kernel.name == "bf16-gemm"
    wabs = layer.qweight.dequantize(torch.float32).abs()
    assert torch.all((y - ref).abs() <= _bound(x, wabs))


def test_choice_follows_batch_size_priority_and_mode():
    layer = _layer("int4-g64")
    names = [k.name for k in candidates(layer)]
    small = "int4-cpp" if native.library() is not None else "int4-torch"  # 1-8 tokens: lowbit's C++ GEMV
    assert names[0] == small and names[-1] == "dequantize"
    assert [KERNELS[n].priority for n in names] == sorted((KERNELS[n].priority for n in names), reverse=True)
    layer(torch.randn(1, 256))
    assert layer._kernel.name == small
    layer(torch.randn(64, 256))
    big = "int4-cpp-gemm" if native.library() is not None else "int4-torch"  # 9+ tokens: lowbit's tiled GEMM
    assert layer._kernel.name == big  # both outrank bf16-gemm at every size
    other = _layer("nf4-g64")  # a lookup grid: no packed kernel
    other(torch.randn(1, 256))
    assert other._kernel.name == "dequantize"
    other(torch.randn(64, 256))
    assert other._kernel.name == ("bf16-gemm" if native_bf16() else "dequantize")
    affine = _layer("int3-g64")  # other affine grids: repacked to int8 codes (grid8-cpp) where the C++ kernels are
    affine(torch.randn(1, 256))
    assert affine._kernel.name == ("grid8-cpp" if native.library() is not None else "dequantize")
    affine(torch.randn(64, 256))
    assert affine._kernel.name == ("grid8-cpp-gemm" if native.library() is not None else
                                   "bf16-gemm" if native_bf16() else "dequantize")
    with use_kernels("reference"):
        layer(torch.randn(1, 256))
        assert layer._kernel.name == "dequantize"
    with use_kernels(["int8-torch"]):  # only the named kernel (and the references where it does not serve)
        layer(torch.randn(1, 256))
        assert layer._kernel.name == "dequantize"
    with pytest.raises(LowbitError, match="unknown kernel 'magic'"):
        with use_kernels("magic"):
            pass


@pytest.mark.parametrize("inp", [8, 24, 40, 100])
def test_int8_torch_refuses_rows_of_no_multiple_of_16(inp):
    """torch 2.13's ``_weight_int8pack_mm`` returns garbage or crashes the process on an AVX-512 CPU when the row
    length is not a multiple of 16 (measured: K = 8, 24, 40, 56, 72, 100, 200 fail; 16, 32, 48 … 576 are right)."""
    layer = _layer("int8", inp=inp)
    assert "int8-torch" not in [k.name for k in candidates(layer)]
    assert "int8-torch" in [k.name for k in candidates(_layer("int8", inp=48))]


@pytest.mark.parametrize("make", [lambda: _layer("int4-g64", out=40), lambda: _layer("int4-g128", inp=576),
                                  lambda: _layer("int4-g16"), lambda: _layer("q5_k"), lambda: _layer("iq4_nl")])
def test_layers_the_int4_kernel_cannot_take_fall_back(make):
    layer = make()  # 40 rows (not a multiple of 16), a ragged group, group 16, a 5-bit type
    assert "int4-torch" not in [k.name for k in candidates(layer)]
    x = torch.randn(1, layer.in_features)
    with use_kernels("reference"):
        ref = layer(x)
    with use_kernels(["int4-torch"]):  # (int4-cpp takes 40 rows: test_cpp_kernels.py)
        assert torch.equal(layer(x), ref) and layer._kernel.name == "dequantize"


def test_prepared_weight_is_packed_once_and_dropped_on_changes():
    a, b = _layer("int4-g64", seed=0), _layer("int4-g64", seed=1)
    x = torch.randn(16, 256)
    with use_kernels(["int4-torch"]):  # torch's packed kernel (int4-cpp-gemm shares int4-cpp's: test_cpp_gemm.py)
        b(x)
        state = b._kernel_state["int4-torch"]
        b(x)
        assert b._kernel_state["int4-torch"] is state
        b.load_state_dict(a.state_dict())
        assert not b._kernel_state
        assert torch.equal(b(x), a(x))
        b.to(torch.float32)
        assert not b._kernel_state
        assert b.prepare_kernels((16,)) == ["int4-torch"] and "int4-torch" in b._kernel_state


def test_bias_and_bf16_inputs():
    layer = _layer("int4-g32", bias=True)
    x = torch.randn(3, 256).to(torch.bfloat16)
    with use_kernels(["int4-torch"]):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and layer._kernel.name == "int4-torch"
    with use_kernels("reference"):
        ref = layer(x.float())
    assert torch.allclose(y.float(), ref, rtol=0.02, atol=0.1)


def test_smoothquant_input_scale_is_applied_by_every_kernel():
    layer = _layer("int4-g64")
    layer.input_scale = torch.rand(256) + 0.5
    x = torch.randn(1, 256)
    assert "int4-torch" not in [k.name for k in candidates(layer)]  # the fast kernels do not divide x
    want = torch.nn.functional.linear(x / layer.input_scale, layer.qweight.dequantize(), layer.bias)
    assert torch.allclose(layer(x), want, atol=1e-5)


@pytest.mark.parametrize("scheme", ["int4-g64", "q4_k", "q4_1"])
def test_large_activations_keep_asymmetric_grids_accurate(scheme):
    """Large (not huge) activations with large zero-points: the bf16 roundings stay small."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.02 + 0.01  # an offset: large zero-points
    layer = QLinear(lowbit.quantize_tensor(w, scheme))
    x = 10 * torch.randn(8, 256, generator=g)
    x[:, 7:10] = 60.0  # large, none holding most of the row's norm: the packed kernel still takes it
    with use_kernels("reference"):
        ref = layer(x)
    with use_kernels(["int4-torch"]):
        y = layer(x)
    assert layer._kernel.name == "int4-torch"
    assert float((y - ref).norm() / ref.norm()) < 4e-3


@pytest.mark.parametrize("scheme", ["int4-g64", "int4-g32-sym", "q4_0", "q4_k", "int8"])
def test_dominant_activations_are_added_in_float32(scheme):
    """A row with one huge activation (SmolLM2's down_proj sees 3e4 among ones) loses percents in torch's
    packed kernels; the few columns holding such values are multiplied apart in float32."""
    layer = _layer(scheme)
    x = torch.randn(3, 256)
    x[1, 5] = 3.2e4
    x[2, 200] = -900.0
    with use_kernels("reference"):
        ref = layer(x)
    y = layer(x)
    assert layer._kernel.name in ("int4-torch", "int8-torch", "int4-cpp", "int8-cpp")
    assert float((y - ref).norm() / ref.norm()) < 4e-3
    from lowbit.kernels.int4_torch import columns

    if scheme != "int8":
        cols = torch.tensor([5, 64, 200, 255])
        assert torch.allclose(columns(layer, cols), layer.qweight.dequantize(torch.float32)[:, cols], atol=1e-6)
