"""lowbit's C++ GEMVs (int4-cpp, int8-cpp) against the dequantize reference, within the bound their int16
activations give, on every instruction-set path this CPU runs; and the fallback when they cannot be built.

The bound (int4_cpp.py, int8_cpp.py): each token's activations are rounded to int16 per group g of the
weight's columns, ``a_g = max|x_g| / 32767``, so ``|x − a_g·q| ≤ a_g / 2`` per element and, as the integer
dot products are exact, ``|y_n − y_ref,n| ≤ Σ_g (a_g / 2)·Σ_{k∈g} |w_nk|`` plus float32 summation.
"""

import warnings

import pytest
import torch

import lowbit
from lowbit.isolate import run_isolated
from lowbit.kernels import candidates, native, use_kernels
from lowbit.model.qmodules import QLinear

INT4 = ["int4-g32", "int4-g64", "int4-g128", "int4-g32-sym", "int4-g64-sym", "int4-g128-sym", "q4_0", "q4_1",
        "q4_k"]


def _first_use() -> dict:
    """Build (or find) the library, load it and run one layer of each kernel: the suite's first native call."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lib = native.library()
    if lib is None:
        return {"isas": [], "why": [str(w.message) for w in caught]}
    out = {"isas": native.isas()}
    for scheme in ("int4-g64", "int8"):
        layer = QLinear(lowbit.quantize_tensor(torch.randn(48, 256), scheme))
        x = torch.randn(2, 256)
        with use_kernels("reference"):
            ref = layer(x)
        y = layer(x)
        out[scheme] = (layer._kernel.name, float((y - ref).norm() / ref.norm()))
    return out


def test_first_call_runs_in_a_child_process():
    """A crash in the native code is this one failed test, not a dead pytest; later tests run in-process."""
    got = run_isolated(_first_use, what="lowbit's C++ kernels, first use", timeout=900)
    if not got["isas"]:
        import shutil

        from lowbit.kernels.cpu import has

        can = shutil.which("c++") and shutil.which("ninja") and has("avx2", "fma")
        assert not can, f"a compiler, ninja and AVX2 are here, yet no C++ kernels: {got['why']}"
        pytest.skip(f"no C++ kernels on this machine: {got['why'] or 'a CPU without AVX2 + FMA'}")
    assert got["isas"][0] == "avx2"
    assert got["int4-g64"][0] == "int4-cpp" and got["int4-g64"][1] < 1e-2
    assert got["int8"][0] == "int8-cpp" and got["int8"][1] < 1e-2


def _layer(scheme, out=72, inp=512, seed=0, bias=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * scale
    b = torch.randn(out, generator=g) if bias else None
    return QLinear(lowbit.quantize_tensor(w, scheme), b)


def _group(layer) -> int:
    from lowbit.kernels import int4_cpp, int8_cpp

    return (int8_cpp.group_of if layer.qweight.scheme.format == "int8" else int4_cpp.group_of)(layer)


def _bound(layer, x):
    """Σ_g (a_g / 2)·Σ_{k∈g} |w_nk| ``(tokens, out)``, plus float32 summation (1e-5 of Σ|x||w|)."""
    g = _group(layer)
    wabs = layer.qweight.dequantize(torch.float32).abs()
    a = x.abs().reshape(len(x), -1, g).amax(-1) / 32767  # (tokens, groups)
    per_group = wabs.reshape(layer.out_features, -1, g).sum(-1)  # (out, groups)
    return (a / 2) @ per_group.T + 1e-5 * (x.abs() @ wabs.T) + 1e-5


def _check(layer, x, want):
    with use_kernels("reference"):
        ref = layer(x)
    y = layer(x)
    assert layer._kernel.name == want and y.dtype == x.dtype and y.shape == ref.shape
    err = (y - ref).abs()
    bound = _bound(layer, x)
    assert torch.all(err <= bound), float((err / bound).max())
    assert float(err.max()) > 0  # int16 activations really ran, not the reference again
    return y


@pytest.mark.parametrize("isa", ["best", "avx2"])
@pytest.mark.parametrize("tokens", [1, 8, 16])  # 16: the GEMV's last size, four passes of four tokens
@pytest.mark.parametrize("scheme", INT4)
def test_int4_within_the_activation_rounding_bound(lib, scheme, tokens, isa, monkeypatch):
    monkeypatch.setenv("LOWBIT_CPP_ISA", isa)  # "best": the path this CPU's best takes; "avx2": forced
    layer = _layer(scheme, bias=tokens == 1)  # 72 rows: no multiple of 16 needed, unlike int4-torch
    _check(layer, torch.randn(tokens, layer.in_features), "int4-cpp")
    want = "avx2" if isa == "avx2" else native.isas()[-1]
    assert layer._kernel_state["int4-cpp"][-1] == native.ISAS.index(want)


@pytest.mark.parametrize("isa", ["best", "avx2"])
@pytest.mark.parametrize("tokens", [1, 8, 13])
@pytest.mark.parametrize("inp", [512, 96])  # blocks of 64, of 32
def test_int8_within_the_activation_rounding_bound(lib, tokens, inp, isa, monkeypatch):
    monkeypatch.setenv("LOWBIT_CPP_ISA", isa)
    layer = _layer("int8", inp=inp, bias=tokens == 8)
    _check(layer, torch.randn(tokens, inp), "int8-cpp")
    assert layer._kernel_state["int8-cpp"][2] == (64 if inp % 64 == 0 else 32)


def _on_the_grid(g, tokens, inp, group):
    """Activations q·a with a = 1: each group's first element ±32767, the rest small integers (so every
    int32 dot product stays below 2^24 and converts to float32 exactly)."""
    x = torch.randint(-255, 256, (tokens, inp), generator=g).float()
    x[:, ::group] = 32767.0 * torch.where(torch.rand(tokens, inp // group, generator=g) < 0.5, -1.0, 1.0)
    return x


@pytest.mark.parametrize("isa", native.ISAS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_exact_on_the_grid(lib, isa, group):
    """Activations on the int16 grid and power-of-two scales: every product and sum is exact, the kernel
    equals float64 bit for bit, and a packing off by one nibble shows."""
    if isa not in native.isas():
        pytest.skip(f"this CPU does not run the {isa} path")
    g = torch.Generator().manual_seed(1)
    out, inp = 40, 256
    codes = torch.randint(0, 16, (out, inp), generator=g)
    scale = 2.0 ** -torch.randint(2, 4, (out, inp // group), generator=g).float()
    minv = -8 * scale + torch.randint(-3, 4, (out, inp // group), generator=g).float() / 4
    x = _on_the_grid(g, 8, inp, group)
    w = codes.double() * scale.double().repeat_interleave(group, 1) + minv.double().repeat_interleave(group, 1)
    i = native.ISAS.index(isa)
    for t in (1, 3, 8):
        y = lib.q4_gemv(x[:t].contiguous(), native.pack_int4(codes), scale, minv, group, None, 1e9, i)
        assert torch.equal(y, (x[:t].double() @ w.T).float())
    want = (x.double() @ w.T).float()
    shifted = native.pack_int4(torch.roll(codes, 1, dims=1))  # every code one column off
    assert not torch.equal(lib.q4_gemv(x, shifted, scale, minv, group, None, 1e9, i), want)
    swapped = native.pack_int4(codes.reshape(out, -1, 2, 16).flip(2).reshape(out, inp))  # nibbles swapped
    assert not torch.equal(lib.q4_gemv(x, swapped, scale, minv, group, None, 1e9, i), want)


@pytest.mark.parametrize("isa", native.ISAS)
@pytest.mark.parametrize("group", [32, 64])
def test_int8_exact_on_the_grid(lib, isa, group):
    if isa not in native.isas():
        pytest.skip(f"this CPU does not run the {isa} path")
    g = torch.Generator().manual_seed(2)
    w = torch.randint(-128, 128, (50, 128), generator=g, dtype=torch.int8)  # -128 too
    s = 2.0 ** -torch.randint(3, 8, (50,), generator=g).float()
    x = _on_the_grid(g, 5, 128, group)
    y = lib.q8_gemv(x, w, s, group, None, 1e9, native.ISAS.index(isa))
    assert torch.equal(y, (x.double() @ (w.double() * s.double()[:, None]).T).float())


def test_the_paths_agree_bit_for_bit(lib):
    """AVX2 (vpmaddwd + vpaddd) and AVX512-VNNI (vpdpwssd) compute the same integers and the same floats."""
    if len(native.isas()) < 2:
        pytest.skip("this CPU runs one path only (AVX2)")
    layer4, layer8 = _layer("q4_k", inp=512), _layer("int8")
    for layer, k, args in ((layer4, "int4-cpp", 5), (layer8, "int8-cpp", 4)):
        with use_kernels([k]):
            layer(torch.randn(1, layer.in_features))
        state = layer._kernel_state[k]
        x = torch.randn(8, layer.in_features)
        fn = lib.q4_gemv if k == "int4-cpp" else lib.q8_gemv
        ys = [fn(x, *state[:args], 256.0, i) for i in range(len(native.ISAS))]
        assert torch.equal(ys[0], ys[1])


def test_bias_and_half_inputs(lib):
    layer = _layer("int4-g32", bias=True)
    x = torch.randn(3, layer.in_features).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer._kernel.name == "int4-cpp"
    with use_kernels("reference"):
        ref = layer(x.float())
    assert torch.all((y.float() - ref).abs() <= _bound(layer, x.float()) + 2 ** -8 * ref.abs())


@pytest.mark.parametrize("scheme", ["int4-g64", "int4-g32-sym", "q4_0", "q4_k", "int8"])
def test_huge_activations_are_taken_apart(lib, scheme):
    """SmolLM2's 3·10⁴ activation would make its row's int16 step ~1, as large as the row's other values:
    those columns go around in float32 and the rest keeps its own bound."""
    layer = _layer(scheme, inp=256)
    x = torch.randn(3, 256)
    x[1, 5] = 3.2e4
    x[2, 200] = -900.0
    with use_kernels("reference"):
        ref = layer(x)
    y = layer(x)
    assert layer._kernel.name in ("int4-cpp", "int8-cpp")
    rest = x.clone()
    rest[1, 5] = rest[2, 200] = 0.0
    wabs = layer.qweight.dequantize(torch.float32).abs()
    bound = _bound(layer, rest) + 1e-6 * (x.abs() @ wabs.T)  # the huge products: float32 roundings only
    assert torch.all((y - ref).abs() <= bound), float(((y - ref).abs() / bound).max())


def test_nan_and_inf_propagate_as_in_the_reference(lib):
    layer = _layer("int4-g64", inp=256, bias=False)
    x = torch.randn(2, 256)
    x[0, 3] = float("nan")
    x[1, 9] = float("inf")
    with use_kernels("reference"):
        ref = layer(x)
    y = layer(x)
    assert layer._kernel.name == "int4-cpp"
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())


@pytest.mark.parametrize("make", [
    lambda: _layer("int4-g64", inp=96),  # a ragged last group
    lambda: _layer("int4-g16"),  # group 16
    lambda: _layer("int3-g64"),  # 3-bit
    lambda: _layer("q5_k"),  # a 5-bit GGML type
    lambda: _layer("int8", inp=40),  # int8 rows of no multiple of 32
    lambda: _layer("int8-g64-sym"),  # int8 per group, not per channel
])
def test_layers_the_cpp_kernels_cannot_take_are_not_served(lib, make):
    layer = make()
    names = [k.name for k in candidates(layer)]
    assert "int4-cpp" not in names and "int8-cpp" not in names
    x = torch.randn(1, layer.in_features)
    with use_kernels("reference"):
        ref = layer(x)
    layer(x)
    assert layer._kernel.name not in ("int4-cpp", "int8-cpp")
    assert torch.allclose(layer(x), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


def test_more_than_sixteen_tokens_go_to_the_prefill_kernel(lib):
    layer = _layer("int4-g64", out=64)
    layer(torch.randn(16, layer.in_features))
    assert layer._kernel.name == "int4-cpp"
    layer(torch.randn(17, layer.in_features))
    assert layer._kernel.name == "int4-cpp-gemm"  # tests/kernels/test_cpp_gemm.py


def test_a_failed_build_warns_once_and_torch_runs(monkeypatch, tmp_path):
    def no_compiler(target):
        raise RuntimeError("no C++ compiler found (test)")

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))  # no library built there
    monkeypatch.setattr(native, "_build", no_compiler)
    native.library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for seed in range(3):
                layer = _layer("int4-g64", out=64, seed=seed)
                layer(torch.randn(1, layer.in_features))
                assert layer._kernel.name == "int4-torch"
        ours = [w for w in caught if "C++ kernels are off" in str(w.message)]
        assert len(ours) == 1 and "no C++ compiler found" in str(ours[0].message)
    finally:
        native.library.cache_clear()  # the next test loads the real library again


def test_env_var_turns_them_off_silently(monkeypatch):
    monkeypatch.setenv("LOWBIT_CPP_KERNELS", "off")
    native.library.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            layer = _layer("int8", out=64)
            layer(torch.randn(1, layer.in_features))
        assert layer._kernel.name == "int8-torch" and native.library() is None
    finally:
        native.library.cache_clear()


def test_pack_int4_layout():
    codes = torch.arange(64).remainder(16).reshape(1, 64)
    codes[0, 16:32] = 15 - codes[0, 16:32]
    packed = native.pack_int4(codes)
    assert packed.shape == (1, 32) and packed.dtype == torch.uint8
    assert torch.equal(packed[0] & 15, codes[0].reshape(2, 2, 16)[:, 0].flatten().to(torch.uint8))
    assert torch.equal(packed[0] >> 4, codes[0].reshape(2, 2, 16)[:, 1].flatten().to(torch.uint8))


@pytest.mark.parametrize("schemes", [("int4-g64", "int4-g64", "int4-g64"), ("int8", "int8"), ("q4_0", "q4_1")])
def test_stacked_layers_are_one_call_bit_for_bit(lib, schemes):
    """Layers reading one input (q, k, v) stacked into one GEMV compute each row exactly as their own call does
    (the same activation rounding, the same per-row sums), with biases where some layers have them."""
    from lowbit.kernels.base import stacked

    g = torch.Generator().manual_seed(0)
    mods = []
    for i, s in enumerate(schemes):
        w = torch.randn(48 + 16 * i, 256, generator=g)
        bias = torch.randn(w.shape[0], generator=g) if i == 1 else None
        mods.append(QLinear(lowbit.quantize_tensor(w, s), bias=bias))
    x = torch.randn(3, 256, generator=g)
    x[1, 7] = 3e4  # a huge activation: both take its column apart in float32
    own = torch.cat([m(x) for m in mods], -1)
    k, run = stacked(mods, 3)
    assert k.name in ("int4-cpp", "int8-cpp")
    assert torch.equal(run(x), own)
    assert torch.equal(torch.cat([m(x) for m in mods], -1), own)  # each layer's state is now a view: unchanged
    x12 = torch.randn(12, 256, generator=g)
    assert torch.equal(stacked(mods, 12)[1](x12), torch.cat([m(x12) for m in mods], -1))
    assert stacked(mods, 17) is None  # past the GEMVs' 16 tokens
    with use_kernels("reference"):
        assert stacked(mods, 1) is None


def test_layers_of_different_groups_are_not_stacked(lib):
    from lowbit.kernels.base import stacked

    a = QLinear(lowbit.quantize_tensor(torch.randn(32, 128), "int4-g32"))
    b = QLinear(lowbit.quantize_tensor(torch.randn(32, 128), "int4-g64"))
    assert stacked([a, b], 1) is None
    c = QLinear(lowbit.quantize_tensor(torch.randn(32, 64), "int4-g32"))
    assert stacked([a, c], 1) is None  # another input width


@pytest.mark.parametrize("act", ["int8-dynamic", "int8-static"])
@pytest.mark.parametrize("tokens", [1, 3, 8, 16])
def test_w8a8_gemv_is_int_mm_bit_for_bit(lib, act, tokens):
    """int8-int8-cpp quantizes activations as quantize_activation does and sums exactly: torch._int_mm's output."""
    g = torch.Generator().manual_seed(tokens)
    layer = QLinear(lowbit.quantize_tensor(torch.randn(80, 576, generator=g), "int8"), torch.randn(80, generator=g))
    layer.act_scheme = act
    layer.act_scale = torch.tensor(0.04) if act == "int8-static" else None
    x = torch.randn(tokens, 576, generator=g) * 3
    with use_kernels(["int8-int8-cpp"]):
        y = layer(x)
        assert layer._kernel.name == "int8-int8-cpp"
    with use_kernels(["int8-int8"]):
        r = layer(x)
    assert torch.equal(y, r)
    with use_kernels("reference"):
        assert torch.allclose(y, layer(x), rtol=1e-5, atol=1e-4)  # fake-act: the same codes, float summation
    x[0, 5] = float("nan")  # the torch kernel's arithmetic then (whatever it makes of NaN)
    with use_kernels(["int8-int8-cpp"]):
        y = layer(x)
    with use_kernels(["int8-int8"]):
        r = layer(x)
    assert torch.equal(y.isnan(), r.isnan()) and torch.equal(y.nan_to_num(), r.nan_to_num())


@pytest.mark.parametrize("act", ["int8-dynamic", "int8-static"])
def test_w8a8_prefill_is_fake_act_in_float32_order(lib, act):
    g = torch.Generator().manual_seed(1)
    layer = QLinear(lowbit.quantize_tensor(torch.randn(80, 576, generator=g), "int8"), torch.randn(80, generator=g))
    layer.act_scheme = act
    layer.act_scale = torch.tensor(0.04) if act == "int8-static" else None
    x = torch.randn(2, 40, 576, generator=g) * 3
    with use_kernels(["fake-act-cpp-gemm"]):
        y = layer(x)
        assert layer._kernel.name == "fake-act-cpp-gemm"
    with use_kernels("reference"):
        ref = layer(x)
    assert y.shape == ref.shape and torch.allclose(y, ref, rtol=1e-5, atol=1e-4)
