"""End-to-end on tiny random models: quantize → save → load bit-identical; bad input is clear."""

import json

import pytest
import torch
import transformers

import lowbit
from lowbit.errors import LowbitError
from lowbit.eval.metrics import kl_divergence, log_probs
from lowbit.methods.registry import MethodConfig
from lowbit.model.qmodules import QEmbedding, QLinear


def _llama(tied=True):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("method,scheme", [("rtn", "int4-g32"), ("gptq", "int3-g32"), ("awq", "int4-g32-sym"),
                                           ("hqq", "int4-g32"), ("smoothquant", "int8")])
def test_save_load_bit_identical(tmp_path, method, scheme):
    model = _llama()
    ids = torch.randint(0, 256, (4, 32))
    qmodel, report = lowbit.quantize(model, scheme=scheme, method=method, calib=ids, progress=False)
    assert isinstance(qmodel.model.layers[1].mlp.down_proj, QLinear)
    assert isinstance(qmodel.model.embed_tokens, QEmbedding)
    assert isinstance(model.model.layers[1].mlp.down_proj, torch.nn.Linear)  # the source is untouched
    with torch.no_grad():
        out = qmodel(ids).logits
    lowbit.save(qmodel, tmp_path / "q", plan=qmodel.lowbit_plan, report=report)
    back, _ = lowbit.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, out)
    doc = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert doc["layers"]["model.layers.0.mlp.up_proj"]["scheme"] == scheme
    assert doc["tied"] == {"lm_head": "model.embed_tokens"}
    assert doc["plan"]["rules"][0]["method"] == method


def test_generate_works_on_quantized_model():
    qmodel, _ = lowbit.quantize(_llama(), scheme="int4-g32", progress=False)
    out = qmodel.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


def _kl_from(model, ids):
    """KL(model ‖ ·) on ``ids`` as a function of another model."""
    with torch.no_grad():
        ref = model(ids).logits.log_softmax(-1)

    def kl(m):
        with torch.no_grad():
            lp = m(ids).logits.log_softmax(-1)
        return float((ref.exp() * (ref - lp)).sum(-1).mean())

    return kl


def test_gptq_beats_rtn_on_tiny_model():
    model = _llama()
    ids = torch.randint(0, 256, (16, 32))
    kl = _kl_from(model, ids)

    rtn, _ = lowbit.quantize(model, scheme="int3-g32", method="rtn", progress=False)
    gptq, _ = lowbit.quantize(model, scheme="int3-g32", method="gptq", calib=ids, progress=False)
    assert kl(gptq) < kl(rtn)


def test_bad_inputs_are_one_line_errors(tmp_path):
    model = _llama()
    with pytest.raises(LowbitError, match="needs calibration"):
        lowbit.quantize(model, scheme="int4-g32", method="gptq", progress=False)
    with pytest.raises(LowbitError, match="cannot parse scheme"):
        lowbit.quantize(model, scheme="int5-g33x", progress=False)
    bad = _llama()
    with torch.no_grad():
        bad.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(LowbitError, match="model.layers.1.mlp.up_proj"):
        lowbit.quantize(bad, scheme="int4-g32", progress=False)
    qmodel, _ = lowbit.quantize(model, scheme="int8", progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(LowbitError, match="already exists"):
        lowbit.save(qmodel, tmp_path / "exists")
    assert list((tmp_path / "exists").iterdir()) == []


def test_nan_activations_name_layer_and_window():
    model = _llama()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = float("inf")
    with pytest.raises(LowbitError, match=r"model\.layers\.0\.self_attn\.q_proj.*window 0"):
        lowbit.quantize(model, scheme="int4-g32", method="gptq", calib=torch.randint(0, 256, (2, 16)), progress=False)


def test_act_quant_and_rules():
    model = _llama()
    ids = torch.randint(0, 256, (4, 16))
    q, report = lowbit.quantize(model, scheme="int8", method="rtn", calib=ids, rules=["mlp.down_proj=int4-g32"],
                                keep=["lm_head"], config=MethodConfig(options={"act": "int8-static"}),
                                progress=False)
    assert q.model.layers[0].mlp.down_proj.qweight.scheme.name == "int4-g32"
    assert isinstance(q.lm_head, torch.nn.Linear)
    assert q.model.layers[0].self_attn.q_proj.act_scheme == "int8-static"
    assert float(q.model.layers[0].self_attn.q_proj.act_scale) > 0
    assert "lm_head" in report.kept


def test_static_activation_scales_survive_save_load(tmp_path):
    model = _llama()
    ids = torch.randint(0, 256, (4, 16))
    q, _ = lowbit.quantize(model, scheme="int8", calib=ids, config=MethodConfig(options={"act": "int8-static"}),
                           progress=False)
    lowbit.save(q, tmp_path / "q")
    back, _ = lowbit.load(tmp_path / "q")
    assert back.model.layers[1].mlp.up_proj.act_scheme == "int8-static"
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)


def test_gptq_float_target_on_tiny_model():
    """The runner collects the float path's cross statistics when GPTQ's ``float_target`` is set; the result
    is a normal quantized model, no worse than plain GPTQ in KL on its calibration data, and the source model
    is left untouched."""
    model = _llama()
    ids = torch.randint(0, 256, (16, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kl = _kl_from(model, ids)

    plain, _ = lowbit.quantize(model, scheme="int3-g32", method="gptq", calib=ids, progress=False)
    aimed, rep = lowbit.quantize(model, scheme="int3-g32", method="gptq", calib=ids, progress=False,
                                 config=MethodConfig(options={"float_target": True}))
    assert kl(aimed) < 1.05 * kl(plain)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert {r.method for r in rep.layers if ".layers." in r.name} == {"gptq"}


def test_block_output_shortcut_matches_full_forwards(monkeypatch):
    """Llama's down_proj adds straight into the block output: the runner takes the quantized block's output
    from the float one plus x·(Ŵ − W)ᵀ. Turning that off (full forwards) gives the same quantized model."""
    import dataclasses

    import lowbit.model.quantize as qm

    model = _llama()
    ids = torch.randint(0, 256, (8, 32))
    fast, _ = lowbit.quantize(model, scheme="int3-g32", method="gptq", calib=ids, progress=False)
    real_arch_for = qm.arch_for
    monkeypatch.setattr(qm, "arch_for", lambda m: dataclasses.replace(real_arch_for(m), residual_last=False))
    slow, _ = lowbit.quantize(model, scheme="int3-g32", method="gptq", calib=ids, progress=False)
    for (n, a), (_, b) in zip(fast.named_modules(), slow.named_modules(), strict=True):
        if isinstance(a, QLinear):
            same = (a.qweight.codes == b.qweight.codes).float().mean()
            assert same > 0.999, n


def test_layers_reading_one_input_share_its_statistics():
    from lowbit.model.calibrate import capture_block_inputs, collect_stats

    model = _llama()
    ids = torch.randint(0, 256, (4, 16))
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, ids, batch_size=2)
    attn = block.self_attn
    layers = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj}
    st = collect_stats(block, inputs, layers, {"q", "k", "v"}, stop_after=layers)
    x = torch.cat([block.input_layernorm(bi.hidden).reshape(-1, 64) for bi in inputs]).double()
    for n in layers:
        assert st[n].tokens == 64
        assert torch.allclose(st[n].xtx.double(), x.T @ x, rtol=1e-4, atol=1e-3)
        assert torch.allclose(st[n].sq_mean.double(), x.square().mean(0), rtol=1e-4)
    assert torch.equal(st["q"].xtx, st["v"].xtx)


@pytest.mark.parametrize("observer", ["percentile", "entropy"])
def test_static_activation_observers_clip_inside_minmax(observer):
    """A percentile / entropy observer sets each layer's static scale at or below min-max's (absmax / 127),
    strictly below it somewhere (they clip the tail), and the model still runs close to the float one."""
    ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))  # 32k values a layer

    def scales(obs):
        q, _ = lowbit.quantize(_llama(), scheme="int8", calib=ids, progress=False,
                               config=MethodConfig(options={"act": "int8-static", "act_observer": obs}))
        return q, {n: float(m.act_scale) for n, m in q.named_modules()
                   if isinstance(m, QLinear) and m.act_scale is not None}

    _, mm = scales("minmax")
    q, clipped = scales(observer)
    assert clipped.keys() == mm.keys() and clipped
    assert all(0 < clipped[n] <= mm[n] * (1 + 1e-6) for n in mm)
    assert any(clipped[n] < 0.999 * mm[n] for n in mm)
    with torch.no_grad():
        kl = kl_divergence(log_probs(_llama()(ids).logits), log_probs(q(ids).logits))
    assert float(kl.mean()) < 0.05


def test_fp8_dynamic_activations_quantize_per_token():
    from lowbit.model.qmodules import quantize_activation

    x = torch.randn(6, 64) * torch.logspace(-2, 2, 6)[:, None]  # tokens of very different magnitudes
    codes, s = quantize_activation(x, "fp8-dynamic")
    assert codes.dtype == torch.float8_e4m3fn and s.shape == (6, 1)
    xq = codes.float() * s
    assert torch.allclose(xq.abs().amax(-1), x.abs().amax(-1), rtol=1e-6)  # each token's max is on the grid
    # e4m3 keeps 3 mantissa bits: relative error ≤ 2^-4 for every element in its normal range
    normal = x.abs() / s >= 2.0 ** -6
    assert ((xq - x).abs()[normal] <= x.abs()[normal] * 2.0 ** -4 + 1e-12).all()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    q, _ = lowbit.quantize(_llama(), scheme="fp8", config=MethodConfig(options={"act": "fp8-dynamic"}),
                           progress=False)
    assert q.model.layers[0].mlp.up_proj.act_scheme == "fp8-dynamic"
    with torch.no_grad():
        ref, out = _llama()(ids).logits, q(ids).logits
    assert float((out - ref).norm() / ref.norm()) < 0.1
