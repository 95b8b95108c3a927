"""The one calibration runner on every family in the architecture table (tiny random configs)."""

import pytest
import torch
import transformers

from lowbit.errors import LowbitError
from lowbit.methods.registry import MethodConfig
from lowbit.model.arch import arch_for
from lowbit.model.plan import Plan
from lowbit.model.qmodules import QLinear
from lowbit.model.quantize import quantize_model

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(num_key_value_heads=2)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(num_key_value_heads=2)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(num_key_value_heads=2)),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(num_key_value_heads=2, head_dim=16)),
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                    dict(num_key_value_heads=2, head_dim=16)),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(num_key_value_heads=4, pad_token_id=0)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=256)),
    "bert": (transformers.BertConfig, transformers.BertModel, {}),
}


def build(family: str):
    cfg_cls, model_cls, extra = FAMILIES[family]
    kw = dict(COMMON)
    if family == "gpt2":
        kw = {}
    kw.update(extra)
    torch.manual_seed(0)
    return model_cls(cfg_cls(**kw)).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_runner_quantizes_every_family(family):
    model = build(family)
    info = arch_for(model)
    ids = torch.randint(5, 256, (6, 16))
    with torch.no_grad():
        ref = model(ids)
    ref = ref.logits if hasattr(ref, "logits") else ref.last_hidden_state
    plan = Plan.default("int8", "rtn", config=MethodConfig("mse", importance=True),
                        embeddings=info.embeddings, head=info.head)
    report = quantize_model(model, plan, calib=ids, batch_size=4, progress=False)
    linears = [n for n, m in model.named_modules() if isinstance(m, QLinear)]
    assert len(linears) >= 2 * 4  # every block's linear layers (plus the head)
    assert report.calib_tokens == ids.numel()
    with torch.no_grad():
        out = model(ids)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.97, f"{family}: int8 output drifted (cos {cos:.4f})"


def test_unknown_family_names_what_to_add():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.PretrainedConfig()
            self.config.model_type = "oddformer"
            self.lin = torch.nn.Linear(8, 8)

    with pytest.raises(LowbitError, match=r"oddformer.*arch\.py"):
        quantize_model(Odd(), Plan.default("int8", "rtn", config=MethodConfig(importance=True)),
                       calib=torch.zeros(1, 4, dtype=torch.long), progress=False)
    # data-free methods need no table entry
    report = quantize_model(Odd(), Plan.default("int8", "rtn"), progress=False)
    assert [r.name for r in report.layers] == ["lin"]
