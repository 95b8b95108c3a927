"""Hugging Face export (compressed-tensors pack-quantized): packing bit-exact against compressed-tensors, its
decompressor giving lowbit's dequantized weights, transformers loading the folder with lowbit's logits, ties,
layers written as float, refusals and atomic output; the real SmolLM2 (integration)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from safetensors import safe_open

import lowbit
from lowbit.errors import LowbitError
from lowbit.io.hf_export import CTScheme, export_hf, pack_int32, pack_quantized
from lowbit.model.qmodules import QLinear

pytestmark = pytest.mark.usefixtures("reference_kernels")  # exact comparisons with transformers' dequantization


def tensors_of(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def qconfig(path):
    return json.loads((path / "config.json").read_text())["quantization_config"]


def load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def assert_same_logits(a, b, vocab):
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x, y = a(ids).logits, b(ids).logits
    diff = (x - y).abs().max().item()
    assert diff <= 1e-5 * x.abs().max().item(), diff  # measured 0.0: the same float weights, the same ops
    return diff


# -- tensors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("cols", [32, 50, 7])
def test_pack_int32_is_compressed_tensors_layout(bits, cols):
    g = torch.Generator().manual_seed(bits * 100 + cols)
    codes = torch.randint(0, 1 << bits, (5, cols), generator=g, dtype=torch.uint8)
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)  # compressed-tensors' x_q
    assert torch.equal(pack_int32(codes, bits), pack_to_int32(signed, bits))
    assert torch.equal(pack_int32(codes.T.contiguous(), bits).T, pack_to_int32(signed, bits, packed_dim=0))


def test_pack_int32_refuses_widths_without_a_portable_layout():
    with pytest.raises(ValueError, match="not portable"):
        pack_int32(torch.zeros(2, 8, dtype=torch.uint8), 3)


@pytest.mark.parametrize(("scheme", "group_size", "cols"), [
    ("int4-g32", 32, 96), ("int4-g32-sym", 32, 96), ("int8", None, 96), ("int8-tensor", None, 98),
    ("int4-tensor-asym", None, 96), ("int4-ch", None, 100), ("int2-g16-sym", 16, 96), ("uint8-g16", 16, 96),
    ("int4-g40", 8, 96),  # groups of 40 are ragged in 96 columns: re-expressed as groups of 8
])
def test_compressed_tensors_decompresses_to_lowbit_weights(scheme, group_size, cols):
    w = torch.randn(24, cols, generator=torch.Generator().manual_seed(1))
    q = lowbit.quantize_tensor(w, scheme)
    parts = pack_quantized(q, group_size, torch.float32)
    ct = CTScheme(q.scheme.bits, q.scheme.symmetric, group_size)
    assert ("weight_zero_point" in parts) == (not ct.symmetric)
    assert parts["weight_packed"].dtype == torch.int32
    assert parts["weight_packed"].shape == (24, -(-cols * ct.bits // 32))
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**ct.args()), format="pack-quantized")
    back = PackedQuantizationCompressor.decompress(parts, ct_scheme)["weight"]
    assert torch.equal(back, q.dequantize())


# -- the folder, loaded by transformers ----------------------------------------------------------------------


@pytest.mark.parametrize(("scheme", "bits", "group_size", "symmetric"), [
    ("int4-g32", 4, 32, False), ("int4-g32-sym", 4, 32, True), ("int8", 8, None, True),
])
def test_transformers_loads_the_export_with_lowbit_logits(tmp_path, tiny_llama, scheme, bits, group_size, symmetric):
    model, tok = tiny_llama
    qmodel, _ = lowbit.quantize(model, tok, scheme=scheme, progress=False)
    out = tmp_path / "hf"
    report = lowbit.export_hf(qmodel, out, tokenizer=tok)

    qc = qconfig(out)
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    name = "model.layers.0.mlp.down_proj"  # (64, 128)
    groups = list(qc["config_groups"].values())
    body = next(g for g in groups if g["targets"] == ["Linear"] or name in g["targets"])
    assert {k: body["weights"][k] for k in ("num_bits", "group_size", "symmetric")} == {
        "num_bits": bits, "group_size": group_size, "symmetric": symmetric}
    # the int8 head: packed beside symmetric layers; float beside asymmetric ones (transformers takes one scheme)
    assert ("lm_head" in report.packed) == symmetric and len(groups) == (2 if symmetric and bits == 4 else 1)
    assert qc.get("dequantize", False) == (not symmetric) == report.dequantize_on_load
    assert ("lm_head" in qc["ignore"]) == (not symmetric) and "model.embed_tokens" in report.floated

    # really stored packed: int32 codes, no float weight for packed layers, far smaller than float32
    t = tensors_of(out)
    assert f"{name}.weight" not in t and t[f"{name}.weight_packed"].dtype == torch.int32
    assert t[f"{name}.weight_packed"].shape == (64, 128 * bits // 32)
    assert t[f"{name}.weight_shape"].tolist() == [64, 128]
    assert (f"{name}.weight_zero_point" in t) == (not symmetric)
    linear_numel = sum(m.qweight.numel for n, m in qmodel.named_modules() if n in report.packed)
    packed_bytes = sum(v.numel() * v.element_size() for k, v in t.items()
                       if k.rpartition(".")[0] in report.packed and not k.endswith("weight_shape"))
    assert packed_bytes * 8 / linear_numel == pytest.approx(report.packed_bpw)
    per_row = 128 // (group_size or 128)  # scales (float32) and zero-points per row of down_proj
    layer_bits = sum(t[f"{name}.{k}"].numel() * t[f"{name}.{k}"].element_size() * 8 for k in
                     ("weight_packed", "weight_scale", "weight_zero_point") if f"{name}.{k}" in t) / (64 * 128)
    assert layer_bits == bits + per_row * (32 + (0 if symmetric else bits)) / 128

    hf = load_hf(out)
    assert_same_logits(qmodel, hf, len(tok))
    for n in report.packed:  # decompressed on the first forward: lowbit's numbers exactly
        assert torch.equal(hf.get_submodule(n).weight, qmodel.get_submodule(n).qweight.dequantize())
    assert transformers.AutoTokenizer.from_pretrained(out)("a bridge").input_ids == tok("a bridge").input_ids


def tied_llama():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=384, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        return transformers.LlamaForCausalLM(cfg).eval()


def test_tied_head_is_written_once_and_stays_tied(tmp_path):
    model = tied_llama()
    qmodel, _ = lowbit.quantize(model, scheme="int4-g32-sym", progress=False)  # embeddings + head: one int8 QTensor
    assert qmodel.lm_head.qweight is qmodel.model.embed_tokens.qweight
    report = export_hf(qmodel, tmp_path / "hf")
    assert set(report.floated) == {"model.embed_tokens", "lm_head"} and "lm_head" in qconfig(tmp_path / "hf")["ignore"]
    assert "lm_head.weight" not in tensors_of(tmp_path / "hf")
    hf = load_hf(tmp_path / "hf")
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    assert_same_logits(qmodel, hf, 384)


def test_head_quantized_apart_from_its_tied_embedding_is_untied(tmp_path):
    qmodel, _ = lowbit.quantize(tied_llama(), scheme="int4-g32-sym", rules=["lm_head=int4-g32-sym"], progress=False)
    report = export_hf(qmodel, tmp_path / "hf")
    assert "lm_head" in report.packed
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    assert_same_logits(qmodel, load_hf(tmp_path / "hf"), 384)


def test_conv1d_layers_are_written_as_float_in_their_layout(tmp_path):
    cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=300, n_positions=64,
                                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = transformers.GPT2LMHeadModel(cfg).eval()
    qmodel, _ = lowbit.quantize(model, scheme="int4-g32-sym", progress=False)
    report = export_hf(qmodel, tmp_path / "hf")
    assert report.packed == ["lm_head"] and "transformer.h.0.attn.c_attn" in report.floated
    assert any("Conv1D" in w for w in report.warnings)
    assert_same_logits(qmodel, load_hf(tmp_path / "hf"), 300)


def test_bf16_model_is_exact_with_bf16_scales_and_warned_otherwise(tmp_path, tiny_llama):
    model, _ = tiny_llama
    model.to(torch.bfloat16)
    exact, _ = lowbit.quantize(model, scheme="int4-g32-sym-sbf16", rules=["lm_head=int8-sbf16"], progress=False)
    report = export_hf(exact, tmp_path / "exact")
    assert not any("scales in a bfloat16 model" in w for w in report.warnings)
    hf = load_hf(tmp_path / "exact")
    assert hf.dtype == torch.bfloat16
    with torch.no_grad():
        hf(torch.tensor([[1, 2, 3]]))  # decompresses
    for n in report.packed:
        assert torch.equal(hf.get_submodule(n).weight, exact.get_submodule(n).qweight.dequantize())
    fp16_scales, _ = lowbit.quantize(model, scheme="int4-g32-sym", progress=False)
    report = export_hf(fp16_scales, tmp_path / "warned")
    assert any(w.startswith("float16 scales in a bfloat16 model") for w in report.warnings)


# -- what cannot be packed, bad input ------------------------------------------------------------------------


def test_unpackable_linear_layers_are_float_with_a_warning_or_refused_when_strict(tmp_path, tiny_llama):
    model, _ = tiny_llama
    qmodel, _ = lowbit.quantize(model, scheme="int4-g32-sym", rules=["mlp.down_proj=int3-g32"], progress=False)
    report = export_hf(qmodel, tmp_path / "hf")
    assert "model.layers.1.mlp.down_proj" in report.floated and "model.layers.1.mlp.up_proj" in report.packed
    assert any("int3-g32 written as float" in w and "down_proj" in w for w in report.warnings)
    assert "model.layers.0.mlp.down_proj" in qconfig(tmp_path / "hf")["ignore"]
    assert tensors_of(tmp_path / "hf")["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
    assert_same_logits(qmodel, load_hf(tmp_path / "hf"), 384)

    with pytest.raises(LowbitError, match=r"layer model\.layers\.0\.mlp\.down_proj: int3-g32 cannot be stored"):
        export_hf(qmodel, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()


def test_mixed_symmetric_schemes_load_as_separate_groups(tmp_path, tiny_llama):
    model, _ = tiny_llama
    qmodel, _ = lowbit.quantize(model, scheme="int4-g32-sym", rules=["mlp.down_proj=int8"], progress=False)
    report = export_hf(qmodel, tmp_path / "hf")
    groups = qconfig(tmp_path / "hf")["config_groups"]
    assert len(groups) == 2 and not report.dequantize_on_load  # int4-g32-sym, int8 (with the head)
    assert any("model.layers.1.mlp.down_proj" in g["targets"] for g in groups.values())
    assert_same_logits(qmodel, load_hf(tmp_path / "hf"), 384)


def test_refusals_and_atomic_output(tmp_path, tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(LowbitError, match="no lowbit-quantized layers"):
        export_hf(model, tmp_path / "float")
    sq, _ = lowbit.quantize(model, tok, scheme="int8", method="smoothquant", calib=torch.randint(0, 384, (2, 32)),
                            progress=False)
    with pytest.raises(LowbitError, match="quantizes its activations .*weight-only"):
        export_hf(sq, tmp_path / "w8a8")
    int3, _ = lowbit.quantize(model, scheme="int3-g32", keep=["lm_head"], progress=False)
    with pytest.raises(LowbitError, match="no layer of this model can be stored.*3-bit codes"):
        export_hf(int3, tmp_path / "int3")

    qmodel, _ = lowbit.quantize(model, scheme="int4-g32-sym", progress=False)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LowbitError, match="already exists"):
        export_hf(qmodel, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export_hf(qmodel, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folders left behind


# -- the real model --------------------------------------------------------------------------------------


def test_smollm2_rtn_int4_g64_export_matches_in_transformers(tmp_path, smollm2_dir):
    model, tok = lowbit.load(smollm2_dir)
    qmodel, _ = lowbit.quantize(model, tok, scheme="int4-g64", inplace=True, progress=False)  # 576 = 9 x 64
    report = export_hf(qmodel, tmp_path / "hf", tokenizer=tok)
    assert len(report.packed) == 30 * 7 and set(report.floated) == {"model.embed_tokens", "lm_head"}  # tied, int8
    assert report.packed_bpw == pytest.approx(4 + 32 / 64 + 4 / 64)  # float32 scales: exact in a float32 model
    hf = load_hf(tmp_path / "hf")
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = qmodel(ids).logits, hf(ids).logits
    assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()
    assert all(isinstance(qmodel.get_submodule(n), QLinear) for n in report.packed)
