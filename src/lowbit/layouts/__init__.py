"""Storage layouts: how a scheme's numbers are fitted, stored and read back — the layer below methods.

A layout is a registered class serving every scheme of one family:

* ``affine`` — lowbit's grouped codes + scales (+ zero-points): int2..int8 per tensor / channel / group,
  fp8 and bf16/fp16 casts, the nf4 lookup grid (:mod:`.affine`);
* ``ggml`` — llama.cpp's block types (q8_0, q4_0 … q2_k … q6_k, iq4_nl, iq4_xs), byte for byte as GGUF
  stores them (:mod:`.ggml`).

Each offers ``fit(w, scheme, importance) -> params``, ``encode(w, scheme, params) -> QTensor``,
``decode(q) -> tensor``, a differentiable ``fake(w, scheme)`` (straight-through rounding, for training),
``nbytes(scheme, shape)``, and for GPTQ's one column sweep ``group_width`` / ``fit_group`` (the grid of one
column group) / ``assemble``. Methods call these and never look at a layout's internals.

>>> s = parse_scheme("q4_k")
>>> q = layout_of(s).quantize(torch.randn(8, 256), s)
>>> q.nbytes == layout_of(s).nbytes(s, (8, 256)) == 8 * 144
True
"""

from __future__ import annotations

from lowbit.layouts.base import ColumnGrid, Layout, layout_names, layout_of, register_layout

from lowbit.layouts import affine, ggml_layout  # noqa: F401,E402  (register the families)  isort: skip

__all__ = ["ColumnGrid", "Layout", "layout_names", "layout_of", "register_layout"]
