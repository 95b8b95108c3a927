import logging
import os
import shutil

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.io.loaders import (
    SourceError,
    cached_float_dir,
    describe_source,
    float_cache_path,
    load_float,
    resolve_source,
)

SAMPLE = "The engineer tested each arch with carts of gravel; 312 pages for the year 1902."


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("LOWBIT_CACHE", str(d))
    return d


def _logits(model, tok, text=SAMPLE):
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


# -- Hugging Face folders ----------------------------------------------------------------------------


def test_hf_dir_round_trip(tiny_llama_dir, tiny_llama):
    ref, ref_tok = tiny_llama
    model, tok = load_float(tiny_llama_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    assert tok(SAMPLE).input_ids == ref_tok(SAMPLE).input_ids
    assert torch.equal(_logits(model, tok), _logits(ref, ref_tok))
    # config.json itself names the folder too
    again, _ = load_float(tiny_llama_dir / "config.json")
    assert torch.equal(again.lm_head.weight, ref.lm_head.weight)


def test_dtype_is_honoured(tiny_llama_dir):
    model, _ = load_float(tiny_llama_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_encoder_loads_as_base_model(tmp_path, tiny_bert):
    ref, tok = tiny_bert
    ref.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok2 = load_float(tmp_path)
    assert type(model).__name__ == "BertModel"  # not BertLMHeadModel: the config names an encoder
    batch = tok2(["a bridge is a promise", "the river floods"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, ref(**batch).last_hidden_state)


def test_folder_without_tokenizer_gives_none(tmp_path, tiny_llama):
    tiny_llama[0].save_pretrained(tmp_path)
    model, tok = load_float(tmp_path)
    assert tok is None and model.config.hidden_size == 64


# -- GGUF ----------------------------------------------------------------------------------------------


def test_gguf_every_tensor_type_dequantises_exactly(cache, tiny_gguf):
    model, tok = load_float(tiny_gguf.path, cache=False)
    sd = model.state_dict()
    assert set(sd) == set(tiny_gguf.reference)
    for name, want in tiny_gguf.reference.items():
        assert torch.equal(sd[name], want), name
    assert tok(SAMPLE).input_ids == tiny_gguf.tokenizer(SAMPLE).input_ids
    assert not cache.exists()  # cache=False writes nothing
    assert getattr(model.config, "quantization_config", None) is None


def test_gguf_cache_hit_is_bit_identical(cache, tiny_gguf, caplog):
    direct, tok = load_float(tiny_gguf.path)
    dest = float_cache_path(tiny_gguf.path)
    assert dest.parent.parent == cache and (dest / "config.json").is_file()
    with caplog.at_level(logging.INFO, logger="lowbit.io.loaders"):
        cached, tok2 = load_float(tiny_gguf.path)
    assert any("from the float cache" in r.getMessage() for r in caplog.records)
    assert cached is not direct
    assert torch.equal(_logits(direct, tok), _logits(cached, tok2))
    assert cached_float_dir(tiny_gguf.path) == dest
    bf16, _ = load_float(tiny_gguf.path, dtype=torch.bfloat16)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16


def test_tokenizer_names_its_gguf_file_loaded_or_cached(cache, tiny_gguf):
    # the GGUF export copies the source's tokenizer metadata (its pre-tokenizer name) through this link, on the
    # very first load (no cache yet) as on later ones: CI starts with an empty cache
    from lowbit.io.gguf.writer import source_gguf

    for kw in ({"cache": False}, {}, {}):
        _, tok = load_float(tiny_gguf.path, **kw)
        assert source_gguf(tok) == tiny_gguf.path.resolve(), kw


def test_cache_key_follows_the_file(cache, tmp_path, tiny_gguf):
    copy = tmp_path / "copy.gguf"
    shutil.copy(tiny_gguf.path, copy)
    first = float_cache_path(copy)
    assert first != float_cache_path(tiny_gguf.path)  # another path, another entry
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert float_cache_path(copy) != first  # a rewritten file is not served from a stale entry


def test_broken_cache_is_rebuilt(cache, tiny_gguf):
    load_float(tiny_gguf.path)
    dest = float_cache_path(tiny_gguf.path)
    (dest / "model.safetensors").write_bytes(b"garbage")
    model, _ = load_float(tiny_gguf.path)
    assert torch.equal(model.lm_head.weight, tiny_gguf.reference["lm_head.weight"])
    assert (dest / "model.safetensors").stat().st_size > 1000


def test_unwritable_cache_does_not_stop_the_load(tmp_path, monkeypatch, tiny_gguf, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("LOWBIT_CACHE", str(blocker))
    with caplog.at_level(logging.WARNING, logger="lowbit.io.loaders"):
        model, _ = load_float(tiny_gguf.path)
    assert torch.equal(model.lm_head.weight, tiny_gguf.reference["lm_head.weight"])
    assert any("could not cache" in r.getMessage() for r in caplog.records)


# -- bad input -----------------------------------------------------------------------------------------


def _one_line_error(source, needle):
    with pytest.raises(SourceError) as e:
        load_float(source)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg, msg
    assert isinstance(e.value, LowbitError)
    return msg


def test_missing_paths(tmp_path):
    _one_line_error(tmp_path / "nope", "no such file")
    _one_line_error("nope.gguf", "nope.gguf: no such file")
    _one_line_error("./some/model", "no such file")
    _one_line_error(str(tmp_path / "a" / "b"), "no such file")


def test_folder_without_config(tmp_path, tiny_gguf):
    _one_line_error(tmp_path, "no config.json")
    shutil.copy(tiny_gguf.path, tmp_path / "m.gguf")
    assert "m.gguf" in _one_line_error(tmp_path, "no config.json")


def test_truncated_and_corrupt_gguf(cache, tmp_path, tiny_gguf):
    data = tiny_gguf.path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    _one_line_error(cut, "cut.gguf")
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:2000])  # inside the metadata
    _one_line_error(head, "head.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    _one_line_error(junk, "not a GGUF file")
    fake = tmp_path / "fake.bin"
    fake.write_bytes(b"GGUF" + os.urandom(200))  # magic but garbage
    _one_line_error(fake, "fake.bin")
    assert not cache.exists()


def test_unknown_file_types(tmp_path, tiny_llama_dir):
    txt = tmp_path / "weights.txt"
    txt.write_text("hello")
    _one_line_error(txt, "unknown model file type")
    _one_line_error(tiny_llama_dir / "model.safetensors", "no model config")


def test_nan_weights_are_rejected(tmp_path, tiny_llama):
    model, _ = tiny_llama
    model.model.layers[1].mlp.down_proj.weight.data[3, 5] = float("nan")
    model.save_pretrained(tmp_path)
    msg = _one_line_error(tmp_path, "model.layers.1.mlp.down_proj.weight")
    assert str(tmp_path) in msg
    model.model.layers[1].mlp.down_proj.weight.data[3, 5] = float("inf")
    model.save_pretrained(tmp_path)
    _one_line_error(tmp_path, "NaN or Inf")


def test_corrupt_weights_in_folder(tmp_path, tiny_llama_dir):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, d)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    _one_line_error(d, str(d))


def test_unreachable_hub_id_is_one_line():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    _one_line_error("no-such-org/no-such-model-xyz", "no-such-org/no-such-model-xyz")


def test_resolve_and_describe(tmp_path, tiny_llama_dir, tiny_gguf):
    assert resolve_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    assert resolve_source(tiny_gguf.path).kind == "gguf"
    assert resolve_source(tiny_llama_dir).kind == "hf-dir"
    assert describe_source(tiny_gguf.path) == "tiny-llama.gguf"
    assert describe_source("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert describe_source(tiny_llama_dir) == tiny_llama_dir.name
    generic = tmp_path / "bert-mini" / "model"
    shutil.copytree(tiny_llama_dir, generic)
    assert describe_source(generic) == "bert-mini/model"
    assert describe_source(tmp_path / "gone.gguf") == "gone.gguf"


# -- real models (integration) ---------------------------------------------------------------------------


@pytest.mark.integration
def test_smollm2_gguf_direct_and_cached_agree(smollm2_dir, caplog):
    from lowbit.cli.assets import smollm2_gguf

    gguf = smollm2_gguf()
    direct, tok = load_float(gguf, cache=False)
    cfg = direct.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert type(direct).__name__ == "LlamaForCausalLM"
    assert float_cache_path(gguf) == smollm2_dir
    with caplog.at_level(logging.INFO, logger="lowbit.io.loaders"):
        cached, tok2 = load_float(gguf)
    assert any("from the float cache" in r.getMessage() for r in caplog.records)
    text = "The capital of France is Paris. The capital of Italy is"
    a, b = _logits(direct, tok, text), _logits(cached, tok2, text)
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert tok2.decode(a[0, -1].argmax()).strip() == "Rome"


@pytest.mark.integration
def test_minilm_sentence_embedding(minilm_dir):
    model, tok = load_float(minilm_dir)
    assert type(model).__name__ == "BertModel"
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state  # (B, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    emb = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling, (B, 384)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.6 > sim[0, 2]
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(minilm_dir), device="cpu").encode(sentences, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(emb, torch.nn.functional.normalize(ref, dim=-1))
    assert cos.min() > 0.99999
