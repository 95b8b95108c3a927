"""Quantized layers as ordinary torch modules: parts in the state dict, exact reloads, moves that keep dtypes."""

import pytest
import torch
from safetensors import safe_open
from torch import nn

import lowbit
from lowbit.kernels import use_kernels
from lowbit.model.plan import Plan, Rule
from lowbit.model.qmodules import QPARTS, QEmbedding, QLinear, QModule
from lowbit.model.quantize import quantize_model
from tests.model.families import build, random_ids


def _layer(scheme="int4-g32", seed=0, out=48, inp=64):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(out, inp, generator=g), torch.randn(out, generator=g)
    return QLinear(lowbit.quantize_tensor(w, scheme), b)


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-g32-sym", "int8", "fp8", "nf4-g32"])
def test_state_dict_holds_the_parts_that_exist(scheme):
    layer = _layer(scheme)
    q = layer.qweight
    want = {f"qweight_{p}" for p in QPARTS if getattr(q, p) is not None} | {"bias"}
    sd = layer.state_dict()
    assert set(sd) == want
    for p in QPARTS:
        if getattr(q, p) is not None:
            assert layer.state_dict(keep_vars=True)[f"qweight_{p}"] is getattr(q, p)  # the QTensor's own tensors


def test_static_activation_scales_are_buffers():
    layer = _layer("int8-sym")
    layer.act_scheme, layer.act_scale = "int8-static", torch.tensor(0.02)
    layer.input_scale = torch.rand(64) + 0.5
    assert {"act_scale", "input_scale"} <= set(layer.state_dict())


@pytest.mark.parametrize("scheme", ["int4-g32", "int3-g16", "nf4-g32", "fp8"])
def test_load_state_dict_round_trip_is_bit_exact(scheme):
    a, b = _layer(scheme, seed=0), _layer(scheme, seed=1)
    x = torch.randn(5, 64)
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict(), strict=True)
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    assert torch.equal(b.qweight.dequantize(), a.qweight.dequantize())
    assert torch.equal(b(x), a(x))


def test_load_state_dict_refuses_a_cast():
    a, b = _layer(), _layer(seed=1)
    sd = a.state_dict()
    sd["qweight_scales"] = sd["qweight_scales"].float()
    with pytest.raises(RuntimeError, match="qweight_scales.*never cast"):
        b.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="qweight_zeros"):  # a part the state dict lacks
        b.load_state_dict({k: v for k, v in a.state_dict().items() if k != "qweight_zeros"})


def test_int8_kernel_repacks_after_load_state_dict():
    """The bug: the int8×int8 kernel kept the weight it had packed before load_state_dict."""
    a, b = _layer("int8-sym", seed=0), _layer("int8-sym", seed=1)
    for m in (a, b):
        m.act_scheme = "int8-dynamic"
    x = torch.randn(7, 64)
    want = a(x)
    b(x)
    k = b._kernel.name  # lowbit's C++ W8A8 GEMV where it is built, else torch._int_mm
    assert k in ("int8-int8", "int8-int8-cpp") and k in b._kernel_state
    b.load_state_dict(a.state_dict())
    assert not b._kernel_state and b._kernel is None
    assert torch.equal(b(x), want)


def test_caches_dropped_after_load_state_dict_and_moves():
    a, b = _layer(seed=0), _layer(seed=1)
    x = torch.randn(3, 64)
    b.cache_weight()
    b(x)
    assert b.weight_cache is not None and b._kernel.name == "cached-weight"
    b.load_state_dict(a.state_dict())
    assert b.weight_cache is None and b._kernel is None
    assert torch.equal(b(x), a(x))
    for move in (lambda m: m.to("cpu"), lambda m: m.to(torch.float32), lambda m: m.to("meta")):
        b.cache_weight()
        b(x)
        move(b)
        assert b.weight_cache is None and b._kernel is None and not b._kernel_state


def test_bfloat16_keeps_stored_dtypes_and_computes_in_bf16():
    layer = _layer("int4-g32")
    stored = {k: (v.dtype, v.clone()) for k, v in layer.state_dict().items() if k.startswith("qweight_")}
    layer.to(torch.bfloat16)
    for k, (dt, v) in stored.items():
        assert getattr(layer, k).dtype == dt and torch.equal(getattr(layer, k), v), k
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16  # the fast kernel
    with use_kernels("reference"):
        y = layer(x)
    assert torch.equal(y, nn.functional.linear(x, layer.qweight.dequantize(torch.bfloat16), layer.bias))

    q = lowbit.quantize_tensor(torch.randn(100, 64), "int4-g32")
    emb = QEmbedding(q).half()
    assert emb.qweight_codes.dtype == torch.uint8 and emb.qweight_scales.dtype == q.scales.dtype
    ids = torch.tensor([[3, 99, 3, 0]])
    rows = emb(ids)
    assert rows.dtype == torch.float16
    assert torch.equal(rows, nn.functional.embedding(ids, q.dequantize(torch.float16)))
    emb.float()
    assert emb(ids).dtype == torch.float32


def test_shared_qtensor_moves_as_one():
    """A move torch can make in place (cpu <-> cuda; here a copy on the CPU stands in for it) keeps a QTensor
    two layers share as one tensor, as torch keeps tied parameters."""
    moved: set[int] = set()

    def fake_move(t):  # like t.to(device): a tensor already there comes back as itself
        if t.numel() and t.data_ptr() in moved:
            return t
        new = t.clone()
        moved.add(new.data_ptr())
        return new

    q = lowbit.quantize_tensor(torch.randn(100, 64), "int4-g32")
    emb, head = QEmbedding(q), QLinear(q)
    old = emb.qweight_codes.data  # keeps the old storage alive, so its address is not reused
    nn.ModuleList([emb, head])._apply(fake_move)
    assert emb.qweight_codes.data_ptr() != old.data_ptr() and emb.qweight_codes.data_ptr() in moved
    assert head.qweight is emb.qweight
    assert all(getattr(head, f"qweight_{p}") is getattr(emb, f"qweight_{p}") for p in QPARTS)


@pytest.fixture
def quantized_llama():
    model = build("llama")  # a tiny LlamaForCausalLM, tied head
    quantize_model(model, Plan((Rule("*", "int4-g32"),)), progress=False)
    assert model.lm_head.qweight is model.model.embed_tokens.qweight
    return model


def _structure(model):
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def test_tiny_model_to_meta_and_back(quantized_llama):
    model = quantized_llama
    ids = random_ids()
    with torch.no_grad():
        want = model(ids).logits
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    # with the non-persistent ones (rotary); under every name: meta unties the head, as torch unties parameters
    buffers = {k: v.clone() for k, v in model.named_buffers(remove_duplicate=False)}
    structure = _structure(model)
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QModule)}
    assert len(qmods) == 16 and all(f"{n}.qweight_codes" in sd for n in qmods)

    model.to("meta")
    for n, m in qmods.items():
        parts = [t for t in (m.qweight.codes, m.qweight.scales, m.qweight.zeros) if t is not None]
        assert parts and all(t.is_meta for t in parts), n
        assert all(t.is_meta for t in m.state_dict().values()), n
    assert all(t.is_meta for t in model.state_dict().values())
    assert _structure(model) == structure

    model.to_empty(device="cpu")
    assert _structure(model) == structure and not any(t.is_meta for t in model.state_dict().values())
    model.to("cpu")
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        for k, b in model.named_buffers(remove_duplicate=False):
            b.copy_(buffers[k])
        assert torch.equal(model(ids).logits, want)


def test_tiny_model_in_bfloat16(quantized_llama):
    model = quantized_llama
    ids = random_ids()
    with torch.no_grad():
        ref = model(ids).logits
    codes = {n: m.qweight_codes.clone() for n, m in model.named_modules() if isinstance(m, QModule)}
    model.to(torch.bfloat16)
    with torch.no_grad():
        got = model(ids).logits
    assert got.dtype == torch.bfloat16
    for n, c in codes.items():
        assert torch.equal(model.get_submodule(n).qweight_codes, c)
    cos = nn.functional.cosine_similarity(got.float().flatten(), ref.flatten(), dim=0)
    assert cos > 0.99


def test_saved_file_holds_no_buffer_copies(quantized_llama, tmp_path):
    model = quantized_llama
    lowbit.save(model, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not [k for k in keys if ".qweight_" in k]
    assert "model.layers.0.mlp.up_proj.weight.codes" in keys
    back, _ = lowbit.load(tmp_path / "q")
    sd, sd_back = model.state_dict(), back.state_dict()
    assert set(sd) == set(sd_back)
    assert all(torch.equal(sd[k], sd_back[k]) for k in sd)
