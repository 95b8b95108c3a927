import math

import psutil
import torch

from lowbit.eval.speed import decode_ms_per_token, measure_speed, peak_rss_bytes, torch_threads
from tests.eval import tiny_bert, tiny_llama


def test_torch_threads_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_peak_rss_at_least_current():
    assert peak_rss_bytes() >= 0.9 * psutil.Process().memory_info().rss


def test_measure_speed_causal():
    m = tiny_llama(200)
    m.train()
    info = measure_speed(m, torch.randint(0, 200, (2, 48)), context=16, new_tokens=4, repeats=2)
    assert m.training  # mode restored
    assert math.isfinite(info.tokens_per_s) and info.tokens_per_s > 0
    assert info.decode_ms_per_token > 0 and info.threads == 2
    assert set(info.to_dict()) == {"tokens_per_s", "decode_ms_per_token", "peak_rss_bytes", "threads", "load_avg",
                                   "decode_runtime"}
    assert info.decode_runtime == "lowbit"  # a Llama: lowbit's runtime decodes it
    assert measure_speed(m, torch.randint(0, 200, (1, 24)), context=8, new_tokens=2, repeats=1,
                         runtime="transformers").decode_runtime == "transformers"


def test_decode_uses_the_kv_cache():
    # prefill once with the whole prompt, then one token per step with the growing cache
    m = tiny_llama(200)
    seen = []

    def spy(module, args, kwargs):
        past = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append((tuple(kwargs["input_ids"].shape), 0 if past is None else past.get_seq_length()))

    h = m.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        assert decode_ms_per_token(m, torch.randint(0, 200, (16,)), new_tokens=3) > 0
    finally:
        h.remove()
    assert seen == [((1, 16), 0), ((1, 1), 16), ((1, 1), 17), ((1, 1), 18)]


def test_measure_speed_encoder_batches():
    bert = tiny_bert(100)
    batches = [{"input_ids": torch.randint(0, 100, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}]
    info = measure_speed(bert, batches, causal=False, repeats=2)
    assert info.tokens_per_s > 0 and info.decode_ms_per_token is None
