"""What a model is made of, from its config alone: its task, the transformers class that builds it, every
parameter's shape by role, and the numbers its KV cache needs.

The model is built on the meta device, so parameter counts are exact for any architecture transformers
knows, with no weights read or allocated.

>>> s = model_shape({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
...                  "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000})
>>> s.params(), s.task, (s.num_layers, s.num_kv_heads, s.head_dim)
(6738415616, 'causal-lm', (32, 32, 128))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from lowbit.model.hfconfig import ConfigError, config_label, load_config

# -- which transformers class a config is loaded with (architecture knowledge as data) ---------------
# (suffix of config.architectures[0], task); the first match wins
ARCH_SUFFIX_TASKS: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForMaskedLM", "masked-lm"),
    ("ForSequenceClassification", "sequence-classification"),
    ("Model", "encoder"),
)
# model types that are encoders even though transformers also registers a causal-LM head for them
ENCODER_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "mpnet",
                                 "distilbert", "albert", "deberta", "deberta-v2", "modernbert", "nomic_bert"})
TASK_AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "encoder": "AutoModel",
}


def model_task(config: Any) -> str:
    """``"causal-lm"``, ``"encoder"``, … from ``config.architectures``, else from ``config.model_type``.

    >>> from transformers import BertConfig, LlamaConfig
    >>> model_task(BertConfig(architectures=["BertModel"])), model_task(LlamaConfig())
    ('encoder', 'causal-lm')
    """
    for arch in getattr(config, "architectures", None) or ():
        for suffix, task in ARCH_SUFFIX_TASKS:
            if arch.endswith(suffix):
                return task
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if model_type in ENCODER_MODEL_TYPES or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "encoder"
    return "causal-lm"


def auto_model_class(config: Any) -> type:
    """The transformers Auto class that builds ``config``'s model (AutoModelForCausalLM, AutoModel, …)."""
    import transformers

    return getattr(transformers, TASK_AUTO_CLASSES[model_task(config)])


# -- shapes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorShape:
    """One parameter. ``role``: linear | embedding | head | other; linear shapes are (out, in)."""

    name: str
    shape: tuple[int, ...]
    role: str
    is_head: bool = False  # the output head, or the input embedding tied to it

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelShape:
    """Every parameter of a model (each shared tensor once) plus what the KV cache needs."""

    name: str
    model_type: str
    task: str
    tensors: tuple[TensorShape, ...]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tied: bool

    def params(self, role: str | None = None) -> int:
        return sum(t.numel for t in self.tensors if role is None or t.role == role)


def model_shape(source: Any) -> ModelShape:
    """Build ``source``'s model on the meta device and list its parameters by role.

    >>> s = model_shape({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    ...                  "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000})
    >>> s.params()
    6738415616
    """
    from accelerate import init_empty_weights
    from transformers.pytorch_utils import Conv1D

    config = load_config(source)
    task = model_task(config)
    try:
        with init_empty_weights():
            model = auto_model_class(config).from_config(config)
        # from_config under init_empty_weights leaves tied weights as two tensors; tie them outside it
        # (inside, accelerate's hook would wrap the shared tensor in a new Parameter again)
        model.tie_weights()
    except (ValueError, KeyError, TypeError, AttributeError, ImportError, RuntimeError) as e:
        raise ConfigError(f"{config_label(source, config)}: transformers cannot build this model ({e})") from None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_w = getattr(head, "weight", None)
    seen: set[int] = set()
    tensors = []
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mname}.{pname}" if mname else pname
            shape = tuple(p.shape)
            if isinstance(module, nn.Embedding):
                role = "embedding"
            elif p is head_w:
                role = "head"
            elif pname == "weight" and len(shape) >= 2:
                role = "linear"
                if isinstance(module, Conv1D):  # GPT-2 stores (in, out)
                    shape = shape[::-1]
                shape = (p.numel() // shape[-1], shape[-1])  # conv / expert stacks as (rows, in)
            else:
                role = "other"
            tensors.append(TensorShape(name, shape, role, is_head=p is head_w))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_heads = int(getattr(text, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(text, "head_dim", None) or (text.hidden_size // n_heads if n_heads else 0))
    return ModelShape(
        name=config_label(source, config), model_type=str(config.model_type), task=task, tensors=tuple(tensors),
        num_layers=int(getattr(text, "num_hidden_layers", 0) or 0), num_kv_heads=kv_heads, head_dim=head_dim,
        tied=head_w is not None and not any(t.role == "head" for t in tensors),
    )
