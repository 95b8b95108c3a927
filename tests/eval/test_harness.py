import copy
import json
import logging
import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.eval import evaluate, metrics
from lowbit.eval.refcache import cache_key, cache_path, model_identity
from tests.eval import perturbed, synthetic_text, tiny_bert, tiny_llama, word_tokenizer

N, L = 3, 64


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def text():
    return synthetic_text(300)


@pytest.fixture(scope="module")
def llama(tok):
    return tiny_llama(len(tok))


def _eval(model, ref, tok, text, tmp_path, **kw):
    kw.setdefault("speed", False)
    return evaluate(model, ref, tok, text, windows=N, window_len=L, cache_dir=tmp_path, **kw)


def test_against_itself_kl_zero(llama, tok, text, tmp_path):
    r = _eval(llama, copy.deepcopy(llama), tok, text, tmp_path)
    assert r.kind == "causal" and r.n_windows == N and r.positions == N * (L - 1)
    assert r.kl_mean == 0.0 and r.kl_p99 == 0.0 and r.top1 == 1.0 and r.kl_exact is True
    assert r.perplexity == r.reference.perplexity and r.delta_ppl == 0.0
    assert r.reference.label == "reference"


def test_perplexity_matches_hf_loss(llama, tok, text, tmp_path):
    from lowbit.eval import token_windows

    r = _eval(llama, None, tok, text, tmp_path)
    w = token_windows(tok, text, N, L)
    with torch.no_grad():
        losses = [llama(input_ids=w[i : i + 1], labels=w[i : i + 1]).loss.item() for i in range(N)]
    assert r.perplexity == pytest.approx(math.exp(sum(losses) / N), rel=1e-5)
    assert r.reference is None and r.kl_mean is None and r.top1 is None


def test_perturbed_copy_exact_kl_by_hand(llama, tok, text, tmp_path):
    q = perturbed(llama, scale=0.3)
    r = _eval(q, llama, tok, text, tmp_path, worst=2)
    assert r.kl_mean > 0 and r.kl_p99 >= r.kl_mean and r.top1 < 1.0
    from lowbit.eval import token_windows

    w = token_windows(tok, text, N, L)
    with torch.no_grad():
        lr = metrics.log_probs(llama(input_ids=w).logits[:, :-1])  # (N, L-1, V)
        lq = metrics.log_probs(q(input_ids=w).logits[:, :-1])
    kl = metrics.kl_divergence(lr, lq)  # (N, L-1)
    assert r.kl_mean == pytest.approx(kl.mean().item(), rel=1e-6)
    assert r.window_kl == pytest.approx(kl.mean(-1).tolist(), rel=1e-6)
    assert r.top1 == pytest.approx((lr.argmax(-1) == lq.argmax(-1)).double().mean().item())
    assert [x.index for x in r.worst] == kl.mean(-1).argsort(descending=True)[:2].tolist()
    assert r.worst[0].kl_mean >= r.worst[1].kl_mean and r.worst[0].snippet
    assert r.kl_positions.shape == (N * (L - 1),)
    json.dumps(r.to_dict())  # plain data


def test_cached_reference_path(llama, tok, text, tmp_path):
    q = perturbed(llama, scale=0.3)
    calls = []
    handle = llama.register_forward_hook(lambda *a: calls.append(1))
    try:
        exact = _eval(q, llama, tok, text, tmp_path, topk=8)
        assert len(calls) == N
        files = list((tmp_path / "reference").glob("*.safetensors"))
        assert len(files) == 1 and files[0].stat().st_size < 200_000  # compact: no full distributions
        calls.clear()
        approx = _eval(q, llama, tok, text, tmp_path, topk=8, exact_kl=False)
        assert calls == []  # the reference was not run
    finally:
        handle.remove()
    assert approx.kl_exact is False and exact.kl_exact is True
    assert approx.reference.perplexity == pytest.approx(exact.reference.perplexity, rel=1e-12)
    assert approx.perplexity == exact.perplexity and approx.top1 == exact.top1
    assert 0 < approx.kl_mean <= exact.kl_mean + 1e-12
    assert approx.kl_mean > 0.5 * exact.kl_mean


def test_cached_full_vocab_is_exact(llama, tok, text, tmp_path):
    q = perturbed(llama, scale=0.3)
    for k in (len(tok), len(tok) + 10):  # k = V, and k > V (padded entries carry no mass)
        exact = _eval(q, llama, tok, text, tmp_path, topk=k)
        approx = _eval(q, llama, tok, text, tmp_path, topk=k, exact_kl=False)
        assert approx.kl_exact is False and approx.kl_mean == pytest.approx(exact.kl_mean, rel=1e-4)


def test_cache_key_tracks_weights_and_tokens(llama):
    w = torch.randint(0, 50, (2, 16))
    assert cache_key(llama, w, 8) == cache_key(copy.deepcopy(llama), w, 8)
    assert model_identity(perturbed(llama, scale=1e-3)) != model_identity(llama)
    assert cache_key(llama, w, 8) != cache_key(llama, w.flip(0), 8) != cache_key(llama, w, 16)


def test_identity_independent_of_thread_count(llama):
    from lowbit.eval.speed import torch_threads

    with torch_threads(1):
        one = model_identity(llama)
    with torch_threads(2):
        assert model_identity(llama) == one


def test_corrupt_cache_is_ignored(llama, tok, text, tmp_path, caplog):
    q = perturbed(llama, scale=0.3)
    first = _eval(q, llama, tok, text, tmp_path, topk=8)
    (f,) = (tmp_path / "reference").glob("*.safetensors")
    f.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        again = _eval(q, llama, tok, text, tmp_path, topk=8, exact_kl=False)
    assert "ignoring unreadable reference cache" in caplog.text
    assert again.kl_exact is True and again.kl_mean == first.kl_mean  # fell back to running the reference
    assert f.stat().st_size > 100  # and rewrote the cache


def test_inputs_path_tensor_and_env_cache(llama, tok, text, tmp_path, monkeypatch):
    from lowbit.eval import token_windows

    p = tmp_path / "t.txt"
    p.write_text(text)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "envcache"))
    a = evaluate(llama, llama, tok, p, windows=N, window_len=L, speed=False)
    assert evaluate(llama, None, tok, str(p), windows=N, window_len=L, speed=False).perplexity == a.perplexity
    with pytest.raises(LowbitError, match="missing.txt: no such text file"):
        evaluate(llama, None, tok, "missing.txt", windows=N, window_len=L, speed=False)
    assert len(list((tmp_path / "envcache" / "reference").glob("*.safetensors"))) == 1
    b = evaluate(llama, llama, None, token_windows(tok, text, N, L), speed=False, cache_dir=False)
    assert a.perplexity == b.perplexity and b.worst[0].snippet == ""
    assert cache_path(tmp_path, "k").name == "k.safetensors"


def test_errors(llama, tok, text, tmp_path):
    with pytest.raises(LowbitError, match="tokenizer is needed"):
        evaluate(llama, text=text, windows=1, window_len=L, speed=False)
    with pytest.raises(LowbitError, match="no evaluation text"):
        evaluate(llama, tokenizer=tok, speed=False)
    with pytest.raises(LowbitError, match="kind must be"):
        evaluate(llama, tokenizer=tok, text=text, kind="seq2seq")
    other = tiny_llama(len(tok) + 5)
    with pytest.raises(LowbitError, match="vocab sizes differ"):
        _eval(llama, other, tok, text, tmp_path)
    with pytest.raises(LowbitError, match="text gives .* tokens"):
        evaluate(llama, None, tok, "the the the", windows=1, window_len=L, speed=False)


def test_modes_restored_and_speed_ratios(llama, tok, text, tmp_path):
    q = perturbed(llama, scale=0.01)
    q.train()
    threads = torch.get_num_threads()
    r = evaluate(q, llama, tok, text, windows=2, window_len=L, cache_dir=False, speed=True)
    assert q.training and not llama.training and torch.get_num_threads() == threads
    assert r.speed.tokens_per_s > 0 and r.speed.decode_ms_per_token > 0 and r.speed.threads == 2
    assert r.reference.forward_speedup == 1.0
    assert r.forward_speedup == pytest.approx(r.speed.tokens_per_s / r.reference.speed.tokens_per_s)
    assert r.decode_speedup > 0 and r.peak_rss_bytes > 0
    assert r.size.total_bytes == r.reference.size.total_bytes > 0


def test_encoder_path(tok, text):
    bert = tiny_bert(len(tok))
    same = evaluate(bert, copy.deepcopy(bert), tok, text, speed=False, sentences_n=40)
    assert same.kind == "encoder" and same.n_windows == 40
    assert same.cos_mean == pytest.approx(1.0, abs=1e-12) and same.cos_min == pytest.approx(1.0, abs=1e-12)
    assert same.nn_agreement == 1.0 and same.perplexity is None and same.kl_mean is None
    noisy = perturbed(bert, scale=2.0, name_filter="dense")
    r = evaluate(noisy, bert, tok, text, speed=True, sentences_n=40)
    assert r.cos_min <= r.cos_mean < 1.0 and 0.0 <= r.nn_agreement <= 1.0
    assert r.speed.tokens_per_s > 0 and r.speed.decode_ms_per_token is None and r.forward_speedup > 0
    alone = evaluate(bert, None, tok, text, speed=False, sentences_n=10)
    assert alone.cos_mean is None and alone.reference is None
    with pytest.raises(LowbitError, match="encoder needs text"):
        evaluate(bert, bert, None, text, speed=False)
