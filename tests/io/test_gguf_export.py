"""GGUF export: architectures and tokenizer as llama.cpp reads them, llama.cpp's type mixes, fallbacks,
streaming from safetensors, quantized/Plan-driven types, GPTQ on block grids, atomic output, and the real
SmolLM2 running in llama.cpp (integration)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.io.gguf.export import export_gguf
from lowbit.io.gguf.mixes import ModelFacts, choose_type, type_for_scheme, use_more_bits
from lowbit.io.gguf.source import load_gguf_into, read_gguf_weights
from lowbit.io.inspect import read_gguf_index
from lowbit.layouts.ggml import BLOCK_TYPES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402

# llama.cpp itself (llama-cpp-python, a test dependency), each call in a child process: a crash there is
# one failed test naming the file and the signal
from lowbit.io.gguf import llamacpp  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style) of 264 tokens: 3 specials, 256 bytes, 5 merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>", chat_template=CHAT)


def tiny_model(kind: str = "llama", hidden: int = 64, layers: int = 2, heads: int = 4, kv: int = 2,
               inter: int = 128, tie: bool = True, seed: int = 0, **extra):
    """A random decoder of the given family, scaled so its next-token distributions are far from uniform."""
    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[kind]
    cfg = getattr(transformers, f"{cls}Config")(
        vocab_size=272, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, initializer_range=0.15, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{cls}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def torch_logprobs(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()


def mean_kl(p: np.ndarray, q: np.ndarray) -> float:
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def gguf_types(path: Path) -> dict[str, str]:
    return {t.name: t.type_name for t in read_gguf_index(path).tensors}


# -- architectures ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "llama+bias", "mistral", "qwen2", "qwen3"])
def test_f32_export_runs_identically_in_llama_cpp(kind, tmp_path):
    kind, bias = kind.removesuffix("+bias"), kind.endswith("+bias")
    model, tok = tiny_model(kind, attention_bias=bias), tiny_tokenizer()
    out = tmp_path / f"{kind}.gguf"
    report = export_gguf(model, tok, out, "F32", progress=False)
    assert out.is_file() and report.file_bytes == out.stat().st_size
    meta = read_gguf_index(out).metadata
    assert meta["general.architecture"] == ("llama" if kind == "mistral" else kind)
    ids = tok("the cat sat in the hat, then the end", add_special_tokens=False)["input_ids"]
    kl = mean_kl(torch_logprobs(model, ids), llamacpp.logprobs(out, ids))
    assert kl < 1e-5, kl  # Q/K permutation, biases, q/k norms, rope, eps: all as llama.cpp computes them


def test_tokenizer_metadata_and_tokenization(tmp_path):
    model, tok = tiny_model(), tiny_tokenizer()
    out = tmp_path / "tok.gguf"
    export_gguf(model, tok, out, "Q8_0", progress=False)
    meta = read_gguf_index(out).metadata
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.chat_template"] == CHAT
    from gguf import GGUFReader

    r = GGUFReader(out)
    f = r.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(f.parts[i]).decode() for i in f.data]
    types = [int(r.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in r.fields["tokenizer.ggml.token_type"].data]
    assert len(tokens) == 272 and tokens[:3] == SPECIALS and tokens[-1] == "[PAD271]"
    assert types[:3] == [3, 3, 3] and types[100] == 1 and types[-1] == 5  # control, normal, unused
    text = "the thin cat at the inn"
    assert llamacpp.tokenize(out, text, special=True) == tok(text, add_special_tokens=False)["input_ids"]
    assert llamacpp.tokenize(out, "<|im_start|>", special=True) == [1]


def spm_tokenizer():
    """SentencePiece-style BPE with byte fallback (the Llama 2 / Mistral layout), 276 tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for t in ["▁", "t", "h", "e", "a", "c", "n", "i", "s", "▁t", "he", "▁the", "▁c", "at", "▁cat", "in", "▁a"]:
        vocab[t] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "c"), ("a", "t"), ("▁c", "at"), ("i", "n"), ("▁", "a")]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_tokenizer(tmp_path):
    model, tok = tiny_model("mistral"), spm_tokenizer()  # 272 embedding rows, 276 tokens: padded to the larger
    model.resize_token_embeddings(280, mean_resizing=False)
    out = tmp_path / "spm.gguf"
    export_gguf(model, tok, out, "F32", progress=False)
    meta = read_gguf_index(out).metadata
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.tokens"] == {"array_length": 280}
    for text in ("the cat sat in a hat", "xyz é 1"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert llamacpp.tokenize(out, text) == ids  # byte fallback included
    assert mean_kl(torch_logprobs(model, ids), llamacpp.logprobs(out, ids)) < 1e-5


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    with pytest.raises(LowbitError, match=r"architecture 'bert'.*supported: llama, mistral, qwen2, qwen3"):
        export_gguf(transformers.BertModel(cfg), None, tmp_path / "x.gguf", "Q8_0")
    with pytest.raises(LowbitError, match="needs the model's tokenizer"):
        export_gguf(tiny_model(), None, tmp_path / "x.gguf", "Q8_0")
    with pytest.raises(LowbitError, match="unknown method 'nope'"):
        export_gguf(tiny_model(), tiny_tokenizer(), tmp_path / "x.gguf", "Q8_0", method="nope")
    with pytest.raises(LowbitError, match="method 'awq' needs calibration data"):
        export_gguf(tiny_model(), tiny_tokenizer(), tmp_path / "x.gguf", "Q8_0", method="awq")
    assert not list(tmp_path.iterdir())


# -- types: llama.cpp's mixes and fallbacks ------------------------------------------------------------
MIX_NAMES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q4_0",
             "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16"]


@pytest.mark.parametrize("hidden,tie", [(256, False), (96, True)])
def test_mix_types_match_llama_quantize(hidden, tie, tmp_path):
    # 16 layers exercise every layer rule (n/16, n/8, use_more_bits); 4 q heads on 1 kv head is GQA 4;
    # hidden 96 makes every 256-wide type fall back (and 96 % 32 == 0, so nothing needs F16)
    model = tiny_model(hidden=hidden, layers=16, heads=4, kv=1, inter=256, tie=tie)
    tok = tiny_tokenizer()
    f32 = tmp_path / "f32.gguf"
    export_gguf(model, tok, f32, "F32", progress=False)
    facts = ModelFacts(16, 4, 1, tie)
    for mix in MIX_NAMES:
        dst = tmp_path / f"{mix}.gguf"
        llamacpp.quantize(f32, dst, mix)
        theirs = gguf_types(dst)
        ours = {t.name: choose_type(t.name, t.shape, mix, facts).ggml for t in read_gguf_index(f32).tensors}
        assert ours == theirs, (mix, {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]})
        dst.unlink()


def test_fallbacks_are_reported(tmp_path):
    model, tok = tiny_model(hidden=80, heads=5, kv=1, inter=160), tiny_tokenizer()  # 80 % 32 != 0
    report = export_gguf(model, tok, tmp_path / "fb.gguf", "Q4_K_M", progress=False)
    q = next(t for t in report.tensors if t.name == "blk.0.attn_q.weight")
    assert (q.requested, q.ggml) == ("Q4_K", "F16") and "80" in q.note
    down = next(t for t in report.tensors if t.name == "blk.0.ffn_down.weight")  # rows of 160: Q5_0 fits
    assert down.ggml == "Q5_0" and "Q5_0 instead" in down.note
    assert len(report.warnings) == 1 and "fell back as llama.cpp does" in report.warnings[0]
    assert report.fallbacks and all(t.note for t in report.fallbacks)


def test_mix_rules_table():
    f = ModelFacts(n_layer=32, n_head=32, n_head_kv=8)
    assert choose_type("blk.0.attn_v.weight", (1024, 4096), "Q4_K_M", f).ggml == "Q6_K"
    assert choose_type("blk.5.attn_v.weight", (1024, 4096), "Q4_K_M", f).ggml == "Q4_K"
    assert choose_type("blk.6.ffn_down.weight", (4096, 11008), "Q4_K_M", f).ggml == "Q6_K"  # (6-4)%3 == 2
    assert choose_type("blk.1.attn_v.weight", (1024, 4096), "Q2_K", f).ggml == "Q4_K"  # GQA 4
    assert choose_type("output.weight", (32000, 4096), "Q4_0", f).ggml == "Q6_K"
    assert choose_type("output.weight", (32000, 4096), "Q8_0", f).ggml == "Q8_0"
    assert choose_type("blk.0.attn_norm.weight", (4096,), "Q4_K_M", f).ggml == "F32"
    assert choose_type("blk.0.attn_q.weight", (4096, 4096), "Q4_K_M", f, pure=True).ggml == "Q4_K"
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29,
                                                                30, 31]
    with pytest.raises(LowbitError, match="unknown GGUF type 'Q7_X'"):
        choose_type("blk.0.attn_q.weight", (64, 64), "Q7_X", f)


def test_scheme_to_type():
    from lowbit.core.scheme import parse_scheme

    assert type_for_scheme(parse_scheme("int4-g32-sym")) == ("Q4_0", "")
    assert type_for_scheme(parse_scheme("int4-g32")) == ("Q4_1", "")
    assert type_for_scheme(parse_scheme("int5-g64"))[0] == "Q5_K"
    assert type_for_scheme(parse_scheme("int3-g64"))[0] == "Q3_K"
    assert type_for_scheme(parse_scheme("bf16")) == ("BF16", "")
    assert type_for_scheme(None) == ("F32", "")


# -- sources: quantized models, Plans, safetensors folders --------------------------------------------
def test_quantized_model_exports_its_own_grid(tmp_path):
    import lowbit

    model, tok = tiny_model(hidden=64, inter=128), tiny_tokenizer()
    qmodel, _ = lowbit.quantize(model, tok, scheme="int4-g32-sym", method="rtn")
    out = tmp_path / "q.gguf"
    report = export_gguf(qmodel, tok, out, type=None, progress=False)
    types = gguf_types(out)
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.1.ffn_down.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "Q8_0"  # lowbit keeps embeddings at int8 by default
    assert report.mix == "schemes" and read_gguf_index(out).metadata["general.file_type"] == 2  # MOSTLY_Q4_0
    w = read_gguf_weights(out)
    from lowbit.io.gguf.writer import unpermute_qk

    got = unpermute_qk(w["blk.0.attn_q.weight"], 4)
    want = qmodel.get_submodule("model.layers.0.self_attn.q_proj").qweight.dequantize(torch.float32)
    assert torch.equal(got, want)  # re-packed without loss
    ids = tok("the thin cat", add_special_tokens=False)["input_ids"]
    assert mean_kl(torch_logprobs(qmodel, ids), llamacpp.logprobs(out, ids)) < 2e-3  # llama.cpp: int8 activations


def test_plan_picks_per_layer_types(tmp_path):
    from lowbit.model.plan import Plan, Rule

    model, tok = tiny_model(hidden=64), tiny_tokenizer()
    plan = Plan((Rule("*", "int4-g32"), Rule("mlp.down_proj", "int8"), Rule("model.embed_tokens", None)))
    report = export_gguf(model, tok, tmp_path / "p.gguf", plan=plan, progress=False)
    types = {t.name: t.ggml for t in report.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["token_embd.weight"] == "F32" and report.mix == "plan"
    note = next(t.note for t in report.tensors if t.name == "blk.1.ffn_down.weight")
    assert "no GGML twin" in note


def test_streams_from_a_safetensors_folder(tmp_path):
    model, tok = tiny_model(tie=False), tiny_tokenizer()
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    export_gguf(model, tok, a, "Q4_K_M", progress=False, name="tiny")
    report = export_gguf(folder, None, b, "Q4_K_M", progress=False, name="tiny")
    assert a.read_bytes() == b.read_bytes()
    assert "output.weight" in gguf_types(b) and report.tensors


def test_failed_export_leaves_nothing(tmp_path):
    from lowbit.methods.registry import LayerStats

    model, tok = tiny_model(), tiny_tokenizer()
    out = tmp_path / "broken.gguf"
    out.write_bytes(b"old")
    bad = {"model.layers.1.mlp.down_proj": LayerStats(xtx=torch.eye(3), sq_mean=torch.ones(3), tokens=10)}
    with pytest.raises(LowbitError, match="gptq"):
        export_gguf(model, tok, out, "Q4_0", stats=bad, method="gptq", progress=False)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]


# -- GPTQ on block grids ------------------------------------------------------------------------------
def test_gptq_blocks_beats_search_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(256, 256, generator=g) / 16
    x = torch.randn(2048, 256, generator=g) @ (torch.eye(256) + mix)  # correlated inputs
    w = torch.randn(32, 256, generator=g) * 0.05
    xtx = x.T @ x
    from lowbit.core.scheme import parse_scheme
    from lowbit.methods.gptq import gptq_quantize

    for name in ("Q4_0", "Q4_K", "Q3_K", "IQ4_NL", "IQ4_XS"):
        bt = BLOCK_TYPES[name]
        q, w_hat, info = gptq_quantize(w, xtx, 2048, parse_scheme(name.lower()))  # the one GPTQ sweep
        data = q.codes.reshape(-1, bt.type_size)
        assert torch.equal(bt.dequantize(data).reshape(w.shape), w_hat) and not info["act_order"]
        imp = (xtx.diagonal() / 2048).expand(32, 256).reshape(-1, bt.block_size)
        search = bt.dequantize(bt.encode(w.reshape(-1, bt.block_size), imp)).reshape(w.shape)

        def loss(wh):
            d = w - wh
            return float(((d @ xtx) * d).sum())

        assert loss(w_hat) < 0.9 * loss(search), name


def test_gptq_export_with_calibration(tmp_path):
    model, tok = tiny_model(hidden=64, inter=256, layers=2), tiny_tokenizer()
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(3, 264, (4, 32), generator=g)
    report = export_gguf(model, tok, tmp_path / "g.gguf", "Q4_0", calib=windows, method="gptq", progress=False)
    methods = {t.name: t.method for t in report.tensors}
    assert methods["blk.0.attn_q.weight"] == "gptq" and methods["blk.1.ffn_down.weight"] == "gptq"
    assert methods["token_embd.weight"] == "search"  # outside the blocks: data-free
    imp = export_gguf(model, tok, tmp_path / "i.gguf", "Q4_0", calib=windows, method="rtn", progress=False)
    assert {t.name: t.method for t in imp.tensors}["blk.0.attn_q.weight"] == "search+imatrix"
    default = export_gguf(model, tok, tmp_path / "d.gguf", "Q4_0", calib=windows, progress=False)
    assert default.method == "awq+gptq"  # with calibration text, the best measured method is the default
    explicit = export_gguf(model, tok, tmp_path / "a.gguf", "Q4_0", calib=windows, method="awq+gptq", progress=False)
    assert explicit.method == "awq+gptq"
    assert (tmp_path / "d.gguf").read_bytes() == (tmp_path / "a.gguf").read_bytes()
    for f in ("g.gguf", "i.gguf"):  # both load and run in llama.cpp
        assert np.isfinite(llamacpp.logprobs(tmp_path / f, [5, 6, 7])).all()


# -- one system: quantize to a llama.cpp mix in lowbit, evaluate, export the blocks unchanged --------------
@pytest.mark.parametrize("method", ["gptq", "awq+gptq", "rtn"])
def test_mix_quantized_in_lowbit_exports_its_blocks_unchanged(method, tmp_path):
    import lowbit
    from lowbit.io.gguf.writer import unpermute_qk
    from lowbit.model.qmodules import QEmbedding, QLinear

    model, tok = tiny_model(hidden=256, inter=512, layers=2, heads=4, kv=2), tiny_tokenizer()
    g = torch.Generator().manual_seed(2)
    windows = torch.randint(3, 264, (4, 32), generator=g)
    qmodel, rep = lowbit.quantize(model, tok, scheme="Q4_K_M", method=method, calib=windows)
    q = qmodel.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, QLinear) and q.qweight.scheme.name == "q4_k"
    assert qmodel.get_submodule("model.layers.1.mlp.down_proj").qweight.scheme.name == "q6_k"  # use_more_bits
    assert isinstance(qmodel.model.embed_tokens, QEmbedding) and qmodel.model.embed_tokens.qweight.scheme.name == "q6_k"
    assert {r.method for r in rep.layers if r.name.startswith("model.layers.")} == {method}
    saved = lowbit.save(qmodel, tmp_path / "q", tokenizer=tok)
    back, tok2 = lowbit.load(saved)  # evaluated in lowbit before any export: the same numbers
    ids = tok("the thin cat sat", add_special_tokens=False)["input_ids"]
    assert np.array_equal(torch_logprobs(back, ids), torch_logprobs(qmodel, ids))
    out = tmp_path / "q.gguf"
    report = export_gguf(back, tok2, out, type=None, progress=False)
    assert report.method == "" and {t.method for t in report.tensors if t.ggml.startswith("Q")} == {"stored"}
    w = read_gguf_weights(out)
    got = unpermute_qk(w["blk.0.attn_q.weight"], 4)
    assert torch.equal(got, q.qweight.dequantize(torch.float32))  # the stored blocks, unchanged
    assert gguf_types(out)["blk.0.attn_q.weight"] == "Q4_K" and gguf_types(out)["token_embd.weight"] == "Q6_K"
    # llama.cpp runs the same model: far closer to lowbit's than lowbit's is to float (llama.cpp also rounds the
    # activations to 8 bits for its k-quant dot products)
    ours = torch_logprobs(qmodel, ids)
    assert mean_kl(ours, llamacpp.logprobs(out, ids)) < 0.25 * mean_kl(torch_logprobs(model, ids), ours)
    one_step = export_gguf(model, tok, tmp_path / "one.gguf", "Q4_K_M", calib=windows, method=method, progress=False)
    assert one_step.method == method
    w1 = read_gguf_weights(tmp_path / "one.gguf")  # the one-step form quantizes the same way, deterministically
    assert w1.keys() == w.keys() and all(torch.equal(w1[k], w[k]) for k in w)


def test_gguf_typed_model_moves_to_meta_and_back():
    import lowbit

    model, tok = tiny_model(hidden=256, inter=512), tiny_tokenizer()
    qmodel, _ = lowbit.quantize(model, tok, scheme="q4_k")
    layer = qmodel.get_submodule("model.layers.0.mlp.up_proj")
    codes = layer.qweight.codes.clone()
    qmodel.to("meta")
    assert layer.qweight.codes.is_meta
    qmodel.to_empty(device="cpu")
    assert layer.qweight.codes.shape == codes.shape and layer.qweight.scheme.name == "q4_k"


# -- the real model -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    from lowbit.cli.assets import smollm2_gguf
    from lowbit.io.loaders import load_float

    # one thread: on a 2-core machine shared with other jobs, spinning thread pools cost 10x (measured)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield (*load_float(smollm2_gguf()), smollm2_gguf())
    torch.set_num_threads(old)


@pytest.mark.integration
def test_smollm2_q4_1_blocks_reproduce_the_source_file(smollm2):
    # the float SmolLM2 is its Q4_1 file dequantized: lowbit's Q4_1 search finds the very same blocks again
    model, _, src = smollm2
    raw = np.memmap(src, dtype=np.uint8, mode="r")
    from lowbit.io.gguf.writer import permute_qk

    info = {t.name: t for t in read_gguf_index(src).tensors}
    for hf, g, heads in (("model.layers.3.self_attn.q_proj.weight", "blk.3.attn_q.weight", 9),
                         ("model.layers.3.self_attn.k_proj.weight", "blk.3.attn_k.weight", 3),
                         ("model.layers.3.mlp.down_proj.weight", "blk.3.ffn_down.weight", None)):
        w = model.state_dict()[hf]
        w = permute_qk(w, heads) if heads else w
        ours = BLOCK_TYPES["Q4_1"].encode(w.reshape(-1, 32)).numpy().reshape(-1)
        t = info[g]
        assert np.array_equal(ours, raw[t.offset:t.offset + t.nbytes]), g


@pytest.mark.integration
@pytest.mark.parametrize("mix", ["Q8_0", "Q4_K_M"])
def test_smollm2_runs_in_llama_cpp(mix, smollm2, tmp_path):
    model, tok, _ = smollm2
    out = tmp_path / f"smollm2-{mix}.gguf"
    report = export_gguf(model, tok, out, mix, progress=False, threads=1)
    if mix == "Q4_K_M":  # 576-wide rows cannot take 256-wide super-blocks: llama.cpp's fallbacks, reported
        t = {r.name: r for r in report.tensors}
        assert (t["blk.0.attn_q.weight"].requested, t["blk.0.attn_q.weight"].ggml) == ("Q4_K", "Q5_0")
        assert t["blk.0.ffn_down.weight"].ggml == "Q6_K" and t["blk.4.ffn_down.weight"].ggml == "Q4_K"
        assert t["token_embd.weight"].ggml == "Q8_0" and len(report.fallbacks) == 180
    assert read_gguf_index(out).metadata["tokenizer.ggml.pre"] == "smollm"

    answer = llamacpp.chat(out, [{"role": "user", "content": "Write one sentence about the sea."}], max_tokens=32)
    words = re.findall(r"[a-z]+", answer.lower())
    assert "\ufffd" not in answer.rstrip("\ufffd")  # a cut multi-byte character at the very end is fine
    assert len(words) >= 8 and len(set(words) & {"the", "is", "a", "of", "and", "sea", "ocean", "with"}) >= 3, answer
    text = Path(__file__).resolve().parents[2].parent.joinpath("shared/data/wikitext2-test.txt")
    text = text.read_text()[:4000] if text.is_file() else " ".join(["The history of the city is long."] * 40)
    ids = llamacpp.tokenize(out, text)[:128]

    # llama.cpp decodes our blocks exactly as lowbit does: its own dequantization of the file, bit for bit
    f32 = tmp_path / "decoded-by-llama.gguf"
    llamacpp.quantize(out, f32, "F32")
    ours, theirs = read_gguf_weights(out), read_gguf_weights(f32)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # and computes what lowbit computes from the same file
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        load_gguf_into(model, out)
        lowbit_lp = torch_logprobs(model, ids)
    finally:
        model.load_state_dict(saved)
    assert mean_kl(lowbit_lp, llamacpp.logprobs(f32, ids)) < 1e-3
    # with its quantized kernels llama.cpp also rounds activations to 8 bits: a further, runtime-only error
    native = mean_kl(lowbit_lp, llamacpp.logprobs(out, ids, f32_cache=False))
    assert native < 1.5e-2, native
