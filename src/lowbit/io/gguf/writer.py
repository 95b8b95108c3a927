"""Writing a GGUF file llama.cpp loads: architecture + hyper-parameters, tokenizer, tensors, atomically.

Architecture knowledge is a table (:data:`ARCHITECTURES`): the transformers ``model_type``, the GGUF
architecture, and whether Q/K rows are permuted. Hugging Face Llama checkpoints rotate the two halves of
each head (``rotate_half``) while llama.cpp's ``llama`` architecture rotates adjacent pairs, so the rows of
``q_proj``/``k_proj`` are reordered per head ``[0, d/2, 1, d/2+1, …]`` (:func:`permute_qk`); Qwen2/3 use
llama.cpp's NeoX rope and keep the Hugging Face order. Tensor names come from ``gguf.TensorNameMap``.

The file is streamed: :func:`write_gguf` writes the header from the tensor specs first, then asks for each
tensor's bytes one at a time, so only one tensor's data is in memory at once.

>>> spec = arch_spec(model.config)
>>> spec.gguf_arch, spec.permute_qk
('llama', True)
>>> names = gguf_names(spec, model.config, model.state_dict())   # HF name -> GGUF name
>>> weights = {names[n]: w if (h := qk_heads(spec, model.config, n)) is None else permute_qk(w, h)
...            for n, w in model.state_dict().items()}
>>> tensors = [TensorSpec(name, tuple(w.shape), "F32") for name, w in weights.items()]
>>> def encode(t):                            # the bytes of one tensor, in pieces (here: one)
...     yield weights[t.name].numpy()
>>> write_gguf("tiny-f32.gguf", spec, model.config, tok, LlamaFileType.ALL_F32, tensors, encode)
[]
>>> import copy
>>> from lowbit.io.gguf.reader import load_gguf_into
>>> sd = load_gguf_into(copy.deepcopy(model), "tiny-f32.gguf")   # back in HF order, bit for bit
>>> all(torch.equal(sd[n], w) for n, w in model.state_dict().items())
True
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFWriter, LlamaFileType, TensorNameMap, TokenType
from gguf.constants import GGML_QUANT_SIZES, MODEL_ARCH, GGMLQuantizationType, RopeScalingType

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_file

log = logging.getLogger(__name__)

GGML_QNT_VERSION = 2


class GGUFExportError(LowbitError):
    """A model, tokenizer or option that cannot become a GGUF file."""


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str  # general.architecture
    model_arch: MODEL_ARCH  # for gguf.TensorNameMap
    permute_qk: bool  # HF rotate_half layout -> llama.cpp's interleaved rope


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", MODEL_ARCH.LLAMA, True),
    "mistral": ArchSpec("llama", MODEL_ARCH.LLAMA, True),
    "qwen2": ArchSpec("qwen2", MODEL_ARCH.QWEN2, False),
    "qwen3": ArchSpec("qwen3", MODEL_ARCH.QWEN3, False),
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the output file. ``shape`` is torch order (rows, cols); blocks run along cols."""

    name: str
    shape: tuple[int, ...]
    ggml: str

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[self.ggml]]
        n = 1
        for d in self.shape:
            n *= d
        return n // block * size


def arch_spec(config: Any) -> ArchSpec:
    """The table entry for a transformers config, or an error naming the supported architectures."""
    mt = getattr(config, "model_type", None)
    if mt not in ARCHITECTURES:
        raise GGUFExportError(f"GGUF export does not support architecture {mt!r} "
                              f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[mt]


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection ``(n_head * d, …)`` from HF's half-split rope order to interleaved pairs."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`permute_qk` (GGUF rows back to the Hugging Face order)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def qk_heads(spec: ArchSpec, config: Any, hf_name: str) -> int | None:
    """Heads to permute over when ``hf_name`` is a q/k projection that needs it, else None."""
    if not spec.permute_qk:
        return None
    if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return int(config.num_attention_heads)
    if hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return None


def gguf_names(spec: ArchSpec, config: Any, hf_names: Iterable[str]) -> dict[str, str]:
    """HF tensor name -> GGUF name; rotary caches are dropped, unknown tensors are an error."""
    tmap = TensorNameMap(spec.model_arch, int(config.num_hidden_layers))
    out: dict[str, str] = {}
    for n in hf_names:
        if n.endswith("rotary_emb.inv_freq"):
            continue
        g = tmap.get_name(n, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise GGUFExportError(f"tensor {n!r} has no GGUF name in architecture {spec.gguf_arch!r}")
        out[n] = g
    return out


def _rope(config: Any) -> tuple[float, dict[str, Any]]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params


def add_hparams(w: GGUFWriter, config: Any, ftype: LlamaFileType, name: str) -> None:
    """Architecture hyper-parameters and file type."""
    w.add_name(name)
    w.add_file_type(int(ftype))
    w.add_quantization_version(GGML_QNT_VERSION)
    n_head = int(config.num_attention_heads)
    hd = head_dim(config)
    w.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or n_head))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(int(config.vocab_size))
    w.add_rope_dimension_count(hd)
    if hd * n_head != config.hidden_size:
        w.add_key_length(hd)
        w.add_value_length(hd)
    theta, rope = _rope(config)
    w.add_rope_freq_base(theta)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind not in ("default", None):
        raise GGUFExportError(f"GGUF export: rope scaling {kind!r} is not supported (supported: default, linear)")


# -- tokenizer ----------------------------------------------------------------------------------------
# HF pre-tokenizer layouts -> llama.cpp's pre-tokenizer names (the regexes llama.cpp hard-codes for them)
_LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def _pre_signature(pre: dict[str, Any] | None) -> tuple:
    if not pre:
        return ()
    items = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    sig = []
    for p in items or []:
        t = p.get("type")
        if t == "ByteLevel":
            sig.append(("ByteLevel", bool(p.get("use_regex", True))))
        elif t == "Digits":
            sig.append(("Digits", bool(p.get("individual_digits", False))))
        elif t == "Split":
            sig.append(("Split", (p.get("pattern") or {}).get("Regex")))
        else:
            sig.append((t,))
    return tuple(sig)


PRE_TOKENIZERS: dict[tuple, str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}


def source_gguf(tokenizer: Any) -> Path | None:
    """The GGUF file a tokenizer was read from (directly, or through lowbit's float cache), if any."""
    from lowbit.io.loaders import SOURCE_GGUF_ATTR  # here, not at the top: the loaders import the GGUF reader

    direct = getattr(tokenizer, SOURCE_GGUF_ATTR, None)
    if direct and Path(direct).is_file():
        return Path(direct)
    d = Path(str(getattr(tokenizer, "name_or_path", "") or "."))
    info = d / "lowbit-source.json"
    if info.is_file():
        src = Path(json.loads(info.read_text()).get("source", ""))
        return src if src.is_file() else None
    f = (getattr(tokenizer, "init_kwargs", None) or {}).get("gguf_file")
    return d / f if f and (d / f).is_file() else None


def _special_ids(tok: Any) -> dict[str, int]:
    out = {}
    for k in ("bos", "eos", "unk", "pad"):
        v = getattr(tok, f"{k}_token_id", None)
        if isinstance(v, int):
            out[k] = v
    return out


def add_tokenizer(w: GGUFWriter, tok: Any, vocab_size: int) -> list[str]:
    """Vocabulary, merges/scores, token types, special tokens and chat template; returns warnings."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(f"GGUF export needs a fast (tokenizers) tokenizer, got {type(tok).__name__}")
    j = json.loads(backend.to_str())
    model = j.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(f"GGUF export: tokenizer model {model.get('type')!r} is not supported (BPE only)")
    warnings: list[str] = []
    if model.get("byte_fallback"):
        _add_spm(w, tok, vocab_size)
    else:
        warnings += _add_bpe(w, tok, j, vocab_size)
    ids = _special_ids(tok)
    for k, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                  ("pad", w.add_pad_token_id)):
        if k in ids:
            fn(ids[k])
    w.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
    if getattr(tok, "add_eos_token", None) is not None:
        w.add_add_eos_token(bool(tok.add_eos_token))
    tmpl = getattr(tok, "chat_template", None)
    if isinstance(tmpl, str) and tmpl:
        w.add_chat_template(tmpl)
    return warnings


def _add_bpe(w: GGUFWriter, tok: Any, j: dict[str, Any], vocab_size: int) -> list[str]:
    """Byte-level BPE (GPT-2 style): tokens, types, merges and the pre-tokenizer name."""
    vocab: dict[str, int] = dict(j["model"]["vocab"])
    special = set()
    for a in j.get("added_tokens", []):
        vocab[a["content"]] = a["id"]
        if a.get("special"):
            special.add(a["id"])
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [int(TokenType.UNUSED)] * n
    added = {a["id"] for a in j.get("added_tokens", [])}
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = int(TokenType.CONTROL if i in special else TokenType.USER_DEFINED if i in added
                       else TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"].get("merges", [])]
    warnings = []
    src = source_gguf(tok)
    pre = None
    if src is not None:
        from lowbit.io.gguf.reader import read_gguf_index

        pre = read_gguf_index(src).metadata.get("tokenizer.ggml.pre")
    if pre is None:
        sig = _pre_signature(j.get("pre_tokenizer"))
        pre = PRE_TOKENIZERS.get(sig)
        if pre is None:
            pre = "default"
            warnings.append(f"tokenizer: pre-tokenizer {sig} is not in lowbit's table; llama.cpp will use its "
                            f"default (GPT-2) splitting, which may tokenize differently")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    return warnings


def _add_spm(w: GGUFWriter, tok: Any, vocab_size: int) -> None:
    """SentencePiece-style BPE with byte fallback (Llama 2, Mistral): llama.cpp's ``llama`` vocabulary."""
    import tempfile

    from gguf.vocab import LlamaHfVocab

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        vocab = LlamaHfVocab(Path(d))
        tokens, scores, types = (list(v) for v in zip(*vocab.all_tokens(), strict=True))
    for i in range(len(tokens), vocab_size):  # the embedding has rows no token uses
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types([int(t) for t in types])


# -- the file -----------------------------------------------------------------------------------------
def write_gguf(path: str | os.PathLike, spec: ArchSpec, config: Any, tokenizer: Any, ftype: LlamaFileType,
               tensors: list[TensorSpec], encode: Callable[[TensorSpec], Iterable[np.ndarray]], name: str = "",
               extra: dict[str, str] | None = None) -> list[str]:
    """Write header, metadata and tensor infos, then each tensor's bytes from ``encode`` in order, atomically.

    ``encode(spec)`` yields the tensor's data in consecutive pieces (any dtype), ``spec.nbytes`` bytes in all,
    so no tensor needs to be in memory whole. Returns warnings.
    """
    warnings: list[str] = []
    with atomic_file(path) as tmp:
        w = GGUFWriter(tmp, spec.gguf_arch)
        try:
            add_hparams(w, config, ftype, name or str(getattr(config, "_name_or_path", "") or spec.gguf_arch))
            for k, v in (extra or {}).items():
                w.add_string(k, v)
            if tokenizer is None:
                raise GGUFExportError("GGUF export needs the model's tokenizer: llama.cpp reads the vocabulary from "
                                      "the file (load the model with lowbit.load, or a folder with tokenizer files)")
            warnings += add_tokenizer(w, tokenizer, int(config.vocab_size))
            for t in tensors:
                w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes,
                                  raw_dtype=GGMLQuantizationType[t.ggml])
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()  # tensor i's offset: the padded sizes of tensors < i
            align = w.data_alignment
        finally:
            w.close()
        with open(tmp, "ab") as f:
            f.write(bytes(-f.tell() % align))
            for t in tensors:
                n = 0
                for piece in encode(t):
                    piece = np.ascontiguousarray(piece)
                    f.write(piece.view(np.uint8).reshape(-1).data)
                    n += piece.nbytes
                if n != t.nbytes:
                    raise GGUFExportError(f"tensor {t.name}: {n} bytes encoded, {t.nbytes} expected")
                f.write(bytes(-n % align))
        os.chmod(tmp, 0o644)  # the temporary file is private (0600); the result is an ordinary file
    return warnings
