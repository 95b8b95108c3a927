"""Every family in the architecture table, quantized, computes what its float model computes.

Tiny models with the families' real quirks (see ``tests/model/families.py``): Gemma's embedding scale and
soft-capping, Qwen2's biases, Phi-3's fused projections, GPT-2's Conv1D, BERT's encoder. Every layer is
quantized, embeddings and head included. Bounds (mean KL per token on random ids; BERT: relative error of
last_hidden_state), measured with these seeds (int8 / int4-g32): decoders 0.7-2.5e-4 / 1.2-4.5e-2, BERT
7.2e-3 / 7.6e-2. Dropping Gemma's embed_scale gives KL 0.18-0.20 at int8 and more at int4, so either bound
catches it; dropping Qwen2's biases gives 5e-2.
"""

import copy

import pytest
import torch
import transformers

import lowbit
from lowbit.errors import LowbitError
from lowbit.methods.registry import MethodConfig
from lowbit.model.arch import arch_for
from lowbit.model.plan import Plan, Rule
from lowbit.model.qmodules import QEmbedding, QLinear
from lowbit.model.quantize import quantize_model
from tests.model.families import DECODERS, FAMILIES, build, mean_kl, outputs, random_ids, rel_error

BOUNDS = {"int8": 1e-3, "int4-g32": 8e-2}  # mean KL, decoders
BERT_BOUNDS = {"int8": 2e-2, "int4-g32": 0.15}  # relative error of last_hidden_state


def every_layer(scheme: str) -> Plan:
    return Plan((Rule("*", scheme),))


def check_close(family: str, ref: torch.Tensor, got: torch.Tensor, scheme: str) -> None:
    if family == "bert":
        err = rel_error(ref, got)
        assert err < BERT_BOUNDS[scheme], f"{family} {scheme}: relative error {err:.3g}"
    else:
        kl = mean_kl(ref, got)
        assert kl < BOUNDS[scheme], f"{family} {scheme}: KL {kl:.3g} to the float model"


@pytest.mark.parametrize("scheme", list(BOUNDS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantized_family_computes_what_float_computes(family, scheme):
    model = build(family)
    ids = random_ids()
    ref = outputs(model, ids)
    report = quantize_model(model, every_layer(scheme), progress=False)
    assert not report.kept and not report.warnings
    assert not [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Embedding)]
    check_close(family, ref, outputs(model, ids), scheme)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_keeps_embedding_scale_and_softcapping(family):
    model = build(family)
    assert model.config.final_logit_softcapping == 30.0
    ids = random_ids()
    ref = outputs(model, ids)
    quantize_model(model, every_layer("int8"), progress=False)
    emb = model.get_input_embeddings()
    assert isinstance(emb, QEmbedding) and float(emb.embed_scale) == pytest.approx(8.0)  # √hidden
    got = outputs(model, ids)
    assert got.abs().max() <= 30.0  # soft-capped logits (the cap lives in the model's forward)
    assert model.lm_head.qweight is emb.qweight  # tied head: one quantized tensor
    emb.embed_scale = None  # what issue 11 saw: the scale gone
    assert mean_kl(ref, outputs(model, ids)) > 30 * BOUNDS["int8"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_load_keeps_behaviour(family, tmp_path):
    model = build(family)
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and family != "bert"
    ids = random_ids()
    quantize_model(model, every_layer("int4-g32"), progress=False)
    want = outputs(model, ids)
    lowbit.save(model, tmp_path / "q")
    back, _ = lowbit.load(tmp_path / "q")
    got = outputs(back, ids)
    assert torch.equal(got, want), f"{family}: {rel_error(want, got):.3g}"
    if tied:
        assert back.get_output_embeddings().qweight is back.get_input_embeddings().qweight
    emb = back.get_input_embeddings()
    assert emb.padding_idx == build(family).get_input_embeddings().padding_idx


@pytest.mark.parametrize("family", DECODERS)
def test_calibrated_runner_on_every_family(family):
    """The block-by-block runner (importance-weighted RTN reads E[x²]) keeps the same bound."""
    model = build(family)
    info = arch_for(model)
    ids = random_ids(6, 16)
    ref = outputs(model, ids)
    plan = Plan.default("int8", "rtn", config=MethodConfig("mse", importance=True),
                        embeddings=info.embeddings, head=info.head)
    report = quantize_model(model, plan, calib=ids, batch_size=4, progress=False)
    assert len([m for m in model.modules() if isinstance(m, QLinear)]) >= 2 * 4
    assert report.calib_tokens == ids.numel()
    check_close(family, ref, outputs(model, ids), "int8")


def test_streamed_gemma_equals_eager(tmp_path):
    model = build("gemma3_text")
    model.save_pretrained(tmp_path / "f")
    eager = copy.deepcopy(model)
    quantize_model(eager, every_layer("int8"), progress=False)
    lazy, _ = lowbit.load(tmp_path / "f", lazy=True)
    quantize_model(lazy, every_layer("int8"), progress=False)
    ids = random_ids()
    assert torch.equal(outputs(lazy, ids), outputs(eager, ids))


# -- layers lowbit cannot keep ---------------------------------------------------------------------------
class ClampedEmbedding(torch.nn.Embedding):
    def forward(self, ids):
        return super().forward(ids).clamp(-0.1, 0.1)


class FakeScaledWordEmbedding(torch.nn.Embedding):
    """Named like transformers' scaled embeddings, but adds instead of multiplying: the probe refuses it."""

    def __init__(self, *a):
        super().__init__(*a)
        self.embed_scale = torch.tensor(3.0)

    def forward(self, ids):
        return super().forward(ids) + self.embed_scale


def test_unknown_subclass_with_own_forward_is_refused():
    model = build("llama")
    model.model.embed_tokens = ClampedEmbedding(272, 64)
    with pytest.raises(LowbitError, match=r"layer model\.embed_tokens: ClampedEmbedding overrides "
                                          r"Embedding\.forward.*--keep model\.embed_tokens"):
        quantize_model(model, every_layer("int8"), progress=False)
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)  # refused before anything changed
    report = quantize_model(model, every_layer("int8").with_rules(keep=["model.embed_tokens"]), progress=False)
    assert "model.embed_tokens" in report.kept


def test_a_conversion_that_does_not_reproduce_the_forward_is_refused():
    model = build("llama")
    model.model.embed_tokens = FakeScaledWordEmbedding(272, 64)
    with pytest.raises(LowbitError, match=r"model\.embed_tokens: the quantized QEmbedding does not reproduce "
                                          r"FakeScaledWordEmbedding's forward"):
        quantize_model(model, Plan((Rule("*", "int8", kind="embedding"),)), progress=False)


def test_linear_subclass_with_own_forward_is_refused():
    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    model.lm_head = Doubled(32, 64, bias=False)
    with pytest.raises(LowbitError, match=r"layer lm_head: Doubled overrides Linear\.forward"):
        quantize_model(model, every_layer("int8"), progress=False)


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
