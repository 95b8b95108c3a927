"""The prefill kernels (int4-cpp-gemm, int8-cpp-gemm: 9 tokens and more) against the dequantize reference.

At 9..16 tokens the GEMVs (int4-cpp, int8-cpp) serve too and win under fixed priorities, so the checks name
the GEMM (``use_kernels([name])``).

They dequantize the packed int4-cpp / int8-cpp state in row tiles (C++, AVX2) and run float32 GEMM per tile,
so: the tile is the reference's dequantized weight (bit for bit for fp16/bf16 scales; within
2⁻²¹·(15|scale| + |minv|) for float32 scales), and the output differs from the reference by float32
summation order only — checked at 1e-5 of Σ|w||x|, far below any int16 or bf16 rounding (the GEMVs' 1/65534,
torch's kernels' 2⁻⁹), so a kernel that rounded activations or weights would fail here.
"""

import pytest
import torch

import lowbit
from lowbit.kernels import KERNELS, candidates, native, use_kernels
from lowbit.kernels.base import prepared
from lowbit.model.qmodules import QLinear
from lowbit.threads import torch_threads

INT4 = ["int4-g32", "int4-g64", "int4-g128", "int4-g32-sym", "int4-g64-sym", "int4-g128-sym", "q4_0", "q4_1",
        "q4_k"]
SCHEMES = INT4 + ["int8"]


def _layer(scheme, out=600, inp=512, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    b = torch.randn(out, generator=g) if bias else None
    return QLinear(lowbit.quantize_tensor(w, scheme), b)


def _kernel(layer) -> str:
    return "int8-cpp-gemm" if layer.qweight.scheme.format == "int8" else "int4-cpp-gemm"


def _tol(layer, x):
    """float32 summation order: 1e-5 of Σ|w||x| per output (plus a floor for outputs near zero)."""
    wabs = layer.qweight.dequantize(torch.float32).abs()
    return 1e-5 * (x.reshape(-1, x.shape[-1]).abs() @ wabs.T).reshape(*x.shape[:-1], -1) + 1e-6


def _check(layer, x):
    with use_kernels("reference"):
        ref = layer(x)
    with use_kernels([_kernel(layer)]):
        y = layer(x)
    assert layer._kernel.name == _kernel(layer)
    assert y.dtype == x.dtype and y.shape == ref.shape == (*x.shape[:-1], layer.out_features)
    err = (y - ref).abs()
    tol = _tol(layer, x)
    assert torch.all(err <= tol), float((err / tol).max())
    return y, ref


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [9, 17, 128, 300])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_against_the_reference(lib, scheme, tokens, threads):
    layer = _layer(scheme, bias=tokens % 2 == 1)  # 600 rows: two tiles of 512 rows (one thread) or 304 (two)
    g = torch.Generator().manual_seed(tokens)
    with torch_threads(threads):
        _check(layer, torch.randn(tokens, layer.in_features, generator=g))


@pytest.mark.parametrize("shape, tile", [((1000, 1024), (256, 1024)),  # 3 full tiles of rows, 1 ragged
                                         ((300, 4352), (256, 896))])  # and columns: 4 chunks of 896, 1 of 768
@pytest.mark.parametrize("scheme", ["int4-g64", "int4-g128", "q4_k", "int8"])
def test_3d_input_without_bias_and_many_tiles(lib, scheme, shape, tile):
    layer = _layer(scheme, out=shape[0], inp=shape[1], bias=False)
    assert native.tile_shape(*shape, 1) == tile
    x = torch.randn(2, 75, layer.in_features)
    y, ref = _check(layer, x)
    assert torch.equal(y[1], layer(x[1]))  # the leading shape is only a view


@pytest.mark.parametrize("scheme", ["int4-g64-sym", "q4_1", "int8"])
def test_bf16_and_half_inputs(lib, scheme):
    layer = _layer(scheme, out=96)
    x = torch.randn(20, layer.in_features)
    with use_kernels("reference"):
        ref = layer(x)
    for dt in (torch.bfloat16, torch.float16):
        xd = x.to(dt)
        y = layer(xd)
        assert layer._kernel.name == _kernel(layer) and y.dtype == dt
        with use_kernels("reference"):
            ref_d = layer(xd.float())  # the same rounded input in float32: y is that, rounded once to dt
        eps = 2.0 ** -8 if dt == torch.bfloat16 else 2.0 ** -11
        assert torch.all((y.float() - ref_d).abs() <= eps * ref_d.abs() + _tol(layer, xd.float()))
        assert not torch.allclose(y.float(), ref, rtol=0, atol=0)  # it is dt's rounding, not float32's


@pytest.mark.parametrize("scheme", ["int4-g64", "int4-g32-sym", "q4_0", "q4_k", "int8"])
def test_huge_inf_and_nan_activations_as_in_the_reference(lib, scheme):
    layer = _layer(scheme, out=64, bias=False)
    x = torch.randn(12, layer.in_features)
    x[1, 5] = 3e4  # SmolLM2's down_proj input on a window's first token
    x[2, 200] = -900.0
    _check(layer, x)  # finite rows: the float32 tolerance, nothing taken apart
    x[3, 9] = float("inf")
    x[4, 17] = float("-inf")
    x[5, 3] = float("nan")
    with use_kernels("reference"):
        ref = layer(x)
    with use_kernels([_kernel(layer)]):
        y = layer(x)
    assert layer._kernel.name == _kernel(layer)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    assert torch.equal(y[y.isinf()], ref[ref.isinf()])
    assert y[5].isnan().all() and y[3].isinf().any()
    fin = ref.isfinite()
    assert torch.all((y - ref)[fin].abs() <= _tol(layer, x.nan_to_num(0, 0, 0))[fin])


@pytest.mark.parametrize("scheme", INT4)
def test_int4_tile_is_the_reference_weight(lib, scheme):
    """fp16 scales (the default of every int4 scheme and of the GGML types): code·scale + minv is exact."""
    layer = _layer(scheme, out=96)
    packed, scale, minv, g, _, _ = prepared(layer, KERNELS["int4-cpp"])
    ref = layer.qweight.dequantize(torch.float32)
    assert torch.equal(lib.q4_tile(packed, scale, minv, g, 0, 96), ref)
    assert torch.equal(lib.q4_tile(packed, scale, minv, g, 40, 57), ref[40:57])


@pytest.mark.parametrize("scheme", ["int4-g64-sf32", "int4-g64-sym-sf32", "int4-g128-sf32-zf32", "int4-g64-zf16"])
def test_int4_tile_within_its_bound(lib, scheme):
    """float32 scales: code·scale rounds, and minv = zero − 8·scale was rounded: ≤ 2⁻²¹·(15|scale| + |minv|)."""
    layer = _layer(scheme, out=96)
    packed, scale, minv, g, _, _ = prepared(layer, KERNELS["int4-cpp"])
    err = (lib.q4_tile(packed, scale, minv, g, 0, 96) - layer.qweight.dequantize(torch.float32)).abs()
    bound = (2.0 ** -21 * (15 * scale.abs() + minv.abs())).repeat_interleave(g, 1)
    assert torch.all(err <= bound)
    x = torch.randn(33, layer.in_features)
    with use_kernels("reference"):
        ref = layer(x)
    y = layer(x)
    assert layer._kernel.name == "int4-cpp-gemm"
    assert torch.all((y - ref).abs() <= _tol(layer, x) + x.abs() @ bound.T)


def test_int8_tile_is_the_reference_weight(lib):
    layer = _layer("int8", out=96)
    codes, scale, *_ = prepared(layer, KERNELS["int8-cpp"])
    assert torch.equal(lib.q8_tile(codes, scale, 0, 96), layer.qweight.dequantize(torch.float32))


@pytest.mark.parametrize("cols", [64, 128, 192, 256, 4096])
@pytest.mark.parametrize("rows", [16, 48, 96, 1000])
def test_exact_on_a_grid_and_the_packing_shows(lib, rows, cols):
    """Small integer activations, power-of-two scales: every product and sum is exact in float32, so y equals
    float64 bit for bit whatever the tile size; a packing one nibble off shows."""
    g = torch.Generator().manual_seed(3)
    out, inp, group = 96, 256, 64
    codes = torch.randint(0, 16, (out, inp), generator=g)
    scale = 2.0 ** -torch.randint(0, 3, (out, inp // group), generator=g).float()
    minv = -8 * scale + torch.randint(-3, 4, (out, inp // group), generator=g).float()
    w = codes.double() * scale.double().repeat_interleave(group, 1) + minv.double().repeat_interleave(group, 1)
    x = torch.randint(-8, 9, (37, inp), generator=g).float()
    b = torch.randint(-4, 5, (out,), generator=g).float()
    want = (x.double() @ w.T + b.double()).float()
    p = native.pack_int4(codes)
    for threads in (1, 2):
        with torch_threads(threads):
            assert torch.equal(lib.q4_gemm(x, p, scale, minv, group, b, rows, cols), want)
    shifted = native.pack_int4(torch.roll(codes, 1, dims=1))
    assert not torch.equal(lib.q4_gemm(x, shifted, scale, minv, group, b, rows, cols), want)
    w8 = torch.randint(-128, 128, (out, inp), generator=g, dtype=torch.int8)
    s8 = 2.0 ** -torch.randint(0, 4, (out,), generator=g).float()
    want8 = (x.double() @ (w8.double() * s8.double()[:, None]).T).float()
    assert torch.equal(lib.q8_gemm(x, w8, s8, None, rows, cols), want8)
    assert not torch.equal(lib.q8_gemm(x, torch.roll(w8, 1, dims=0), s8, None, rows, cols), want8)


@pytest.mark.parametrize("scheme", ["int4-g64", "q4_k", "int8"])
def test_the_packed_state_is_shared(lib, scheme):
    """One packed copy per layer: the prefill kernel's state is the GEMV kernel's object itself."""
    layer = _layer(scheme)
    gemv = "int8-cpp" if scheme == "int8" else "int4-cpp"
    layer(torch.randn(40, layer.in_features))  # prefill first: it makes the GEMV's state
    assert layer._kernel.name == _kernel(layer)
    assert set(layer._kernel_state) == {gemv, _kernel(layer)}
    state = layer._kernel_state[_kernel(layer)]
    assert state is layer._kernel_state[gemv]
    layer(torch.randn(3, layer.in_features))
    assert layer._kernel.name == gemv and layer._kernel_state[gemv] is state  # not packed again


def test_bounds_of_the_batch_sizes(lib):
    layer = _layer("int4-g64", out=64)
    for tokens, want in ((8, "int4-cpp"), (16, "int4-cpp"), (17, "int4-cpp-gemm"), (4096, "int4-cpp-gemm")):
        layer(torch.randn(tokens, layer.in_features))
        assert layer._kernel.name == want
    with use_kernels(["int4-cpp-gemm"]):  # 9..16: both serve; the GEMM only when named (or measured faster)
        layer(torch.randn(9, layer.in_features))
        assert layer._kernel.name == "int4-cpp-gemm"
        layer(torch.randn(8, layer.in_features))
        assert layer._kernel.name != "int4-cpp-gemm"
    assert KERNELS["int4-cpp-gemm"].min_tokens == KERNELS["int8-cpp-gemm"].min_tokens == native.GEMM_MIN_TOKENS
    assert KERNELS["int4-cpp"].max_tokens == KERNELS["int8-cpp"].max_tokens == native.MAX_TOKENS == 16


@pytest.mark.parametrize("scheme", ["int4-g64", "int8"])
def test_without_the_library_they_do_not_serve(scheme, monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)
    layer = _layer(scheme, out=64)
    names = [k.name for k in candidates(layer)]
    assert "int4-cpp-gemm" not in names and "int8-cpp-gemm" not in names
    layer(torch.randn(20, layer.in_features))
    assert layer._kernel.name in ("int4-torch", "int8-torch")


@pytest.mark.parametrize("make", [
    lambda: _layer("int4-g64", inp=96),  # a ragged last group
    lambda: _layer("int3-g64"),
    lambda: _layer("int8", inp=40),  # rows of no multiple of 32
    lambda: _layer("int8-g64-sym"),  # int8 per group
])
def test_what_the_gemvs_cannot_take_they_cannot_either(lib, make):
    layer = make()
    names = [k.name for k in candidates(layer)]
    assert not {"int4-cpp", "int8-cpp", "int4-cpp-gemm", "int8-cpp-gemm"} & set(names)
