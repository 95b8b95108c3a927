"""Transformer ONNX export: MatMulNBits packing bit for bit, whole tiny models in onnxruntime vs lowbit's own,
refusals and atomic writes; SmolLM2 / MiniLM quality (integration). onnxruntime always runs in a child process."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import lowbit
from lowbit.core.qtensor import QTensor
from lowbit.core.scheme import Scheme
from lowbit.errors import LowbitError
from lowbit.io.onnx import transformer as T
from lowbit.io.onnx.matmulnbits import matmulnbits_tensors
from lowbit.io.onnx.runtime import run_onnx_isolated
from lowbit.io.onnx.transformer import write_transformer_onnx
from lowbit.methods.registry import MethodConfig

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

torch.set_num_threads(1)


def _single_layer(q: QTensor, path) -> None:
    """A graph of one MatMulNBits node: Y = A @ dequant(B)ᵀ."""
    from onnx import TensorProto, helper, numpy_helper

    t = matmulnbits_tensors(q)
    n, k = q.shape
    inits = [numpy_helper.from_array(t.B, "B"), numpy_helper.from_array(t.scales, "S")]
    if t.zero_points is not None:
        inits.append(numpy_helper.from_array(t.zero_points, "Z"))
    node = helper.make_node("MatMulNBits", ["A", "B", "S"] + (["Z"] if t.zero_points is not None else []), ["Y"],
                            domain="com.microsoft", **t.attrs)
    g = helper.make_graph([node], "one", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(m, str(path))


@pytest.mark.parametrize("scheme, shape", [
    ("int4-g64", (48, 256)), ("int4-g32-sym", (40, 96)), ("int4-g64", (24, 200)),  # ragged last group
    ("int4-g48", (16, 96)),  # not a power of two: blocks of 16, scales repeated
    ("int2-g64", (32, 128)), ("int4-ch", (24, 160)), ("int8", (32, 72)), ("int8-g32-asym", (16, 64)),
    ("int4-g64-zf16", (16, 128)),  # float zero points (HQQ's), unpacked
])
def test_matmulnbits_weight_is_lowbits_dequantize_bit_for_bit(tmp_path, scheme, shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g)
    q = QTensor.quantize(w, Scheme.parse(scheme))
    path = tmp_path / "one.onnx"
    _single_layer(q, path)
    k = shape[1]
    (y,) = run_onnx_isolated(path, {"A": np.eye(k, dtype=np.float32)})  # A = I: Y is the weight, transposed
    assert np.array_equal(y.T, q.dequantize(torch.float32).numpy())


@pytest.mark.parametrize("act, opset", [("int8-dynamic", 17), ("int8-dynamic", 18), ("int8-static", 17)])
def test_w8a8_single_layer_matches_lowbits_int8_kernel(tmp_path, act, opset):
    from onnx import TensorProto, helper

    from lowbit.io.onnx import graph as G
    from lowbit.kernels import use_kernels
    from lowbit.model.qmodules import QLinear

    g = torch.Generator().manual_seed(0)
    k, n = 384, 1536
    layer = QLinear(QTensor.quantize(torch.randn(n, k, generator=g), Scheme.parse("int8")))
    layer.act_scheme = act
    layer.act_scale = torch.tensor(0.05) if act == "int8-static" else None
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])])
    m = helper.make_model(helper.make_graph([], "one", *io),
                          opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    b = G._Builder(m)
    G._int8_int8(b, "layer", layer, "x", "y", opset, None)
    m.graph.node.extend(b.nodes)
    m.graph.initializer.extend(b.inits)
    onnx.save(m, str(tmp_path / "one.onnx"))
    x = torch.randn(64, k, generator=g) * 3
    (y,) = run_onnx_isolated(tmp_path / "one.onnx", {"x": x.numpy()})
    with torch.no_grad(), use_kernels(["int8-int8"]):
        ref = layer(x)
    # the same codes and int32 sums; the float32 rescale in another order: a few ulp
    assert np.abs(y - ref.numpy()).max() <= 1e-6 * np.abs(ref.numpy()).max()


@pytest.mark.parametrize("scheme, why", [("int3-g64", "3-bit codes"), ("int4-g24", "groups of 24"),
                                         ("q4_0", "GGML block type"), ("nf4-g64", "not an integer grid")])
def test_unsupported_scheme_names_the_layer(tiny_llama, tmp_path, scheme, why):
    model, tok = tiny_llama
    q, _ = lowbit.quantize(model, tok, scheme=scheme, keep=["lm_head"], progress=False)
    with pytest.raises(LowbitError, match=f"layer model.layers.0.self_attn.q_proj: .*{why}") as e:
        write_transformer_onnx(q, tmp_path / "m.onnx")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "m.onnx").exists()


def _valid(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits[mask.bool()]  # (tokens, vocab): padded query rows are garbage in any runtime


def _ids(vocab: int, rows: int = 2, seq: int = 12, pad: int = 4):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0  # left padding, as a batch of generation prompts has
    return ids, mask


def _ort_vs_lowbit(path, q, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Max |logits| difference between the file in onnxruntime (a child process) and ``q``, on unpadded rows."""
    (y,) = run_onnx_isolated(path, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        ref = q(input_ids=ids, attention_mask=mask).logits
    return (_valid(torch.from_numpy(y), mask) - _valid(ref, mask)).abs().max().item()


def test_tiny_llama_logits_match_lowbit(tiny_llama, tmp_path, reference_kernels):
    model, tok = tiny_llama
    q, _ = lowbit.quantize(model, tok, scheme="int4-g64", progress=False)
    rep = write_transformer_onnx(q, tmp_path / "m.onnx")
    assert rep.layers == {"matmulnbits-4bit": 14, "matmulnbits-8bit": 1, "embedding-int8": 1}
    assert (rep.inputs, rep.outputs) == (["input_ids", "attention_mask"], ["logits"])
    assert rep.bytes_on_disk == (tmp_path / "m.onnx").stat().st_size and rep.to_dict()["kind"] == "causal-lm"
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 15
    assert all(i.data_type != onnx.TensorProto.FLOAT or np.prod(i.dims) < 64 * 64 for i in graph.initializer)
    ids, mask = _ids(len(tok))
    diff = _ort_vs_lowbit(tmp_path / "m.onnx", q, ids, mask)
    assert diff < 1e-5, diff  # the same weights; float32 summation order only (measured ~2e-7, logits ~0.7)


def test_tied_head_is_matmulnbits_and_no_float_table_is_left(tiny_tokenizer, tmp_path, reference_kernels):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tiny_tokenizer), tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    q, _ = lowbit.quantize(model, tiny_tokenizer, scheme="int4-g64", progress=False)
    rep = write_transformer_onnx(q, tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert rep.layers == {"matmulnbits-4bit": 7, "matmulnbits-8bit": 1, "embedding-int8": 1}
    assert any(n.op_type == "MatMulNBits" and n.input[1] == "lm_head.qweight.B" for n in graph.node)
    big_float = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) > 4096]
    assert big_float == []  # the exporter merged head and table (equal values); both now hold int8 codes
    ids, mask = _ids(len(tiny_tokenizer))
    assert _ort_vs_lowbit(tmp_path / "m.onnx", q, ids, mask) < 1e-5


def test_traced_without_padding_still_masks_padded_batches(tiny_llama, tmp_path, reference_kernels):
    model, tok = tiny_llama
    q, _ = lowbit.quantize(model, tok, scheme="int4-g32-sym", progress=False)
    ex = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]])}  # one row, no mask: the mask path must still be in the graph
    rep = write_transformer_onnx(q, tmp_path / "m.onnx", example_inputs=ex, opset=18)
    assert rep.opset == 18 and rep.layers["matmulnbits-4bit"] == 14
    ids, mask = _ids(len(tok), rows=3, seq=10, pad=6)
    assert _ort_vs_lowbit(tmp_path / "m.onnx", q, ids, mask) < 1e-5


def test_embedding_of_another_scheme_is_a_float_table_and_warned(tiny_llama, tmp_path, reference_kernels):
    model, tok = tiny_llama
    q, _ = lowbit.quantize(model, tok, scheme="int4-g64", rules=["model.embed_tokens=int4-g32"], progress=False)
    assert q.model.embed_tokens.qweight.scheme.name == "int4-g32"
    rep = write_transformer_onnx(q, tmp_path / "m.onnx")
    assert rep.layers["embedding-float"] == 1
    assert rep.warnings == ["model.embed_tokens: int4-g32 embeddings written as float tables (lowbit's dequantized "
                            "values; the int8 form takes int8 per row)"]
    ids, mask = _ids(len(tok))
    assert _ort_vs_lowbit(tmp_path / "m.onnx", q, ids, mask) < 1e-5


def test_existing_file_is_refused_unless_force(tiny_llama, tmp_path):
    model, tok = tiny_llama
    q, _ = lowbit.quantize(model, tok, scheme="int4-g64", progress=False)
    dest = tmp_path / "m.onnx"
    dest.write_bytes(b"keep me")
    with pytest.raises(LowbitError, match="already exists"):
        write_transformer_onnx(q, dest)
    assert dest.read_bytes() == b"keep me"
    write_transformer_onnx(q, dest, force=True)
    assert onnx.load(str(dest)).graph.output[0].name == "logits"


def test_failure_leaves_no_partial_file(tiny_llama, tmp_path, monkeypatch):
    model, tok = tiny_llama
    q, _ = lowbit.quantize(model, tok, scheme="int4-g64", progress=False)

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(T.G, "rewrite", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_transformer_onnx(q, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []  # neither the file nor the exporter's temporary folder


def test_external_data_file_beside_the_graph(tiny_llama, tmp_path, monkeypatch, reference_kernels):
    model, tok = tiny_llama
    q, _ = lowbit.quantize(model, tok, scheme="int4-g64", progress=False)
    monkeypatch.setattr(T, "EXTERNAL_DATA_BYTES", 0)  # as a > 2 GB model would be written
    rep = write_transformer_onnx(q, tmp_path / "m.onnx")
    assert rep.external_data == "m.onnx.data" and sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert rep.bytes_on_disk == sum(f.stat().st_size for f in tmp_path.iterdir())
    ids, mask = _ids(len(tok))
    assert _ort_vs_lowbit(tmp_path / "m.onnx", q, ids, mask) < 1e-5


def test_not_a_causal_lm_or_encoder(tiny_llama, tmp_path):
    model, tok = tiny_llama
    q, _ = lowbit.quantize(model, tok, scheme="int4-g64", progress=False)
    with pytest.raises(LowbitError, match="LlamaModel: the transformer ONNX export takes a causal LM"):
        write_transformer_onnx(q.model, tmp_path / "m.onnx")


def _bert_feeds(tok):
    enc = tok(["the river leaves the mountains in a narrow gorge", "a bridge is a promise"], padding=True,
              return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.mark.parametrize("act", ["int8-dynamic", "int8-static", None])
def test_tiny_bert_w8a8_matches_lowbit(tiny_bert, tmp_path, act):
    model, tok = tiny_bert
    cfg = MethodConfig(options={"act": act} if act else {})
    calib = torch.randint(5, len(tok), (4, 16), generator=torch.Generator().manual_seed(0))
    static = act == "int8-static"  # calibration never reaches the pooler (it does not feed last_hidden_state)
    q, _ = lowbit.quantize(model, tok, scheme="int8", config=cfg, calib=calib if static else None,
                           keep=["pooler.dense"] if static else [], progress=False)
    rep = write_transformer_onnx(q, tmp_path / "b.onnx")
    assert rep.kind == "encoder" and rep.outputs == ["last_hidden_state"]
    assert rep.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert rep.layers[("int8-int8" if act else "matmulnbits-8bit")] == 12
    assert static or any("pooler.dense: not in the graph" in w for w in rep.warnings)
    feeds = _bert_feeds(tok)
    (y,) = run_onnx_isolated(tmp_path / "b.onnx", {k: v.numpy() for k, v in feeds.items()})
    from lowbit.kernels import use_kernels

    # W8A8: lowbit's int8-int8 kernel (exact int32 sums, as the graph's MatMulInteger); weight-only: the float32
    # dequantize reference (not a bf16 fast kernel)
    with torch.no_grad(), use_kernels(("int8-int8",) if act else "reference"):
        ref = q(**feeds).last_hidden_state
    with torch.no_grad():
        fast = q(**feeds).last_hidden_state  # auto: W8A8 prefill runs fake-act-cpp-gemm, float32 sums
        flt = model(**feeds).last_hidden_state
    m = feeds["attention_mask"].bool()
    diff = (torch.from_numpy(y)[m] - ref[m]).abs().max().item()
    # the same activation codes and exact int32 sums: float32 rounding of the rescale and the float ops around
    assert diff < 1e-4, diff
    # float32 sums may move a later layer's activation code by one: still far below the quantization error
    err = (ref[m] - flt[m]).abs().max().item()
    assert diff < 0.1 * err and (torch.from_numpy(y)[m] - fast[m]).abs().max().item() < 0.1 * err


def test_w8a8_needs_int8_per_channel_weights(tiny_bert, tmp_path):
    model, tok = tiny_bert
    q, _ = lowbit.quantize(model, tok, scheme="int8-tensor", config=MethodConfig(options={"act": "int8-dynamic"}),
                           progress=False)
    with pytest.raises(LowbitError, match=r"layer encoder\.layer\.0\..*int8 weights per channel"):
        write_transformer_onnx(q, tmp_path / "b.onnx")


# -- real models (integration) -------------------------------------------------------------------------------


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def test_smollm2_int4_logits_kl(smollm2_dir, tmp_path, reference_kernels):
    from lowbit.cli.assets import wikitext
    from lowbit.eval.windows import read_text

    model, tok = lowbit.load(smollm2_dir)
    q, _ = lowbit.quantize(model, tok, scheme="int4-g64", progress=False)
    rep = write_transformer_onnx(q, tmp_path / "s.onnx")
    assert rep.layers["matmulnbits-4bit"] == 210
    ids = tok(read_text(wikitext("test"))[:4000], return_tensors="pt")["input_ids"][0]
    windows = torch.stack([ids[100:164], ids[600:664]])  # two windows of 64 tokens
    mask = torch.ones_like(windows)
    (y,) = run_onnx_isolated(tmp_path / "s.onnx", {"input_ids": windows.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        ref = q(input_ids=windows, attention_mask=mask).logits
    kl = _kl(ref, torch.from_numpy(y))
    # vs lowbit's float32 dequantize reference: the same weights, so only float32 summation order differs
    # (lowbit's fast int4 kernels round through bf16: ~1e-3 from either)
    assert kl < 1e-5, kl


def test_minilm_w8a8_cosine_vs_float(minilm_dir, tmp_path):
    from lowbit.cli.assets import wikitext
    from lowbit.eval.windows import read_text

    model, tok = lowbit.load(minilm_dir)
    q, _ = lowbit.quantize(model, tok, scheme="int8", config=MethodConfig(options={"act": "int8-dynamic"}),
                           progress=False)
    write_transformer_onnx(q, tmp_path / "e.onnx")
    lines = [s.strip() for s in read_text(wikitext("test")).split("\n") if len(s.split()) > 8][:16]
    enc = tok(lines, padding=True, truncation=True, max_length=64, return_tensors="pt")
    feeds = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    (y,) = run_onnx_isolated(tmp_path / "e.onnx", {k: v.numpy() for k, v in feeds.items()})
    with torch.no_grad():
        flt = model(**feeds).last_hidden_state
    m = feeds["attention_mask"].unsqueeze(-1).float()

    def pooled(h):
        return (h * m).sum(1) / m.sum(1)

    cos = torch.nn.functional.cosine_similarity(pooled(torch.from_numpy(y)), pooled(flt), dim=-1)
    assert cos.min().item() >= 0.995, cos
