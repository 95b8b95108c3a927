"""A transformers config from whatever names a model: a config object or dict, a config.json, a model folder,
a ``.gguf`` file or a hub id — and a short label for it.

>>> load_config({"model_type": "llama", "hidden_size": 64}).hidden_size
64
>>> config_label("models/Llama-2-7b-hf/config.json", None)
'Llama-2-7b-hf'
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

# folder names that say nothing about the model: its label adds the parent folder (``minilm/model``)
GENERIC_DIR_NAMES = frozenset({"model", "models", "hf", "float", "weights", "checkpoint", "snapshot"})


class ConfigError(LowbitError, ValueError):
    """A config that cannot be read, or a model transformers cannot build from it."""


def load_config(source: Any) -> Any:
    """A transformers config from a config object, a dict, a config.json, a model folder, a .gguf or a hub id.

    >>> load_config({"model_type": "llama", "hidden_size": 64}).hidden_size
    64
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    try:
        if isinstance(source, dict):
            d = dict(source)
            if "model_type" not in d:
                raise ConfigError("config dict has no 'model_type'")
            return AutoConfig.for_model(d.pop("model_type"), **d)
        text = os.fspath(source)
        p = Path(text).expanduser()
        if not p.exists() and (p.suffix in (".json", ".gguf") or text.startswith(("/", ".", "~"))):
            raise ConfigError(f"{p}: no such file or directory")
        if p.is_file() and p.suffix == ".json":
            d = json.loads(p.read_text())
            if not isinstance(d, dict) or "model_type" not in d:
                raise ConfigError(f"{p}: not a transformers config (no 'model_type')")
            return load_config(d)
        if p.is_file() and p.suffix == ".gguf":
            return AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise ConfigError(f"{p}: no config.json in this folder")
            return AutoConfig.from_pretrained(str(p))
        if p.exists():
            raise ConfigError(f"{p}: unknown file type (expected config.json, a model folder or a .gguf)")
        return AutoConfig.from_pretrained(str(source))  # a hub id (needs network)
    except LowbitError:
        raise
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{source}: cannot read a model config ({first})") from None


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
