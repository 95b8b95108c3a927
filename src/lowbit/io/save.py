"""The lowbit output directory: a quantized model that ``lowbit.load`` gives back bit-identically.

Layout::

    out/
      model.safetensors     QTensors of quantized layers ("<layer>.weight") + every float tensor
      quantization.json     format version, per-layer schemes/methods, tied layers, the Plan, a report summary
      config.json ...       the transformers config (and generation config)
      tokenizer files       when a tokenizer is given
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.core.jsonio import JSONFileError, field, read_json
from lowbit.core.qtensor import QTensor
from lowbit.errors import CheckpointError, LowbitError, first_line
from lowbit.io.atomic import atomic_dir
from lowbit.io.checkpoint import load_tensors, save_tensors
from lowbit.model.convert import quantized_module
from lowbit.model.hfconfig import check_config_sizes
from lowbit.model.qmodules import QEmbedding, QLinear, quantized_state_keys

FORMAT_VERSION = 1
QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
EXTRAS = ("input_scale", "act_scale")  # QLinear's activation-quantization tensors


def is_lowbit_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / QUANT_FILE).is_file()




def add_plain_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], skip: Any = ()) -> None:
    """Every state-dict entry not already in ``tensors`` (nor in ``skip``), contiguous, storage never shared."""
    ptrs: set[int] = set()
    for k, v in model.state_dict().items():
        if k in tensors or k in skip:
            continue
        t = v.detach()
        if t.data_ptr() in ptrs:
            t = t.clone()  # safetensors refuses shared storage
        ptrs.add(t.data_ptr())
        tensors[k] = t.contiguous()

def save_companions(model: nn.Module, folder: Path, tokenizer: Any = None) -> None:
    """The files a Hugging Face folder carries beside its weights: generation config and tokenizer."""
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(folder)
        except Exception:  # a generation config transformers itself considers invalid: not ours to fix
            pass
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)

def save(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None, plan: Any = None,
         report: Any = None, force: bool = False) -> Path:
    """Write a quantized model to ``out_dir`` atomically; refuses an existing directory unless ``force``.

    >>> lowbit.save(qmodel, "tiny-int4", tokenizer=tok)
    PosixPath('tiny-int4')
    >>> lowbit.save(qmodel, "tiny-int4", tokenizer=tok)
    Traceback (most recent call last):
    lowbit.errors.LowbitError: tiny-int4: already exists (pass force=True / --force to replace it)
    """
    out = Path(out_dir)
    if out.exists() and not force:
        raise LowbitError(f"{out}: already exists (pass force=True / --force to replace it)")
    tensors: dict[str, QTensor | torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    tied: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QLinear | QEmbedding):
            key = f"{name}.weight"
            kind = "linear" if isinstance(mod, QLinear) else "embedding"
            layers[name] = {"kind": kind, "scheme": mod.qweight.scheme.name}
            if kind == "linear" and mod.act_scheme:
                layers[name]["act_scheme"] = mod.act_scheme
            if isinstance(mod, QEmbedding) and mod.padding_idx is not None:
                layers[name]["padding_idx"] = mod.padding_idx
            if isinstance(mod, QEmbedding) and mod.embed_scale is not None:
                layers[name]["embed_scale"] = float(mod.embed_scale)  # checked on load against the config's
            if id(mod.qweight) in seen:
                tied[name] = seen[id(mod.qweight)]
            else:
                seen[id(mod.qweight)] = name
                tensors[key] = mod.qweight
            for extra in EXTRAS:
                if getattr(mod, extra, None) is not None:
                    tensors[f"{name}.{extra}"] = getattr(mod, extra)
    add_plain_tensors(model, tensors, skip=quantized_state_keys(model))  # the parts went in as QTensors
    doc = {
        "format": "lowbit", "version": FORMAT_VERSION, "layers": layers, "tied": tied,
        "plan": None if plan is None else plan.to_dict(),
        "report": None if report is None else _summary(report),
    }
    with atomic_dir(out, force=force) as tmp:
        save_tensors(tmp / WEIGHTS_FILE, tensors)
        config = getattr(model, "config", None)
        if config is not None:
            import copy

            config = copy.deepcopy(config)
            config.architectures = [type(model).__name__]
            config.save_pretrained(tmp)
        save_companions(model, tmp, tokenizer)
        (tmp / QUANT_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    return out


def _summary(report: Any) -> dict[str, Any]:
    return {"bpw": report.bpw, "linear_bpw": report.linear_bpw, "quantized_bytes": report.quantized_bytes,
            "quantized_numel": report.quantized_numel,
            "seconds": report.seconds, "calib_windows": report.calib_windows, "kept": report.kept,
            "warnings": report.warnings, "notes": list(getattr(report, "notes", []))}


def _model_class(p: Path, config):
    """The transformers model class config.json names (a model class, nothing else), else AutoModel."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
        if cls is not None:
            raise CheckpointError(f"{p / 'config.json'}: field 'architectures': {name!r} is not a model class")
    return transformers.AutoModel


def _build(p: Path, cls, config) -> nn.Module:
    """``config``'s model (on meta inside ``init_empty_weights``); a config it cannot build is one error."""
    try:
        return cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    except (ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError, IndexError, OverflowError,
            RuntimeError) as e:
        raise CheckpointError(f"{p / 'config.json'}: transformers cannot build this model ({first_line(e)})") from None


def _check_embedding(p: Path, name: str, entry: dict[str, Any], new: QEmbedding) -> None:
    """The rebuilt embedding must compute what the saved one did (padding index, embedding scale). A file
    written before lowbit kept embedding scales has none recorded: the config's scale (what the float model
    computed, what that file lost) is used."""
    scale = None if new.embed_scale is None else float(new.embed_scale)
    saved = entry.get("embed_scale")
    if saved is not None and (scale is None or abs(saved - scale) > 1e-6 * abs(saved)):
        raise CheckpointError(f"{p}: layer {name!r} was saved with embedding scale {saved}, the config's "
                              f"{type(new).__name__} has {scale}: config.json does not match the weights")
    padding = entry.get("padding_idx", new.padding_idx)
    if padding is not None and not -new.num_embeddings <= padding < new.num_embeddings:
        raise CheckpointError(f"{p / QUANT_FILE}: layer {name!r}: padding_idx {padding} is outside its "
                              f"{new.num_embeddings} embeddings")
    new.padding_idx = padding


# quantization.json's per-layer fields and their types (kind and scheme required)
_LAYER_FIELDS: dict[str, tuple[type, ...]] = {"act_scheme": (str, type(None)), "padding_idx": (int, type(None)),
                                              "embed_scale": (float, type(None))}


def _read_doc(p: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """quantization.json's layers and tied map, every field checked for its type."""
    from lowbit.kernels import ACT_SCHEMES
    from lowbit.model.plan import KINDS

    where = p / QUANT_FILE
    try:
        doc = read_json(where)
        if not isinstance(doc, dict) or doc.get("format") != "lowbit" or doc.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{where}: not a lowbit model of format version {FORMAT_VERSION}")
        layers = field(doc, "layers", dict, where, {})
        tied = field(doc, "tied", dict, where, {})
        for name, entry in layers.items():
            what = f"layer {name!r}: "
            if field(entry, "kind", str, where, what=what) not in KINDS:
                raise CheckpointError(f"{where}: {what}kind {entry['kind']!r} is not one of {', '.join(KINDS)}")
            field(entry, "scheme", str, where, what=what)
            for key, types in _LAYER_FIELDS.items():
                field(entry, key, types, where, None, what)
            act = entry.get("act_scheme")
            if act is not None and act not in ACT_SCHEMES:
                raise CheckpointError(f"{where}: {what}unknown activation scheme {act!r}")
        for name, src in tied.items():
            if name not in layers or not isinstance(src, str) or src not in layers or src in tied:
                raise CheckpointError(f"{where}: tied {name!r} -> {src!r}: both must be quantized layers, "
                                      f"the second one stored")
    except JSONFileError as e:
        raise CheckpointError(str(e)) from None
    return layers, tied


def _check_layers(p: Path, skeleton: nn.Module, layers: dict[str, dict[str, Any]], tied: dict[str, str],
                  tensors: dict[str, QTensor | torch.Tensor]) -> None:
    """Before anything is allocated: every stored tensor's shape against the config's model (built on meta),
    every layer's kind against the module it replaces, and tied layers against each other's shapes."""
    from lowbit.model.convert import weight_matrix
    from lowbit.model.plan import layer_kind

    for name, entry in layers.items():
        src = tied.get(name, name)
        q = tensors.get(f"{src}.weight")
        if not isinstance(q, QTensor):
            raise CheckpointError(f"{p / WEIGHTS_FILE}: layer {name!r} has no quantized weight")
        try:
            old = skeleton.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{p}: layer {name!r} does not exist in the {type(skeleton).__name__} "
                                  f"config") from None
        kind = layer_kind(old)
        if kind != entry["kind"]:
            raise CheckpointError(f"{p / QUANT_FILE}: layer {name!r} is a {entry['kind']} there, the config's "
                                  f"model has a {type(old).__name__}")
        want = tuple(weight_matrix(old).shape)
        if tuple(q.shape) != want:
            via = f" (tied to {src!r})" if src != name else ""
            raise CheckpointError(f"{p}: layer {name!r}{via}: the stored weight is {list(q.shape)}, the config's "
                                  f"{type(old).__name__} needs {list(want)}")
        for extra, shape in (("input_scale", (want[-1],)), ("act_scale", ())):
            t = tensors.get(f"{name}.{extra}")
            if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point()
                                  or t.numel() != math.prod(shape)):
                raise CheckpointError(f"{p / WEIGHTS_FILE}: {name}.{extra} must be a float tensor of "
                                      f"{math.prod(shape)} values")
    quantized = {f"{n}.weight" for n in layers}
    for k, v in skeleton.state_dict().items():
        t = tensors.get(k)
        if k not in quantized and isinstance(t, torch.Tensor) and tuple(t.shape) != tuple(v.shape):
            raise CheckpointError(f"{p}: tensor {k!r} is {list(t.shape)} in {WEIGHTS_FILE}, the config's model "
                                  f"needs {list(v.shape)}")


def load_tokenizer(folder: Path, label: str | os.PathLike) -> Any:
    """``AutoTokenizer`` of a folder's tokenizer files, never running code from the folder; a broken tokenizer
    file is one error naming the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError, ImportError,
            RuntimeError, UnicodeDecodeError) as e:  # transformers and tokenizers raise these for bad files
        raise CheckpointError(f"{label}: cannot load its tokenizer ({type(e).__name__}: {first_line(e)[:200]})"
                              ) from None
    except Exception as e:  # the tokenizers library's own Exception type for a malformed tokenizer.json
        if type(e).__name__ != "Exception":
            raise
        raise CheckpointError(f"{label}: cannot load its tokenizer ({str(e)[:200]})") from None


def load_quantized(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """Rebuild a model saved by :func:`save`: QLinear/QEmbedding layers hold the stored QTensors.

    Everything is validated before the model is allocated: quantization.json's fields, the checkpoint (sizes,
    dtypes, checksums), config.json's sizes against sane bounds and every stored tensor's shape against the
    config's model built on the meta device.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    p = Path(path)
    layers, tied = _read_doc(p)
    tensors = load_tensors(p / WEIGHTS_FILE)
    try:
        read_json(p / "config.json")  # nesting, NaN/Infinity, bad JSON: one line naming the file
        config = AutoConfig.from_pretrained(p, trust_remote_code=False)
    except JSONFileError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # transformers raises many types for a config it refuses
        first = " ".join(str(e).split())[:300] or type(e).__name__
        raise CheckpointError(f"{p}: unreadable config.json ({first})") from None
    try:
        check_config_sizes(config, p / "config.json")
    except LowbitError as e:
        raise CheckpointError(str(e)) from None
    cls = _model_class(p, config)
    with init_empty_weights(include_buffers=False):
        skeleton = _build(p, cls, config)
    _check_layers(p, skeleton, layers, tied, tensors)
    del skeleton
    model = _build(p, cls, config)
    model.to(torch.float32)
    model.eval()
    for name, entry in layers.items():
        q = tensors[f"{tied.get(name, name)}.weight"]
        assert isinstance(q, QTensor)  # _check_layers
        old = model.get_submodule(name)
        try:  # the config's float layer decides what the quantized one keeps (bias, embedding scale …)
            new = quantized_module(name, old, q)
        except LowbitError as e:
            raise CheckpointError(f"{p}: {e}") from None
        if entry["kind"] == "linear":
            assert isinstance(new, QLinear)
            new.act_scheme = entry.get("act_scheme")
            for extra in EXTRAS:
                setattr(new, extra, tensors.get(f"{name}.{extra}"))
        elif isinstance(new, QEmbedding):
            _check_embedding(p, name, entry, new)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    float_state = {k: v for k, v in tensors.items()
                   if isinstance(v, torch.Tensor) and not k.endswith(tuple(f".{e}" for e in EXTRAS))}
    missing, unexpected = model.load_state_dict(float_state, strict=False)
    quantized = quantized_state_keys(model)  # the layers already hold them
    missing = [k for k in missing if k not in quantized]
    if unexpected:
        raise CheckpointError(f"{p / WEIGHTS_FILE}: tensors not in the model: {', '.join(unexpected[:5])}")
    if missing:
        raise CheckpointError(f"{p / WEIGHTS_FILE}: missing tensors: {', '.join(missing[:5])}")
    for prm in model.parameters():
        prm.requires_grad_(False)
    tokenizer = None
    if any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        tokenizer = load_tokenizer(p, p)
    return model, tokenizer
