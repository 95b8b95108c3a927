"""cpp-bf16-gemm: the C++ GEMVs' packed weights in row tiles, rounded to bf16, one bf16 GEMM per tile (prefill on
CPUs with native bf16). On other CPUs it does not serve; its arithmetic is tested everywhere (torch's bf16 GEMM
runs on any CPU, slowly) by declaring native bf16 present."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.kernels import KERNELS, candidates, cpp_bf16_gemm, use_kernels
from lowbit.kernels.base import prepared
from lowbit.model.qmodules import QLinear


def _layer(scheme, out=200, inp=512, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    b = torch.randn(out, generator=g) if bias else None
    return QLinear(lowbit.quantize_tensor(w, scheme), b)


@pytest.fixture
def bf16_cpu(monkeypatch, lib):
    monkeypatch.setattr(cpp_bf16_gemm, "native_bf16", lambda: True)


def _bound(x, wabs):
    """bf16 activations, bf16 weights, a bf16 output: a few 2⁻⁹ of Σ|x||w| per output (as bf16-gemm)."""
    return 2.0 ** -7 * (x.abs() @ wabs.T) + 1e-5


@pytest.mark.parametrize("scheme,source", [("int4-g64", "int4-cpp"), ("int4-g32-sym", "int4-cpp"), ("q4_k", "int4-cpp"),
                                           ("int8", "int8-cpp"), ("q6_k", "grid8-cpp"), ("int3-g64", "grid8-cpp")])
@pytest.mark.parametrize("bias", [True, False])
def test_within_the_bf16_bound_of_the_reference_from_the_gemvs_own_packed_weight(bf16_cpu, scheme, source, bias):
    layer = _layer(scheme, inp=512 if scheme[0] != "q" else 768, bias=bias)
    x = torch.randn(3, 40, layer.in_features)
    with use_kernels("reference"):
        ref = layer(x)
    with use_kernels(["cpp-bf16-gemm"]):
        y = layer(x)
    assert layer._kernel.name == "cpp-bf16-gemm" and y.shape == ref.shape and y.dtype == torch.float32
    assert torch.all((y - ref).abs() <= _bound(x, layer.qweight.dequantize(torch.float32).abs()))
    name, state = layer._kernel_state["cpp-bf16-gemm"]
    assert name == source and state is prepared(layer, KERNELS[source])  # one packed copy of the weight
    with use_kernels(["cpp-bf16-gemm"]):  # bf16 inputs give bf16 outputs
        assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_tiles_cover_every_row_and_huge_activations_take_the_float32_tiles(bf16_cpu, monkeypatch):
    monkeypatch.setattr(cpp_bf16_gemm, "TILE_WEIGHTS", 16 * 512)  # tiles of 16 rows: 200 rows = 12½ tiles
    layer = _layer("int4-g64")
    x = torch.randn(20, 512)
    with use_kernels("reference"):
        ref = layer(x)
    with use_kernels(["cpp-bf16-gemm"]):
        y = layer(x)
    assert torch.all((y - ref).abs() <= _bound(x, layer.qweight.dequantize(torch.float32).abs()))
    x[3, 7] = 3e4  # SmolLM2's down_proj sees such a value on a window's first token
    with use_kernels(["int4-cpp-gemm"]):
        want = layer(x)
    with use_kernels(["cpp-bf16-gemm"]):
        assert torch.equal(layer(x), want)


def test_serves_only_prefill_on_cpus_with_native_bf16(monkeypatch, lib):
    monkeypatch.setattr(cpp_bf16_gemm, "native_bf16", lambda: False)
    assert "cpp-bf16-gemm" not in [k.name for k in candidates(_layer("int4-g64"))]
    monkeypatch.setattr(cpp_bf16_gemm, "native_bf16", lambda: True)
    layer = _layer("int4-g64")
    assert "cpp-bf16-gemm" in [k.name for k in candidates(layer)]
    with use_kernels(["cpp-bf16-gemm"]):
        layer(torch.randn(16, 512))  # below MIN_TOKENS: not this kernel
        assert layer._kernel.name != "cpp-bf16-gemm"
        layer(torch.randn(cpp_bf16_gemm.MIN_TOKENS, 512))
        assert layer._kernel.name == "cpp-bf16-gemm"
    assert "cpp-bf16-gemm" not in [k.name for k in candidates(_layer("nf4-g64"))]  # no GEMV packs a lookup grid
