"""The real models: SmolLM2-135M (GGUF → float) and all-MiniLM-L6-v2, quantized end to end."""

import pytest
import torch

import lowbit
from lowbit.assets import wikitext
from lowbit.eval.windows import read_text, token_windows

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
    answer = back.generate(tok("The capital of France is", return_tensors="pt").input_ids, max_new_tokens=5,
                           do_sample=False)
    assert "Paris" in btok.decode(answer[0])


def test_smollm2_rtn_int3_worse_than_gptq_int3(smol, texts):
    model, tok = smol
    calib, held = texts
    ids = token_windows(tok, held, 2, 256)
    with torch.no_grad():
        ref = model(ids).logits.log_softmax(-1)

    def kl(m):
        with torch.no_grad():
            lp = m(ids).logits.log_softmax(-1)
        return float((ref.exp() * (ref - lp)).sum(-1).mean())

    rtn, _ = lowbit.quantize(model, tok, scheme="int3-g64", method="rtn", progress=False)
    gptq, _ = lowbit.quantize(model, tok, scheme="int3-g64", method="gptq", calib=calib[:200_000], windows=8,
                              window_len=256, progress=False)
    # measured: RTN 1.18, GPTQ 1.02 with only 8 × 256 calibration tokens (a rank-starved Hessian);
    # issue 4's target (≥ 30% below RTN at 128 × 512 tokens) is a benchmark figure, not asserted here
    assert kl(gptq) < 0.95 * kl(rtn)


def test_minilm_int8_and_int4_embeddings(minilm_dir, texts):
    model, tok = lowbit.load(minilm_dir)
    held = texts[1]
    q8, _ = lowbit.quantize(model, tok, scheme="int8", progress=False)
    q4, _ = lowbit.quantize(model, tok, scheme="int4-g32", method="rtn", progress=False)
    r8 = lowbit.evaluate(q8, reference=model, tokenizer=tok, text=held, sentences_n=64, speed=False, progress=False)
    r4 = lowbit.evaluate(q4, reference=model, tokenizer=tok, text=held, sentences_n=64, speed=False, progress=False)
    assert r8.cos_mean > 0.995
    assert 0.9 < r4.cos_mean < r8.cos_mean
