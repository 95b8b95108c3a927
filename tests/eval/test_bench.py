"""``lowbit bench`` / ``lowbit.bench``: prefill and decode timed for the quantized model and float in one run,
the kernels each ran, and what the models hold; the quantized model keeps its KV cache and ``generate``."""

import json

import pytest
import torch

import lowbit
from lowbit.cli.main import main
from lowbit.errors import LowbitError
from lowbit.eval.bench import bench, format_bench, model_bytes
from lowbit.kernels import use_kernels
from lowbit.model.convert import float_twin
from lowbit.model.qmodules import QLinear


def _quantized(tiny_llama, scheme="int4-g32"):
    model, tok = tiny_llama
    q, _ = lowbit.quantize(model, tok, scheme=scheme, method="rtn", progress=False)
    return model, q


def test_bench_times_both_models_at_each_thread_count(tiny_llama):
    model, q = _quantized(tiny_llama)
    r = bench(q, model, prefill=(16, 32), context=8, new_tokens=3, threads=(1, 2), repeats=1)
    assert [(row.label, row.runtime, row.threads) for row in r.rows] == [
        (label, rt, t) for t in (1, 2) for rt in ("lowbit", "transformers") for label in ("quantized", "float")]
    for row in r.rows:
        assert set(row.prefill_tokens_per_s) == {16, 32} and all(v > 0 for v in row.prefill_tokens_per_s.values())
        assert row.decode_tokens_per_s > 0
    qrow = r.rows[0]
    n_linear = sum(isinstance(m, QLinear) for m in q.modules())
    assert sum(qrow.kernels_decode.values()) == n_linear
    assert set(qrow.kernels_decode) & {"int4-torch", "int4-cpp"}  # lowbit's C++ GEMV where it could be built
    assert r.rows[1].kernels_decode == {}  # the float model has no quantized layers
    assert qrow.memory_bytes < r.rows[1].memory_bytes  # packed kernels counted, still smaller than float
    assert r.decode_ratio(1) == pytest.approx(qrow.decode_tokens_per_s / r.rows[1].decode_tokens_per_s)
    tq, tf = r.rows[2], r.rows[3]  # transformers' forward, same models
    assert sum(tq.kernels_decode.values()) == n_linear and tf.kernels_decode == {}
    assert r.decode_ratio(1, "transformers") == pytest.approx(tq.decode_tokens_per_s / tf.decode_tokens_per_s)
    assert r.ratio(1, "decode", "lowbit", "transformers") == pytest.approx(
        qrow.decode_tokens_per_s / tf.decode_tokens_per_s)
    d = r.to_dict()
    assert set(d["ratios"]) == {"1", "2"} and d["ratios"]["1"]["prefill_16"] > 0
    assert d["ratios"]["1"]["decode"] == pytest.approx(r.decode_ratio(1))
    assert set(d["ratios_by_runtime"]["1"]) == {"lowbit", "transformers"}
    assert d["ratios_lowbit_vs_transformers_float"]["2"]["decode"] > 0
    text = format_bench(r)
    assert "quantized" in text and "(×" in text and "peak RSS" in text and "lowbit's runtime ÷ float in" in text
    only = bench(q, model, prefill=(8,), context=4, new_tokens=2, threads=(1,), repeats=1, runtimes=["transformers"])
    assert [row.runtime for row in only.rows] == ["transformers", "transformers"]
    with pytest.raises(LowbitError, match="unknown runtime 'onnx'"):
        bench(q, model, prefill=(8,), threads=(1,), runtimes=["onnx"])


def test_float_twin_is_the_dequantized_float_model(tiny_llama):
    _, q = _quantized(tiny_llama)
    twin = float_twin(q)
    assert not any(isinstance(m, QLinear) for m in twin.modules())
    ids = torch.randint(0, 100, (1, 12))
    with use_kernels("reference"), torch.no_grad():
        assert torch.allclose(twin(ids).logits, q(ids).logits, atol=1e-5)
    assert any(isinstance(m, QLinear) for m in q.modules())  # the quantized model is untouched
    r = bench(q, prefill=(8,), context=4, new_tokens=2, threads=(1,), repeats=1)  # default: the twin
    assert [row.label for row in r.rows] == ["quantized", "float"] * 2
    assert len(bench(q, False, prefill=(8,), context=4, new_tokens=2, threads=(1,), repeats=1).rows) == 2


def test_quantized_model_generates_with_kv_cache_as_the_reference_does(tiny_llama):
    _, q = _quantized(tiny_llama, "int8")
    # fixed prompt ids: drawn from the global RNG they changed with the tests run before, and a random tiny model has
    # near-ties that a bf16 (or int8 activation) rounding flips early (one draw diverged at the fifth new token)
    ids = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    out = q.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 14)
    assert {m._kernel.name for m in q.modules() if isinstance(m, QLinear)} <= {"int8-torch", "int8-cpp"}
    with use_kernels("reference"):
        ref = q.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=0)
    assert (out == ref).float().mean() > 0.8  # roundings may flip a near-tie, not the whole text


def test_bench_refuses_what_it_cannot_time(tiny_llama):
    _, q = _quantized(tiny_llama)
    with pytest.raises(LowbitError, match="must be positive"):
        bench(q, prefill=(), threads=(1,))
    with pytest.raises(LowbitError, match="not a causal language model"):
        bench(torch.nn.Sequential(torch.nn.Linear(4, 4)), False)


def test_model_bytes_counts_packed_kernel_weights_once(tiny_llama):
    _, q = _quantized(tiny_llama)
    before = model_bytes(q)
    with torch.no_grad():
        q(torch.randint(0, 100, (1, 4)))
    assert model_bytes(q) > before  # int4-torch packed its copy of each weight


def test_cli_bench(tmp_path, capsys, tiny_llama_dir):
    argv = ["bench", str(tiny_llama_dir), "--scheme", "int4-g32", "--threads", "1", "--prefill", "16",
            "--context", "8", "--new-tokens", "2", "--repeats", "1"]
    assert main(argv + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in doc["rows"]] == ["quantized", "float"] * 2 and doc["ratios"]["1"]["decode"] > 0
    assert [r["runtime"] for r in doc["rows"]] == ["lowbit", "lowbit", "transformers", "transformers"]
    assert main(argv) == 0
    assert "decode tok/s" in capsys.readouterr().out
    q = tmp_path / "q"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(q), "--scheme", "int8"]) == 0
    capsys.readouterr()
    assert main(["bench", str(q), "--threads", "1", "--prefill", "8", "--context", "4", "--new-tokens", "2",
                 "--repeats", "1", "--kernels", "reference", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rows"][0]["kernels_decode"] == {"dequantize": 15}  # 15 linear layers, the reference asked for
    for bad, needle in ((["bench", str(tiny_llama_dir)], "give --scheme"),
                        (["bench", str(q), "--scheme", "int4-g32"], "already quantized"),
                        (["bench", str(q), "--kernels", "magic"], "unknown kernel 'magic'")):
        assert main(bad) == 2
        assert needle in capsys.readouterr().err


def test_float_twin_keeps_a_tied_head_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    q, _ = lowbit.quantize(LlamaForCausalLM(cfg).eval(), None, scheme="int4-g32", method="rtn", progress=False)
    assert q.lm_head.qweight_codes is q.model.embed_tokens.qweight_codes
    twin = float_twin(q)
    assert twin.lm_head.weight is twin.model.embed_tokens.weight  # one float copy, as the float model has
