"""ONNX export: full-integer models as QDQ graphs (:mod:`.qdq`), quantized transformers with onnxruntime's
``MatMulNBits`` / int8 ops (:mod:`.transformer`); :mod:`.runtime` runs a file in onnxruntime."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.model.static import is_full_integer


def export_onnx(qmodel: nn.Module, path: str | os.PathLike, example_inputs: tuple[torch.Tensor, ...] | None = None,
                *, force: bool = False, **kwargs: Any):
    """Write ``qmodel`` as an ONNX file that onnxruntime runs with its integer kernels; returns the report.

    A full-integer model (``lowbit.quantize(model, calib=images, scheme="int8", act="int8-static")``) becomes a
    QDQ graph and needs ``example_inputs`` (a batch of the model's inputs; the batch axis stays dynamic); a
    quantized transformer goes through :func:`lowbit.io.onnx.transformer.write_transformer_onnx`.
    """
    if is_full_integer(qmodel):
        from lowbit.io.onnx.qdq import write_qdq_onnx

        if example_inputs is None:
            raise LowbitError("export onnx: a full-integer model needs example_inputs, e.g. (images[:1],)")
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        return write_qdq_onnx(qmodel, path, inputs, force=force, **kwargs)
    try:
        from lowbit.io.onnx.transformer import write_transformer_onnx
    except ImportError:
        raise LowbitError("export onnx: only full-integer (act='int8-static') models can be written as ONNX in this "
                          "version") from None
    return write_transformer_onnx(qmodel, path, example_inputs=example_inputs, force=force, **kwargs)
