"""grid8-cpp / grid8-cpp-gemm: every affine grid of up to 8 bits (GGML q2_k … q8_0, lowbit's int2 … int8 per
group, channel or tensor) repacked to int8 codes with float32 scale and minv per block, against the dequantize
reference: the repacked weight is the reference's bit for bit; the GEMV (1..8 tokens) is within its int16
activation-rounding bound, the tiled GEMM (9+ tokens) within float32 summation order; stacking, huge inputs,
what they do not serve, and a whole decoder run through lowbit's runtime."""

import pytest
import torch

import lowbit
from lowbit.kernels import KERNELS, candidates, grid8_cpp, use_kernels
from lowbit.kernels.base import prepared, stacked
from lowbit.model.qmodules import QLinear
from lowbit.threads import torch_threads

GGML = ["q2_k", "q3_k", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0"]
AFFINE = ["int2-g16", "int3-g32", "int5-g48", "int6-g16-sym", "int6-g64", "int8-g32", "int8-g128", "int8-asym",
          "int3", "int8-tensor"]
SCHEMES = GGML + AFFINE


def _layer(scheme, out=80, inp=768, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    b = torch.randn(out, generator=g) if bias else None
    return QLinear(lowbit.quantize_tensor(w, scheme), b)


def _ref(layer, x):
    with use_kernels("reference"):
        return layer(x)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_repacked_weight_is_the_reference_weight(lib, scheme):
    layer = _layer(scheme)
    codes, scale, minv, B = prepared(layer, KERNELS["grid8-cpp"])[:4]
    want = layer.qweight.dequantize(torch.float32)
    assert torch.equal(lib.g8_tile(codes, scale, minv, B, 0, layer.out_features), want)
    assert torch.equal(grid8_cpp.columns((codes, scale, minv, B), torch.tensor([0, 17, 767])), want[:, [0, 17, 767]])
    symmetric = scheme in ("q3_k", "q5_0", "q6_k", "q8_0", "int6-g16-sym", "int8-g32", "int8-g128", "int8-tensor")
    assert (minv.numel() == 0) == symmetric  # centred codes, no minimum to read
    assert B == {"int5-g48": 16, "int8-g128": 64, "int8-asym": 64, "int3": 64, "int8-tensor": 64}.get(
        scheme, 16 if scheme in ("q2_k", "q3_k", "q6_k", "int2-g16", "int6-g16-sym") else
        64 if scheme == "int6-g64" else 32)


def _bound(layer, x, B):
    """Σ_b (a_b / 2)·Σ_{k∈b} |w_nk| plus float32 summation (1e-5 of Σ|x||w|)."""
    wabs = layer.qweight.dequantize(torch.float32).abs()
    a = x.abs().reshape(len(x), -1, B).amax(-1) / 32767
    return (a / 2) @ wabs.reshape(layer.out_features, -1, B).sum(-1).T + 1e-5 * (x.abs() @ wabs.T) + 1e-5


@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_gemv_within_the_activation_rounding_bound(lib, scheme, tokens):
    layer = _layer(scheme, bias=tokens != 3)
    x = torch.randn(tokens, layer.in_features, generator=torch.Generator().manual_seed(tokens))
    ref = _ref(layer, x)
    y = layer(x)
    assert layer._kernel.name == "grid8-cpp" and y.shape == ref.shape
    err, bound = (y - ref).abs(), _bound(layer, x, grid8_cpp.block_of(layer))
    assert torch.all(err <= bound), float((err / bound).max())
    assert float(err.max()) > 0  # int16 activations ran, not the reference again


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [9, 130])
@pytest.mark.parametrize("scheme", ["q2_k", "q6_k", "q8_0", "q5_1", "int5-g48", "int8-asym", "int8-tensor"])
def test_gemm_is_the_reference_up_to_summation_order(lib, scheme, tokens, threads):
    layer = _layer(scheme, out=600)  # two or more tiles of rows
    x = torch.randn(2, tokens, layer.in_features, generator=torch.Generator().manual_seed(tokens))
    ref = _ref(layer, x)
    with torch_threads(threads):
        y = layer(x)
    assert layer._kernel.name == "grid8-cpp-gemm" and y.shape == ref.shape
    tol = 1e-5 * (x.abs() @ layer.qweight.dequantize(torch.float32).abs().T) + 1e-6
    assert torch.all((y - ref).abs() <= tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_come_back_in_their_dtype(lib, dtype):
    layer = _layer("q6_k")
    x = torch.randn(2, layer.in_features).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and layer._kernel.name == "grid8-cpp"
    ref = _ref(layer, x.float())
    assert float((y.float() - ref).abs().max()) <= 1e-2 * float(ref.abs().max())


@pytest.mark.parametrize("scheme", ["q6_k", "int5-g48"])
def test_huge_inf_and_nan_activations_as_in_the_reference(lib, scheme):
    layer = _layer(scheme)
    x = torch.randn(3, layer.in_features)
    x[1, 5], x[2, 700] = 3e4, -5e3  # huge: those columns in float32, the rest through the GEMV
    ref = _ref(layer, x)
    y = layer(x)
    assert layer._kernel.name == "grid8-cpp"
    assert float((y - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    x[0, 3] = float("nan")
    y = layer(x)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1:]).all()


def test_the_gemv_hands_over_to_the_gemm_above_8_tokens(lib):
    layer = _layer("q6_k")
    for tokens, want in ((1, "grid8-cpp"), (8, "grid8-cpp"), (9, "grid8-cpp-gemm"), (16, "grid8-cpp-gemm")):
        layer(torch.randn(tokens, layer.in_features))
        assert layer._kernel.name == want, tokens


@pytest.mark.parametrize("scheme", ["int4-g64", "q4_k", "int8", "iq4_nl", "nf4-g64", "fp8"])
def test_what_it_leaves_to_other_kernels(lib, scheme):
    layer = _layer(scheme, inp=512)
    names = [k.name for k in candidates(layer)]
    assert "grid8-cpp" not in names and "grid8-cpp-gemm" not in names


@pytest.mark.parametrize("scheme", ["q6_k", "q5_k"])  # without and with a minimum per block
def test_stacked_layers_hold_the_repack_once_and_equal_each_layer(lib, scheme):
    mods = [_layer(scheme, out=o, seed=o) for o in (64, 32, 48)]
    x = torch.randn(1, 768)
    each = torch.cat([m(x) for m in mods], -1)
    k, run = stacked(mods, 1)
    assert k.name == "grid8-cpp"
    assert torch.equal(run(x), each)  # the same rows, the same arithmetic
    ptrs = {m._kernel_state["grid8-cpp"][0].untyped_storage().data_ptr() for m in mods}
    assert len(ptrs) == 1
    assert torch.equal(torch.cat([m(x) for m in mods], -1), each)  # each layer still runs on its view


def test_only_layers_of_one_block_and_form_stack(lib):
    q6 = [_layer("q6_k", seed=s) for s in (1, 2)]
    assert stacked([q6[0], _layer("q3_k", seed=3)], 1) is not None  # 16 columns, no minimum: one GEMV
    assert stacked([q6[1], _layer("q2_k", seed=4)], 1) is None  # 16 columns, but q2_k has a minimum
    assert stacked([_layer("q6_k", seed=5), _layer("q8_0", seed=6)], 1) is None  # blocks of 16 and of 32


def test_a_q6_k_decoder_runs_one_call_layers_close_to_the_reference(lib):
    """A Llama stack quantized to q6_k decodes through lowbit's runtime in one C++ call per layer (kind 3),
    its logits within the int16 rounding of the reference (transformers' forward, dequantize kernel)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.runtime import Decoder

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                     tie_word_embeddings=False)).eval()
    q, _ = lowbit.quantize(m, None, scheme="q6_k", method="rtn", progress=False)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    dec = Decoder(q)
    dec.prefill(ids[:, :11])
    got = dec.step(ids[:, 11])
    assert dec.layers_native
    assert dec.kernels().get("grid8-cpp", 0) >= 4
    with use_kernels("reference"), torch.inference_mode():
        ref = q(input_ids=ids).logits[:, -1]
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum")
    assert float(kl) < 1e-6 and float((got - ref).abs().max()) < 1e-3 * float(ref.abs().max())
