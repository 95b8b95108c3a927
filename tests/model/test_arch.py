import dataclasses

import pytest

from lowbit.errors import LowbitError
from lowbit.model.arch import FAMILIES, arch_for_type, register_arch


def test_families_by_name_and_model_type():
    assert FAMILIES.names() == ["bert", "gemma", "gpt2", "llama", "phi3"]
    assert list(FAMILIES) == ["llama", "gemma", "phi3", "gpt2", "bert"]  # the table's order
    assert arch_for_type("mistral") is FAMILIES.get("llama")
    assert arch_for_type("gemma3_text").family == "gemma" and not FAMILIES.get("bert").causal
    assert arch_for_type("oddformer") is None and arch_for_type(None) is None
    with pytest.raises(LowbitError, match=r"^unknown architecture family 'oddformer' \(known: bert, gemma, "):
        FAMILIES.get("oddformer")


def test_a_family_or_model_type_registers_once():
    llama = FAMILIES.get("llama")
    with pytest.raises(LowbitError, match="architecture family 'llama' is already registered"):
        register_arch(dataclasses.replace(llama, model_types=("llama-next",)))
    with pytest.raises(LowbitError, match="model type 'qwen2' is already in family 'llama'"):
        register_arch(dataclasses.replace(llama, family="qwen", model_types=("qwen2",)))
    assert "qwen" not in FAMILIES and arch_for_type("llama-next") is None  # nothing half-registered
