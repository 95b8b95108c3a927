import json

import pytest
import torch
import transformers

from lowbit.errors import LowbitError, SchemeError
from lowbit.model.plan import Plan, Rule


@pytest.fixture(scope="module")
def llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=100, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_default_plan_keeps_edges_at_8_bits(llama):
    plan = Plan.default("int4-g32", "rtn", embeddings=("model.embed_tokens",), head="lm_head")
    r = plan.resolve(llama)
    assert r["model.layers.0.mlp.down_proj"].scheme.name == "int4-g32"
    assert r["model.embed_tokens"].scheme.name == "int8"
    assert r["lm_head"].scheme.name == "int8"
    wide = Plan.default("bf16", embeddings=("model.embed_tokens",), head="lm_head").resolve(llama)
    assert wide["lm_head"].scheme.name == "bf16"


def test_last_matching_rule_wins(llama):
    plan = Plan.default("int4-g32", embeddings=("model.embed_tokens",), head="lm_head").with_rules(
        ["mlp.down_proj=int8", "re:layers\\.1\\..*q_proj=int3-g32", "lm_head=int4-g32"], keep=["model.layers.0.*"])
    r = plan.resolve(llama)
    assert r["model.layers.1.mlp.down_proj"].scheme.name == "int8"
    assert r["model.layers.1.self_attn.q_proj"].scheme.name == "int3-g32"
    assert r["model.layers.0.self_attn.q_proj"].scheme is None  # kept in float
    assert r["lm_head"].scheme.name == "int4-g32"
    assert "model.layers.0.mlp.down_proj" in r


def test_json_round_trip_and_hand_edit(tmp_path, llama):
    plan = Plan.default("int4-g32", "rtn", head="lm_head").with_rules(["mlp.up_proj=int8"])
    p = tmp_path / "plan.json"
    plan.to_json(p)
    assert Plan.from_json(p) == plan
    d = json.loads(p.read_text())
    d["rules"].append({"pattern": "k_proj", "scheme": None})
    p.write_text(json.dumps(d))
    assert Plan.from_json(p).resolve(llama)["model.layers.1.self_attn.k_proj"].scheme is None


def test_bad_plans_are_clear(tmp_path):
    with pytest.raises(SchemeError, match="PATTERN=SCHEME"):
        Plan.default("int8").with_rules(["down_proj"])
    with pytest.raises(SchemeError, match="cannot parse scheme"):
        Plan.default("int8").with_rules(["down_proj=int9"])
    with pytest.raises(SchemeError, match="unknown method"):
        Rule("x", "int8", "magic")
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(LowbitError, match="bad.json"):
        Plan.from_json(p)
    with pytest.raises(LowbitError, match="no such plan"):
        Plan.from_json(tmp_path / "none.json")


def test_unmatched_patterns_are_reported(llama):
    plan = Plan.default("int8").with_rules(["mlp.dwn_proj=int4-g32"])
    assert plan.unmatched_patterns(llama) == ["mlp.dwn_proj"]
