"""A transformers config from whatever names a model: a config object or dict, a config.json, a model folder,
a ``.gguf`` file or a hub id — and a short label for it.

>>> load_config({"model_type": "llama", "hidden_size": 64}).hidden_size
64
>>> config_label("models/Llama-2-7b-hf/config.json", None)
'Llama-2-7b-hf'
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from lowbit.core.jsonio import JSONFileError, read_json
from lowbit.errors import LowbitError, first_line

# folder names that say nothing about the model: its label adds the parent folder (``minilm/model``)
GENERIC_DIR_NAMES = frozenset({"model", "models", "hf", "float", "weights", "checkpoint", "snapshot"})


class ConfigError(LowbitError, ValueError):
    """A config that cannot be read, or a model transformers cannot build from it."""


def load_config(source: Any) -> Any:
    """A transformers config from a config object, a dict, a config.json, a model folder, a .gguf or a hub id.

    >>> load_config({"model_type": "llama", "hidden_size": 64}).hidden_size
    64
    """
    from transformers import PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    config = _read_config(source)
    check_config_sizes(config, source if isinstance(source, str | os.PathLike) else "config")
    return config


def _config_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for a config it refuses: its strict dataclasses' validation errors too."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub: configs are not strict dataclasses
        return ()
    return (StrictDataclassError,)


_CONFIG_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, ZeroDivisionError,
                  OverflowError, *_config_errors())


def _read_config(source: Any) -> Any:
    from transformers import AutoConfig

    try:
        if isinstance(source, dict):
            d = dict(source)
            if not isinstance(d.get("model_type"), str):
                raise ConfigError("config dict has no 'model_type'")
            return AutoConfig.for_model(d.pop("model_type"), **d)
        text = os.fspath(source)
        p = Path(text).expanduser()
        if not p.exists() and (p.suffix in (".json", ".gguf") or text.startswith(("/", ".", "~"))):
            raise ConfigError(f"{p}: no such file or directory")
        if p.is_file() and p.suffix == ".json":
            d = read_json(p)
            if not isinstance(d, dict) or not isinstance(d.get("model_type"), str):
                raise ConfigError(f"{p}: not a transformers config (no 'model_type')")
            return _read_config(d)
        if p.is_file() and p.suffix == ".gguf":
            return AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise ConfigError(f"{p}: no config.json in this folder")
            read_json(p / "config.json")
            return AutoConfig.from_pretrained(str(p), trust_remote_code=False)
        if p.exists():
            raise ConfigError(f"{p}: unknown file type (expected config.json, a model folder or a .gguf)")
        return AutoConfig.from_pretrained(str(source), trust_remote_code=False)  # a hub id (needs network)
    except JSONFileError as e:
        raise ConfigError(f"{source}: cannot read a model config ({str(e).split(': ', 1)[-1]})") from None
    except LowbitError:
        raise
    except _CONFIG_ERRORS as e:
        raise ConfigError(f"{source}: cannot read a model config ({first_line(e)})") from None


# sizes a config may state, with bounds no real model comes near (the largest today: ~130 layers, 262k tokens,
# 25k hidden, 10M positions): a config beyond them is corrupt, and building its model would exhaust memory
CONFIG_SIZE_LIMITS = {
    "num_hidden_layers": 1024, "n_layer": 1024, "num_layers": 1024,
    "vocab_size": 1 << 22, "type_vocab_size": 1 << 22,
    "hidden_size": 1 << 17, "n_embd": 1 << 17, "d_model": 1 << 17, "intermediate_size": 1 << 20, "n_inner": 1 << 20,
    "num_attention_heads": 4096, "n_head": 4096, "num_key_value_heads": 4096, "head_dim": 1 << 14,
    "max_position_embeddings": 1 << 24, "n_positions": 1 << 24,
    "num_experts": 4096, "num_local_experts": 4096,
}
_MAY_BE_ZERO = frozenset({"num_hidden_layers", "n_layer", "num_layers", "type_vocab_size", "num_experts",
                          "num_local_experts"})


def check_config_sizes(config: Any, where: str | os.PathLike) -> None:
    """Every size ``config`` (and its text config) states is a positive integer within
    :data:`CONFIG_SIZE_LIMITS`; raises ConfigError naming the field otherwise. Run before building a model.

    >>> from transformers import LlamaConfig
    >>> check_config_sizes(LlamaConfig(num_hidden_layers=40000), "config.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    lowbit.model.hfconfig.ConfigError: config.json: field 'num_hidden_layers' is 40000, more than any ... 1024)
    """
    bad = _out_of_range(config.__dict__)
    if bad is not None:
        raise ConfigError(f"{where}: field {bad[0]!r} is {bad[1]!r}, beyond a 64-bit number")
    subs = [config]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:
        subs.append(text)
    for cfg in subs:
        for key, limit in CONFIG_SIZE_LIMITS.items():
            value = getattr(cfg, key, None) if key in cfg.__dict__ else None
            if value is None:
                continue
            if type(value) is not int or value < (0 if key in _MAY_BE_ZERO else 1):
                kind = "a non-negative" if key in _MAY_BE_ZERO else "a positive"
                raise ConfigError(f"{where}: field {key!r} must be {kind} integer, got {value!r}")
            if value > limit:
                raise ConfigError(f"{where}: field {key!r} is {value}, more than any model has (limit {limit})")
        pad, vocab = cfg.__dict__.get("pad_token_id"), cfg.__dict__.get("vocab_size")
        if pad is not None and (type(pad) is not int or (type(vocab) is int and not -vocab <= pad < vocab)):
            raise ConfigError(f"{where}: field 'pad_token_id' {pad!r} is not a token id of the "
                              f"{vocab}-token vocabulary")
    archs = getattr(config, "architectures", None)
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise ConfigError(f"{where}: field 'architectures' must be a list of class names, got {archs!r}")


def _out_of_range(d: dict[str, Any]) -> tuple[str, Any] | None:
    """The first (field, value) holding an integer outside int64 or a non-finite float (torch cannot take them)."""
    stack: list[tuple[str, Any]] = list(d.items())
    while stack:
        key, v = stack.pop()
        if isinstance(v, dict):
            stack.extend((f"{key}.{k}", x) for k, x in v.items())
        elif isinstance(v, list | tuple):
            stack.extend((key, x) for x in v)
        elif (type(v) is int and not -(2**63) <= v < 2**63) or (type(v) is float and not math.isfinite(v)):
            return key, v
    return None


def config_label(source: Any, config: Any) -> str:
    """The model's name for tables: the folder (with its parent if generic) or file name, else the config's
    ``name_or_path`` or ``model_type``."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(os.fspath(source))
        if p.name == "config.json":
            p = p.parent
        if p.name in GENERIC_DIR_NAMES and p.parent.name:
            return f"{p.parent.name}/{p.name}"
        return p.name or str(source)
    return str(getattr(config, "name_or_path", "") or getattr(config, "model_type", "model"))
