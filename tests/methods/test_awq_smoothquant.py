import torch
import transformers

import lowbit
from lowbit.core.scheme import parse_scheme
from lowbit.methods.awq import hessian_clip, output_loss, search_scales
from lowbit.methods.registry import LayerStats, MethodConfig, get_method
from lowbit.methods.smoothquant import smooth_scales
from lowbit.model.transforms import fold_scales
from lowbit.primitives.observers import minmax
from lowbit.primitives.quant import group_view


def _llama(kv_heads=4):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=kv_heads, vocab_size=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_folded_scales_leave_float_function_unchanged():
    m = _llama()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = m(ids).logits
        blk = m.model.layers[0]
        s = torch.rand(64) * 3 + 0.2
        assert fold_scales(blk.input_layernorm, [blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj], s)
        assert fold_scales(blk.self_attn.v_proj, [blk.self_attn.o_proj], s)
        s2 = torch.rand(128) + 0.5
        assert fold_scales(blk.mlp.up_proj, [blk.mlp.down_proj], s2)
        out = m(ids).logits
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_fold_refuses_mismatched_shapes():
    m = _llama(kv_heads=2)  # GQA: v_proj has 32 outputs, o_proj 64 inputs
    blk = m.model.layers[0]
    assert not fold_scales(blk.self_attn.v_proj, [blk.self_attn.o_proj], torch.ones(64))


def test_smoothquant_migration_exact_in_float():
    torch.manual_seed(0)
    x = torch.randn(200, 48)
    x[:, 3] *= 50  # an outlier channel
    w = torch.randn(32, 48)
    s = smooth_scales(x.abs().amax(0), [w], alpha=0.5)
    assert torch.allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-3)
    # the outlier channel is tamed: max|x/s| is far more even across channels
    assert (x / s).abs().amax(0).std() < 0.2 * x.abs().amax(0).std()


def test_awq_scale_search_never_worse_than_unscaled():
    torch.manual_seed(0)
    x = torch.randn(512, 128) * (torch.rand(128) * 4) ** 2
    ws = [torch.randn(64, 128) * 0.05, torch.randn(32, 128) * 0.05]
    s, info = search_scales(x, ws, parse_scheme("int3-g32"))
    assert info["loss"] <= info["loss_unscaled"]
    assert info["alpha"] > 0  # activation outliers: scaling helps


def test_hessian_clip_beats_minmax_on_output_error():
    torch.manual_seed(1)
    x = torch.randn(1024, 96) * torch.linspace(0.1, 3, 96)
    w = torch.randn(48, 96)
    xtx = x.T @ x
    scheme = parse_scheme("int3-g32")
    lo, hi = hessian_clip(w, xtx, scheme)
    q = lowbit.QTensor.quantize(w, scheme, lo, hi)
    q0 = lowbit.QTensor.quantize(w, scheme, *minmax(group_view(w, "group", 32), scheme.grid))
    assert output_loss(w, q.dequantize(), xtx, 1024) < output_loss(w, q0.dequantize(), xtx, 1024)


def test_awq_method_falls_back_without_stats():
    w = torch.randn(16, 64)
    r = get_method("awq")(w, LayerStats(), parse_scheme("int4-g32"), MethodConfig())
    assert torch.equal(r.qtensor.dequantize(), lowbit.quantize_tensor(w, "int4-g32").dequantize())


def test_unfoldable_pairs_are_one_warning(tiny_llama):
    """Grouped-query attention: v_proj (kv heads) cannot fold a scale into o_proj (all heads) — one warning
    line for the pair, naming how many blocks, not one per block."""
    import lowbit

    model, tok = tiny_llama
    cfg = model.config
    _, rep = lowbit.quantize(model, tok, scheme="int4-g32", method="awq", calib=torch.randint(0, 200, (2, 32)))
    lines = [w for w in rep.warnings if "cannot take a folded" in w]
    gqa = cfg.num_key_value_heads < cfg.num_attention_heads
    assert len(lines) == (1 if gqa else 0)
    if gqa:
        assert f"in {cfg.num_hidden_layers} block(s)" in lines[0]


def test_awq_keeps_a_weight_already_on_a_ggml_grid_unscaled():
    # A Q4_1 model's weights (SmolLM2's shipped GGUF) sit exactly on Q4_1's grid, which Q5_1 contains: any input
    # scaling loses that grid, so the search must keep alpha 0 though its grouped proxy ranks a scaling best.
    from lowbit.layouts import layout_of

    torch.manual_seed(0)
    x = torch.randn(1024, 256) * (torch.rand(256) * 4) ** 2
    # min-max Q4_1 blocks, as llama.cpp's reference quantization writes them: every block uses codes 0 and 15
    codes = torch.randint(0, 16, (64 * 8, 32)).float()
    codes[:, 0], codes[:, 1] = 0, 15
    d = (torch.rand(64 * 8, 1) * 0.01 + 0.002).half().float()
    m = (-torch.rand(64 * 8, 1) * 0.08).half().float()
    w = (m + d * codes).reshape(64, 256)
    for name in ("q5_1", "q4_1"):
        s, info = search_scales(x, [w], parse_scheme(name))
        assert info["alpha"] == 0.0 and torch.equal(s, torch.ones(256)), (name, info)
        if "real_loss" in info:  # the proxy picked a scaling; the real fit showed it was worse
            assert info["real_loss_unscaled"] < info["real_loss"]
        q = layout_of(parse_scheme(name)).quantize(w * s, parse_scheme(name))
        assert torch.allclose(q.dequantize(torch.float32), w, atol=1e-3)  # the source grid survives (fp16 scale)
    # off any grid, with activation outliers, a k-quant still gains from scaling
    w = torch.randn(64, 256) * 0.05
    s, info = search_scales(x, [w], parse_scheme("q3_k"))
    assert info["alpha"] > 0 and info["real_loss"] < info["real_loss_unscaled"]
