from lowbit.model import sizecalc
from lowbit.model.hfconfig import ConfigError
from lowbit.model.shape import ModelShape, TensorShape, auto_model_class, model_shape, model_task

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300}


def test_tiny_llama_shape():
    s = model_shape(TINY)
    assert isinstance(s, ModelShape) and s.task == "causal-lm" and s.model_type == "llama"
    assert (s.num_layers, s.num_kv_heads, s.head_dim) == (2, 2, 16)
    lin = {t.name: t.shape for t in s.tensors if t.role == "linear"}
    assert lin["model.layers.0.self_attn.k_proj.weight"] == (32, 64)  # 2 kv heads of 16
    assert s.params("head") == 300 * 64 and not s.tied
    assert TensorShape("w", (3, 4), "linear").numel == 12


def test_auto_class_follows_the_task():
    from transformers import BertConfig, LlamaConfig

    assert model_task(BertConfig(architectures=["BertForMaskedLM"])) == "masked-lm"
    assert auto_model_class(LlamaConfig()).__name__ == "AutoModelForCausalLM"
    assert auto_model_class(BertConfig()).__name__ == "AutoModel"


def test_sizecalc_reexports_the_same_objects():
    assert sizecalc.model_shape is model_shape and sizecalc.ModelShape is ModelShape
    assert sizecalc.SizeError is ConfigError and sizecalc.auto_model_class is auto_model_class
    assert all(hasattr(sizecalc, name) for name in sizecalc.__all__)
