"""GGUF export: lowbit's numbers in llama.cpp's blocks, llama.cpp's per-tensor type mixes, a streaming writer.

>>> from lowbit.io.gguf import export_gguf
>>> report = export_gguf(model, tok, "tiny-q4km.gguf", "Q4_K_M")   # or calib=windows, method="gptq"
>>> round(report.bpw, 2), len(report.fallbacks)   # mlp.down_proj's rows of 384 do not fill 256-blocks
(5.13, 2)

Modules: :mod:`.blocks` / :mod:`.kquants` (one class per GGML type: fit, quantize, pack, dequantize),
:mod:`.search` (the scale searches), :mod:`.gptq` (GPTQ on a block type's grid), :mod:`.mixes`
(llama.cpp's type rules and fallbacks), :mod:`.writer` (metadata, tokenizer, file), :mod:`.source`
(models, safetensors folders, calibration), :mod:`.reader` (reading a GGUF file: index, bytes, weights),
:mod:`.export` (``export_gguf``).
"""

from lowbit.io.gguf.export import ExportReport, TensorReport, export_gguf
from lowbit.io.gguf.mixes import MIXES, choose_type
from lowbit.io.gguf.reader import GGUFIndex, iter_gguf_tensors, load_gguf_into, read_gguf_index, read_gguf_weights
from lowbit.io.gguf.writer import ARCHITECTURES, GGUFExportError
from lowbit.layouts.ggml import BLOCK_TYPES, BlockType

__all__ = ["ARCHITECTURES", "BLOCK_TYPES", "MIXES", "BlockType", "ExportReport", "GGUFExportError", "GGUFIndex",
           "TensorReport", "choose_type", "export_gguf", "iter_gguf_tensors", "load_gguf_into", "read_gguf_index",
           "read_gguf_weights"]
