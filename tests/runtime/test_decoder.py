"""lowbit's runtime (lowbit.runtime.Decoder, generate) against transformers' own forward on tiny Llama, Mistral
and Qwen2 models, float and quantized; the stacked GEMVs and the one-call C++ layer against the runtime's
per-op path; what it refuses."""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import lowbit
from lowbit.eval.bench import model_bytes
from lowbit.eval.speed import cache_step
from lowbit.kernels import native, use_kernels
from lowbit.runtime import Decoder, generate, unsupported

V = 97
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=V, max_position_embeddings=1024, tie_word_embeddings=False)


def _model(kind: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        m = LlamaForCausalLM(LlamaConfig(**SIZES))
    elif kind == "qwen2":  # q/k/v biases
        m = Qwen2ForCausalLM(Qwen2Config(**SIZES, use_sliding_window=False))
    elif kind == "mistral":
        m = MistralForCausalLM(MistralConfig(**SIZES, sliding_window=None))
    elif kind == "llama-rope-scaled":
        m = LlamaForCausalLM(LlamaConfig(**SIZES, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    else:
        raise ValueError(kind)
    for p in m.parameters():  # larger weights than the init's 0.02: logits that differ where the code does
        p.data.mul_(5.0) if p.dim() == 2 else None
    return m.eval()


def _ref_last(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits[:, -1]


def _close(a, b, tol=2e-4):
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= tol * max(scale, 1.0), (float((a - b).abs().max()), scale)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "llama-rope-scaled"])
def test_float_model_matches_transformers(kind):
    m = _model(kind)
    ids = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(1))
    dec = Decoder(m)
    with torch.inference_mode():
        _close(dec.forward(ids, all_logits=True), m(input_ids=ids).logits)
        dec.prefill(ids[:, :7])
        for i in range(7, 12):  # one token at a time on the cache
            got = dec.step(ids[:, i])
            _close(got, _ref_last(m, ids[:, : i + 1]))
        dec.prefill(ids[:, :5])
        _close(dec.forward(ids[:, 5:12]), _ref_last(m, ids))  # several new tokens on a filled cache


def test_batch_rows_and_a_cache_that_grows():
    m = _model()
    ids = torch.randint(0, V, (2, 300), generator=torch.Generator().manual_seed(2))  # past the first 256 slots
    dec = Decoder(m)
    dec.prefill(ids[:, :250])
    for i in range(250, 300, 10):
        got = dec.forward(ids[:, i:i + 10])
    _close(got, _ref_last(m, ids))
    with pytest.raises(lowbit.LowbitError, match="batch 1 after a sequence of batch 2"):
        dec.step(ids[:1, -1])


def _quantized(scheme="int4-g32", kind="llama"):
    """``SCHEME+a8``: int8 activations per token too (W8A8)."""
    from lowbit.methods.registry import MethodConfig

    config = MethodConfig(options={"act": "int8-dynamic"}) if scheme.endswith("+a8") else None
    q, _ = lowbit.quantize(_model(kind), None, scheme=scheme.removesuffix("+a8"), method="rtn", config=config,
                           progress=False)
    return q.eval()


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-g64-sym", "int8", "int8+a8"])
def test_quantized_model_matches_transformers_with_the_reference_kernels(scheme):
    q = _quantized(scheme)
    ids = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(3))
    with use_kernels("reference"):
        dec = Decoder(q)
        dec.prefill(ids[:, :9])
        _close(dec.step(ids[:, 9]), _ref_last(q, ids))
        assert not dec.layers_native  # the reference mode runs no C++ kernel


def _needs_lib():
    if native.library() is None:
        pytest.skip("lowbit's C++ kernels are not built on this machine")


@pytest.mark.parametrize("scheme,kind", [("int4-g32", "llama"), ("int8", "llama"), ("int4-g64", "qwen2"),
                                         ("int8+a8", "llama"), ("q8_0", "llama"), ("int5-g32", "qwen2")])
def test_stacked_and_one_call_layers_equal_each_layer_s_own_kernel(scheme, kind):
    """Decode through the one-call C++ layers equals decode through transformers' forward with the same
    kernels (each layer's own int4-cpp / int8-cpp / grid8-cpp call), within float32 rounding order."""
    _needs_lib()
    q = _quantized(scheme, kind)
    # W8A8 rounds activations in the model itself: a float32 difference of 1e-6 (attention's summation order)
    # can move a code by one step (1/127 of the token's largest activation), which these random weights amplify
    tol = 3e-2 if scheme.endswith("+a8") else 1e-4
    ids = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(4))
    dec = Decoder(q)
    dec.prefill(ids[:, :6])
    for i in range(6, 9):
        got = dec.step(ids[:, i])
        assert dec.layers_native
        with torch.inference_mode():
            out = q(input_ids=ids[:, :i], use_cache=True)
            ref = cache_step(q, out, ids[:, i:i + 1]).logits[:, -1]
        assert q.model.layers[0].self_attn.q_proj._kernel.name in ("int4-cpp", "int8-cpp", "int8-int8-cpp",
                                                                     "grid8-cpp")
        _close(got, ref, tol)
    py = Decoder(q)
    py._native = lambda: None  # the runtime's per-op path with the stacked GEMVs
    py.prefill(ids[:, :8])
    _close(py.step(ids[:, 8]), got, tol)
    assert not py.layers_native and py.kernels()[q.model.layers[0].self_attn.q_proj._kernel.name] >= 14


def test_one_call_layers_at_two_threads_equal_one_thread():
    _needs_lib()
    from lowbit.threads import torch_threads

    q = _quantized("int4-g32")
    ids = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(7))
    got = {}
    for t in (1, 2):
        with torch_threads(t):
            dec = Decoder(q)
            dec.prefill(ids[:, :7])
            got[t] = dec.step(ids[:, 7])
            assert dec.layers_native
    _close(got[2], got[1], 1e-5)  # the rows and heads split across threads; each is computed the same way


def test_stacking_holds_each_weight_once():
    _needs_lib()
    q = _quantized("int4-g32")
    ids = torch.randint(0, V, (1, 4))
    with torch.inference_mode():
        q(input_ids=ids[:, :1])  # each layer packs its own state
    before = model_bytes(q)
    dec = Decoder(q)
    dec.prefill(ids[:, :3])
    dec.step(ids[:, 3])
    a = q.model.layers[0].self_attn
    storages = {m._kernel_state["int4-cpp"][0].untyped_storage().data_ptr() for m in (a.q_proj, a.k_proj, a.v_proj)}
    assert len(storages) == 1  # q, k and v rows are views of one stacked tensor
    assert model_bytes(q) <= before


def test_huge_activations_take_the_float_path():
    """Inputs above 256 make the one-call layer compute that product in float32 (as the per-op path's split
    does); both agree with the reference kernels' model."""
    _needs_lib()
    q = _quantized("int4-g32")
    for layer in q.model.layers:
        layer.post_attention_layernorm.weight.data.mul_(2000.0)  # the MLP's inputs reach 10³–10⁴
    ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(5))
    dec = Decoder(q)
    dec.prefill(ids[:, :5])
    got = dec.step(ids[:, 5])
    assert dec.layers_native
    with use_kernels("reference"):
        ref = _ref_last(q, ids)
    _close(got, ref, 2e-3)


def test_generate_is_transformers_greedy_and_stops_at_eos():
    m = _model()
    ids = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        ref = m.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert generate(m, ids, 12).tolist() == ref.tolist()
    eos = int(ref[0, 7])  # the third new token: generation ends there
    out = generate(m, ids, 12, eos_token_id=eos)
    assert out.tolist() == ref[:, : 8].tolist()
    g = torch.Generator().manual_seed(0)
    sampled = generate(m, ids, 6, do_sample=True, top_k=5, temperature=0.8, generator=g)
    assert sampled.shape == (1, 11) and sampled[:, :5].tolist() == ids.tolist()


def test_what_it_refuses():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=V)).eval()
    assert "gpt2" in unsupported(gpt2)
    with pytest.raises(lowbit.LowbitError, match="lowbit runtime: model type 'gpt2'"):
        Decoder(gpt2)
    torch.manual_seed(0)
    sliding = MistralForCausalLM(MistralConfig(**SIZES, sliding_window=8)).eval()
    assert unsupported(sliding) == "sliding-window attention"
    dec = Decoder(_model())
    with pytest.raises(lowbit.LowbitError, match="step\\(\\) before prefill"):
        dec.step(torch.tensor([1]))
    with pytest.raises(lowbit.LowbitError, match="ids must be"):
        dec.forward(torch.tensor([1, 2]))


@pytest.mark.parametrize("fused_faster", [True, False])
def test_under_kernel_tuning_the_first_steps_measure_stacked_against_per_layer_kernels(monkeypatch, tmp_path,
                                                                                       fused_faster):
    """With tuning on, the first one-token steps alternate between the stacked C++ path and each layer's own
    measured kernel; the faster is kept for the rest of the sequence (and the next ones). Both compute the model
    within the kernels' bounds: the logits follow transformers' forward either way."""
    from lowbit.runtime import decoder

    _needs_lib()
    monkeypatch.setenv("LOWBIT_KERNEL_TUNING", "on")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))  # the per-layer kernel choices are measured afresh
    q = _quantized("int4-g32")
    dec = Decoder(q)
    real, costs, calls = Decoder._fusing, [], []

    def fusing(self, b, t):  # each trial step costs 1 or 10 on a fake clock: the one that should lose takes 10
        fuse, trial = real(self, b, t)
        if trial is not None:
            costs.append(1.0 if fuse == fused_faster else 10.0)
        return fuse, trial

    def clock():  # read twice per trial step: at its start (0) and at its end (its cost)
        calls.append(None)
        return 0.0 if len(calls) % 2 else costs[len(calls) // 2 - 1]

    monkeypatch.setattr(Decoder, "_fusing", fusing)
    monkeypatch.setattr(decoder, "perf_counter", clock)
    ids = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(5))
    dec.prefill(ids[:, :4])
    seen = []
    for i in range(4, 16):
        got = dec.step(ids[:, i])
        seen.append(dec.layers_native)
        with torch.inference_mode():
            out = q(input_ids=ids[:, :i], use_cache=True)
            ref = cache_step(q, out, ids[:, i:i + 1]).logits[:, -1]
        _close(got, ref, 2e-2)  # per-layer kernels may be torch's bf16 ones
    n = Decoder.TRIAL_STEPS
    assert seen[:n] == [True, False] * (n // 2)  # the trials alternate
    assert all(s == fused_faster for s in seen[n:])  # then the faster path is kept
    assert list(dec._fuse.values()) == [fused_faster]
