"""The real models: SmolLM2-135M (GGUF → float) and all-MiniLM-L6-v2, quantized end to end."""

import pytest
import torch

import lowbit
from lowbit.cli.assets import wikitext
from lowbit.eval.windows import read_text, token_windows
from lowbit.methods.registry import MethodConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return lowbit.load(smollm2_dir)


@pytest.fixture(scope="module")
def texts():
    return read_text(wikitext("valid")), read_text(wikitext("test"))


def test_smollm2_gptq_int4_end_to_end(tmp_path, smol, texts):
    model, tok = smol
    calib, held = texts
    qmodel, report = lowbit.quantize(model, tok, scheme="int4-g64-sym", method="gptq", calib=calib[:200_000],
                                     windows=8, window_len=256, progress=False)
    assert report.calib_windows == 8 and report.linear_bpw == pytest.approx(4.25, abs=0.01)
    lowbit.save(qmodel, tmp_path / "q", tokenizer=tok, report=report)
    back, btok = lowbit.load(tmp_path / "q")
    ids = token_windows(tok, held, 1, 64)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, qmodel(ids).logits)
    r = lowbit.evaluate(back, reference=model, tokenizer=btok, text=held, windows=2, window_len=256, speed=False,
                        cache_dir=False, progress=False)
    # symmetric 4-bit on a 135M model whose weights sit on an asymmetric grid: measured KL 0.33 on these
    # two windows (see bench/RESULTS.md for the 40-window figures); far from random (KL ≈ 5 at random)
    assert 0.01 < r.kl_mean < 0.45
    assert r.top1 > 0.7
    assert r.perplexity < 1.5 * r.reference.perplexity
    # asked as the instruct model is meant to be asked (its chat template): a bare "The capital of France is"
    # continuation flips with the thread count (float summation order) on this small model, before and after
    q = btok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                 add_generation_prompt=True, return_tensors="pt")
    q = q if torch.is_tensor(q) else q["input_ids"]
    answer = back.generate(q, max_new_tokens=12, do_sample=False)
    assert "Paris" in btok.decode(answer[0, q.shape[1]:])


@pytest.fixture(scope="module")
def held(smol, texts):
    """Two held-out windows × 256 tokens and the float model's log-probabilities on them."""
    model, tok = smol
    ids = token_windows(tok, texts[1], 2, 256)
    with torch.no_grad():
        return ids, model(ids).logits.log_softmax(-1)


def kl(m, held) -> float:
    ids, ref = held
    with torch.no_grad():
        lp = m(ids).logits.log_softmax(-1)
    return float((ref.exp() * (ref - lp)).sum(-1).mean())


@pytest.fixture(scope="module")
def rtn_int4(smol, held):
    q, _ = lowbit.quantize(smol[0], smol[1], scheme="int4-g128", method="rtn", progress=False)
    return kl(q, held)


def test_smollm2_rtn_int3_worse_than_gptq_int3(smol, texts, held):
    model, tok = smol
    rtn, _ = lowbit.quantize(model, tok, scheme="int3-g64", method="rtn", progress=False)
    gptq, _ = lowbit.quantize(model, tok, scheme="int3-g64", method="gptq", calib=texts[0][:200_000], windows=8,
                              window_len=256, progress=False)
    # only 8 × 256 calibration tokens (a rank-starved Hessian); issue 4's target (>= 30% below RTN at
    # 128 × 512 tokens) is a benchmark figure (bench/RESULTS.md: 55% at 32 windows), not asserted here
    assert kl(gptq, held) < 0.9 * kl(rtn, held)


def test_smollm2_awq_and_data_free_methods_beat_rtn(smol, texts, held, rtn_int4):
    # bench/RESULTS.md (40 windows, int4-g128): RTN 0.341, AWQ 0.158; the data-free rows there too
    model, tok = smol
    awq, _ = lowbit.quantize(model, tok, scheme="int4-g128", method="awq", calib=texts[0][:200_000], windows=8,
                             window_len=256, progress=False)
    assert kl(awq, held) < 0.95 * rtn_int4  # measured 0.312 vs 0.354 with only 8 × 256 calibration tokens
    # no data at all: E[x²] from seeded random tokens, importance-weighted RTN with MSE clipping
    free, report = lowbit.quantize(model, tok, scheme="int4-g128", method="rtn", calib="random", windows=8,
                                   window_len=256, config=MethodConfig(observer="mse", importance=True),
                                   progress=False)
    assert report.calib_windows == 8
    assert kl(free, held) < 0.9 * rtn_int4


def test_smollm2_smoothquant_w8a8_beats_plain_w8a8(smol, texts, held):
    # bench/RESULTS.md: plain int8-dynamic W8A8 KL 0.0296, SmoothQuant (alpha 0.5) 0.0125
    model, tok = smol
    plain, _ = lowbit.quantize(model, tok, scheme="int8", method="rtn",
                               config=MethodConfig(options={"act": "int8-dynamic"}), progress=False)
    smooth, _ = lowbit.quantize(model, tok, scheme="int8", method="smoothquant", calib=texts[0][:200_000],
                                windows=8, window_len=256, config=MethodConfig(options={"act": "int8-dynamic"}),
                                progress=False)
    k_plain, k_smooth = kl(plain, held), kl(smooth, held)
    assert k_smooth < 0.8 * k_plain < 0.08


def test_minilm_int8_and_int4_embeddings(minilm_dir, texts):
    model, tok = lowbit.load(minilm_dir)
    held = texts[1]
    q8, _ = lowbit.quantize(model, tok, scheme="int8", progress=False)
    q4, _ = lowbit.quantize(model, tok, scheme="int4-g32", method="rtn", progress=False)
    r8 = lowbit.evaluate(q8, reference=model, tokenizer=tok, text=held, sentences_n=64, speed=False, progress=False)
    r4 = lowbit.evaluate(q4, reference=model, tokenizer=tok, text=held, sentences_n=64, speed=False, progress=False)
    assert r8.cos_mean > 0.995
    assert 0.9 < r4.cos_mean < r8.cos_mean
