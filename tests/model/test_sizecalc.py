import json
from collections import Counter

import pytest

from lowbit.errors import LowbitError
from lowbit.model.sizecalc import (
    SizeError,
    TensorShape,
    format_report,
    gguf_tensor_type,
    kv_cache_bytes,
    model_shape,
    model_task,
    scheme_nbytes,
    size_report,
    size_table,
)

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def llama7b(tmp_path_factory):
    p = tmp_path_factory.mktemp("configs") / "Llama-2-7b-hf" / "config.json"
    p.parent.mkdir()
    p.write_text(json.dumps(LLAMA2_7B))
    return model_shape(p)


def test_llama2_7b_parameter_counts(llama7b):
    assert llama7b.params() == 6_738_415_616
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008
    assert llama7b.params("linear") == 32 * per_layer == 6_476_005_376
    assert llama7b.params("embedding") == llama7b.params("head") == 32000 * 4096
    assert llama7b.params("other") == 65 * 4096  # 2 norms per block + the final norm
    assert not llama7b.tied and llama7b.task == "causal-lm" and llama7b.name == "Llama-2-7b-hf"
    assert (llama7b.num_layers, llama7b.num_kv_heads, llama7b.head_dim) == (32, 32, 128)


def test_llama2_7b_size_table(llama7b):
    rows = {r.format: r for r in size_table(llama7b)}
    n, emb = 6_738_415_616, 2 * 32000 * 4096  # embedding + untied head
    norms = 65 * 4096
    assert rows["fp32"].weight_bytes == 4 * n == 26_953_662_464  # ≈ 26.95 GB
    assert rows["bf16"].weight_bytes == 2 * n
    # linear layers: one fp16 scale per output row; embeddings/head the same; norms 16-bit
    rows_out = 32 * (4 * 4096 + 2 * 11008 + 4096)  # output rows of q,k,v,o, gate,up, down per block
    int8 = 6_476_005_376 + 2 * rows_out + emb + 2 * 2 * 32000 + 2 * norms
    assert rows["int8"].weight_bytes == int8 == 6_741_529_600  # ≈ 6.7 GB
    # int4-g128: 4-bit codes + per 128 weights an fp16 scale and a 4-bit zero; embeddings/head at int8
    int4 = 6_476_005_376 * (4 + (16 + 4) / 128) / 8 + emb + 2 * 2 * 32000 + 2 * norms
    assert rows["int4-g128"].weight_bytes == int4 == 3_627_291_648
    assert 3.5e9 < rows["int4-g128"].weight_bytes < 3.9e9
    assert rows["int4-g128"].linear_bpw == 4 + 20 / 128
    # llama.cpp's Q4_K_M of Llama-2-7B is a 4.08 GB file
    assert rows["Q4_K_M"].weight_bytes == 4_080_263_168
    kv = 2 * 32 * 32 * 128 * 4096 * 2
    assert kv == kv_cache_bytes(llama7b) == 2_147_483_648
    assert all(r.runtime_bytes - r.weight_bytes == kv for r in rows.values())
    assert [r.format for r in size_table(llama7b, ["int2-g64"], context=1024)] == ["int2-g64"]
    assert size_table(llama7b, ["bf16"], context=1024)[0].runtime_bytes == 2 * n + kv // 4


def test_smollm2_config_tied():
    s = model_shape(SMOLLM2)
    assert s.params() == 134_515_008  # 134.5 M: the tied head is counted once
    assert s.tied and s.params("head") == 0 and s.params("embedding") == 49152 * 576
    emb = next(t for t in s.tensors if t.role == "embedding")
    assert emb.is_head  # tied to the output: llama.cpp gives it the output's type
    rows = {r.format: r for r in size_table(s, ["int4-g128", "Q4_K_M"])}
    # 576 is not a multiple of 128: 5 groups per row, the last one ragged
    assert scheme_nbytes("int4-g128", (1536, 576)) == 1536 * 576 // 2 + 1536 * 5 * 2 + 1536 * 5 // 2
    # per block: q, k, v, o, gate, up read rows of 576 (5 groups); down reads 1536 (12 whole groups)
    ragged_rows, down_rows = 576 + 192 + 192 + 576 + 1536 + 1536, 576
    weights = 576 * ragged_rows + 1536 * down_rows
    bits = 4 * weights + 20 * (5 * ragged_rows + 12 * down_rows)
    assert rows["int4-g128"].linear_bpw == pytest.approx(bits / weights, rel=1e-12)
    assert kv_cache_bytes(s, 4096) == 2 * 30 * 3 * 64 * 4096 * 2


def test_q4_k_m_types_follow_llama_cpp():
    s = model_shape(SMOLLM2)
    types = Counter(gguf_tensor_type("Q4_K_M", t, s.num_layers) for t in s.tensors)
    # rows of 576 do not hold 256-blocks: Q4_K -> Q5_0, Q6_K -> Q8_0; ffn_down (1536 wide) keeps K-quants
    assert types == {"Q5_0": 166, "F32": 61, "Q4_K": 16, "Q8_0": 15, "Q6_K": 14}
    # use_more_bits: the first and last eighth of the layers, and every third one between
    t = TensorShape("model.layers.5.mlp.down_proj.weight", (4096, 11008), "linear")
    assert [gguf_tensor_type("Q4_K_M", t, n) for n in (32, 6)] == ["Q4_K", "Q6_K"]


def test_encoder_and_gpt2_roles(tmp_path, tiny_bert):
    from transformers import GPT2Config

    model, _ = tiny_bert
    model.save_pretrained(tmp_path)
    s = model_shape(tmp_path)
    assert s.task == "encoder" and kv_cache_bytes(s) == 0
    assert s.params() == sum(p.numel() for p in model.parameters())
    assert all(r.runtime_bytes == r.weight_bytes for r in size_table(s, ["int8"]))
    g = model_shape(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=128))
    shapes = {t.name: t.shape for t in g.tensors if t.role == "linear"}
    assert shapes["transformer.h.0.attn.c_attn.weight"] == (192, 64)  # Conv1D stored (in, out): read as (out, in)
    assert g.tied and g.params("embedding") == 300 * 64 + 128 * 64


def test_model_task_table():
    from transformers import BertConfig, LlamaConfig

    assert model_task(LlamaConfig()) == "causal-lm"
    assert model_task(BertConfig()) == "encoder"  # no architectures: bert is an encoder type
    assert model_task(BertConfig(architectures=["BertForMaskedLM"])) == "masked-lm"
    assert model_task(LlamaConfig(architectures=["LlamaForSequenceClassification"])) == "sequence-classification"


def test_report_and_format(llama7b):
    rep = size_report(llama7b, context=4096)
    text = format_report(rep)
    assert text.splitlines()[0] == "Llama-2-7b-hf · llama · 6.74 B parameters (6.48 B in linear layers)"
    assert "26.95 GB" in text and "Q4_K_M" in text and "This machine" in text
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["params"] == 6_738_415_616 and d["rows"][0]["format"] == "fp32"
    small = rep.__class__(**{**rep.__dict__, "machine_ram_bytes": 5_100_000_000})
    assert small.largest_fitting().format == "int3-g64"  # int3-g64 needs 5.08 GB with its KV cache, int4-g128 5.77
    assert rep.__class__(**{**rep.__dict__, "machine_ram_bytes": 10}).largest_fitting() is None


def test_bad_inputs(tmp_path):
    with pytest.raises(SizeError, match="nope.json: no such file"):
        model_shape(tmp_path / "nope.json")
    (tmp_path / "config.json").write_text('{"hidden_size": 4}')
    with pytest.raises(SizeError, match="config.json: not a transformers config"):
        model_shape(tmp_path / "config.json")
    (tmp_path / "config.json").unlink()
    with pytest.raises(SizeError, match="no config.json"):
        model_shape(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(SizeError, match="unknown file type"):
        model_shape(tmp_path / "w.bin")
    with pytest.raises(SizeError, match="model_type"):
        model_shape({"hidden_size": 4})
    with pytest.raises(SizeError, match="no-such-org/no-such-model"):
        model_shape("no-such-org/no-such-model")  # offline: the hub cannot answer
    with pytest.raises(LowbitError, match="int5-g33x"):
        size_table(SMOLLM2, ["int5-g33x"])
    with pytest.raises(SizeError, match="context"):
        size_report(SMOLLM2, context=0)


@pytest.mark.integration
def test_smollm2_gguf_metadata_matches_its_tensors():
    from lowbit.cli.assets import smollm2_gguf
    from lowbit.io.inspect import inspect_path, summarize

    s = model_shape(smollm2_gguf())
    assert s.params() == summarize(inspect_path(smollm2_gguf()))[0] == 134_515_008
    assert s.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and s.tied


@pytest.mark.integration
def test_q4_k_m_matches_llama_cpp_quantize(tmp_path):
    from lowbit.cli.assets import smollm2_gguf
    from lowbit.io.gguf import llamacpp  # llama.cpp (a test dependency) in a child process
    from lowbit.io.inspect import inspect_path, summarize

    out = tmp_path / "q4km.gguf"
    llamacpp.quantize(smollm2_gguf(), out, "Q4_K_M")
    rows = inspect_path(out)
    predicted = {r.format: r for r in size_table(SMOLLM2, ["Q4_K_M"])}["Q4_K_M"]
    assert predicted.weight_bytes == summarize(rows)[1] == 103_668_480
