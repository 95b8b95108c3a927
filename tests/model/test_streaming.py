"""Lazy loading + block-by-block streaming: blocks stay on meta until quantization reaches them, one float
block is in memory at a time, and the result is bit-identical to quantizing the fully loaded model."""

import logging

import pytest
import torch
import transformers

import lowbit
from lowbit.errors import LowbitError
from lowbit.methods.registry import MethodConfig
from lowbit.model.qmodules import QEmbedding, QLinear
from lowbit.model.quantize import quantize_model
from lowbit.model.streaming import streamed_weights
from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory, tiny_tokenizer, tiny_llama_dir):
    """The tiny Llama as one file, sharded (64 KB shards: blocks span files), and a tied-embedding variant."""
    sharded = tmp_path_factory.mktemp("sharded")
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(sharded, max_shard_size="64KB")
    tiny_tokenizer.save_pretrained(sharded)
    tied = tmp_path_factory.mktemp("tied")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(tiny_tokenizer), tie_word_embeddings=True)
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tied)
    tiny_tokenizer.save_pretrained(tied)
    return {"single": tiny_llama_dir, "sharded": sharded, "tied": tied}


def _windows(vocab: int, n: int = 6, t: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(0))


def _qtensors(model):
    return {n: m.qweight for n, m in model.named_modules() if isinstance(m, QLinear | QEmbedding)}


def assert_same_quantized(a, b):
    """Packed codes, scales, zero-points and every remaining float tensor are bit-identical."""
    qa, qb = _qtensors(a), _qtensors(b)
    assert qa.keys() == qb.keys() and qa
    for n in qa:
        for f in ("codes", "scales", "zeros"):
            x, y = getattr(qa[n], f), getattr(qb[n], f)
            assert (x is None and y is None) or torch.equal(x, y), f"{n}.{f}"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lazy_load_leaves_blocks_on_meta(llama_dirs):
    for kind, d in llama_dirs.items():
        eager, _ = lowbit.load(d)
        lazy, tok = lowbit.load(d, lazy=True)
        assert tok is not None
        blocks = set()
        for n, p in lazy.named_parameters():
            assert p.is_meta == (".layers." in n), n
            if not p.is_meta:
                assert torch.equal(p, eager.get_parameter(n)), n
            blocks.add(n)
        assert blocks == {n for n, _ in eager.named_parameters()}
        for n, b in lazy.named_buffers():  # rotary inv_freq: real, as the constructor computes it
            assert not b.is_meta and torch.equal(b, eager.get_buffer(n)), n
        assert (lazy.lm_head.weight is lazy.model.embed_tokens.weight) == (kind == "tied")
        assert streamed_weights(lazy).blocks == tuple(f"model.layers.{i}." for i in range(len(lazy.model.layers)))


@pytest.mark.parametrize("kind", ["single", "sharded", "tied"])
@pytest.mark.parametrize("method,options", [("rtn", {}), ("gptq", {}), ("gptq", {"float_target": True})])
def test_streamed_quantize_is_bit_identical(tmp_path, llama_dirs, kind, method, options):
    eager, tok = lowbit.load(llama_dirs[kind])
    lazy, _ = lowbit.load(llama_dirs[kind], lazy=True)
    ids = _windows(len(tok))
    kw = dict(scheme="int4-g32", method=method, config=MethodConfig(options=options), progress=False)
    qe, re_ = lowbit.quantize(eager, tok, calib=ids if method == "gptq" else None, **kw)
    ql, rl = lowbit.quantize(lazy, tok, calib=ids if method == "gptq" else None, inplace=True, **kw)
    assert ql is lazy and streamed_weights(ql) is None
    assert not any(t.is_meta for t in ql.state_dict().values())
    assert_same_quantized(qe, ql)
    assert [(r.name, r.rel_error, r.note) for r in re_.layers] == [(r.name, r.rel_error, r.note) for r in rl.layers]
    with torch.no_grad():
        out = ql(ids).logits
        assert torch.equal(qe(ids).logits, out)
    lowbit.save(ql, tmp_path / "q", tokenizer=tok, plan=ql.lowbit_plan, report=rl)
    back, btok = lowbit.load(tmp_path / "q")
    assert btok is not None
    with torch.no_grad():
        assert torch.equal(back(ids).logits, out)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_one_float_block_at_a_time(llama_dirs, method):
    model, tok = lowbit.load(llama_dirs["tied"], lazy=True)
    blocks = model.model.layers
    seen = []

    def on_block(done, total):
        seen.append(done)
        for i, block in enumerate(blocks):
            linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
            if i < done:  # quantized: no float linear weight left, only small real params (norms)
                assert not linears and not any(p.is_meta for p in block.parameters())
                assert all(p.dim() == 1 for p in block.parameters())
            else:  # not reached yet: shapes only
                assert linears and all(p.is_meta for p in block.parameters())

    plan = lowbit.default_plan(model, "int4-g32", method)
    quantize_model(model, plan, _windows(len(tok)) if method == "gptq" else None, progress=False, on_block=on_block)
    assert seen == list(range(1, len(blocks) + 1))


def test_kept_layers_stay_float_and_are_reported(llama_dirs):
    eager, tok = lowbit.load(llama_dirs["sharded"])
    lazy, _ = lowbit.load(llama_dirs["sharded"], lazy=True)
    qe, _ = lowbit.quantize(eager, tok, scheme="int4-g32", keep=["mlp.down_proj"], progress=False)
    ql, rep = lowbit.quantize(lazy, tok, scheme="int4-g32", keep=["mlp.down_proj"], progress=False, inplace=True)
    assert "model.layers.1.mlp.down_proj" in rep.kept
    w = ql.model.layers[1].mlp.down_proj.weight
    assert not w.is_meta and torch.equal(w, eager.model.layers[1].mlp.down_proj.weight)
    assert_same_quantized(qe, ql)


def test_nan_in_a_streamed_block_names_the_layer(tmp_path, tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path)
    lazy, _ = lowbit.load(tmp_path, lazy=True)  # the block is not read yet: loading succeeds
    with pytest.raises(LowbitError, match="model.layers.1.mlp.up_proj"):
        lowbit.quantize(lazy, scheme="int4-g32", progress=False, inplace=True)


def test_bert_streams_too(tmp_path, tiny_bert):
    model, tok = tiny_bert
    model.save_pretrained(tmp_path)
    lazy, _ = lowbit.load(tmp_path, lazy=True)
    assert lazy.encoder.layer[0].attention.self.query.weight.is_meta
    assert not lazy.embeddings.word_embeddings.weight.is_meta
    eager, _ = lowbit.load(tmp_path)
    ids = _windows(len(tok), 4, 16)
    qe, _ = lowbit.quantize(eager, scheme="int8", method="gptq", calib=ids, progress=False)
    ql, _ = lowbit.quantize(lazy, scheme="int8", method="gptq", calib=ids, progress=False)
    assert_same_quantized(qe, ql)


def test_gguf_streams_from_its_float_cache(tmp_path, monkeypatch, tiny_gguf):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    first, _ = lowbit.load(tiny_gguf.path, lazy=True)  # dequantised whole once, to build the cache
    assert not any(p.is_meta for p in first.parameters())
    lazy, tok = lowbit.load(tiny_gguf.path, lazy=True)  # then streamed from the cache
    assert tok is not None and lazy.model.layers[0].mlp.up_proj.weight.is_meta
    streamed_weights(lazy).load_all(lazy)
    for n, w in tiny_gguf.reference.items():
        assert torch.equal(lazy.get_parameter(n), w), n


def test_unstreamable_folder_loads_whole(tmp_path, tiny_tokenizer, caplog):
    """``.bin`` weights cannot be read a block at a time: the lazy load warns and loads the model whole."""
    model = make_tiny_llama(len(tiny_tokenizer))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        back, _ = lowbit.load(tmp_path, lazy=True)
    assert "cannot stream" in caplog.text
    assert streamed_weights(back) is None
    assert all(torch.equal(p, model.get_parameter(n)) for n, p in back.named_parameters())


def test_hub_id_streams_from_its_snapshot(tmp_path, monkeypatch, llama_dirs):
    """A hub id resolves to its cached snapshot folder (offline here), shards and all."""
    import shutil

    import huggingface_hub.constants

    from lowbit.io.lazy import hub_folder, load_lazy

    repo = tmp_path / "models--someorg--tiny"
    snap = repo / "snapshots" / "0123abc"
    shutil.copytree(llama_dirs["sharded"], snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert hub_folder("someorg/tiny") == snap
    assert hub_folder("someorg/absent") is None
    model = load_lazy("someorg/tiny", transformers.AutoConfig.from_pretrained(snap))
    assert model.model.layers[1].mlp.up_proj.weight.is_meta and not model.lm_head.weight.is_meta


def test_cli_quantize_streams(tmp_path, capsys, caplog, llama_dirs):
    """``lowbit quantize`` takes the lazy path; its output equals the API's on the fully loaded model."""
    from lowbit.cli.main import main

    src = llama_dirs["sharded"]
    with caplog.at_level(logging.INFO, logger="lowbit"):
        assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "--scheme", "int4-g32", "--json"]) == 0
    assert "loaded lazily" in caplog.text and "cannot stream" not in caplog.text
    capsys.readouterr()
    eager, tok = lowbit.load(src)
    qe, _ = lowbit.quantize(eager, tok, scheme="int4-g32", progress=False)
    back, _ = lowbit.load(tmp_path / "q")
    ids = _windows(len(tok), 2, 16)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, qe(ids).logits)
