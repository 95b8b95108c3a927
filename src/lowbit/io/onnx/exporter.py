"""``lowbit export onnx``: :func:`lowbit.io.onnx.export_onnx` behind the exporter interface.

For a vision model (``--arch``, weights as a torch state dict), MODEL is quantized first to the full-integer scheme
on the images of ``--calib-images`` (see :mod:`lowbit.cli.vision`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lowbit.errors import LowbitError
from lowbit.io.exporters import Exporter, ExportOptions, ExportReport, option, register_exporter
from lowbit.model.static import is_full_integer


@dataclass(frozen=True)
class OnnxOptions(ExportOptions):
    arch: str | None = option(None, "a vision architecture (mobilenet_v2): MODEL is then its weights (.pth)")
    calib_images: str | None = option(None, "folder of calibration images for a vision model")
    calib_count: int = option(64, "at most this many calibration images (sorted by name, evenly spaced)", minimum=1)
    image_size: int = option(224, "vision input: the center crop, after resizing the shorter side to 8/7 of it",
                             minimum=8)
    act_dtype: Literal["uint8", "int8"] = option("uint8", "activation integers: uint8 (what x86 runtimes fuse) or "
                                                 "int8 (exact conversion: values and zero-points shifted by 128)")
    opset: int = option(17, "ONNX opset", minimum=13)

    def validate(self) -> None:
        if self.arch is not None:
            from lowbit.model.vision import vision_arch_names

            if self.arch not in vision_arch_names():
                raise self.invalid("arch", f"unknown (known: {', '.join(vision_arch_names())})")
            if self.calib_images is None:
                raise self.invalid("calib_images", "a vision model is quantized on calibration images: pass "
                                                   "--calib-images DIR")

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(1, 3, self.image_size, self.image_size),)


@register_exporter
class OnnxExporter(Exporter):
    name = "onnx"
    help = "an ONNX file onnxruntime runs with its int8 kernels (QDQ graph; MatMulNBits for int4 transformers)"
    description = ("Export MODEL as ONNX. A vision model (--arch mobilenet_v2 and its .pth weights) is quantized "
                   "first to the full-integer scheme every edge runtime follows (int8 weights per channel, 8-bit "
                   "activations per tensor from --calib-images, int32 biases) and written as a QDQ graph with "
                   "lowbit's own scales.")
    out_help = "the .onnx file (must not exist unless --force)"
    Options = OnnxOptions
    quantizes_first = True
    weight_only = False

    def write(self, qmodel: Any, out: Path, tokenizer: Any, options: OnnxOptions, *, force: bool,
              progress: bool | None):
        from lowbit.io.onnx import export_onnx

        if is_full_integer(qmodel):
            return export_onnx(qmodel, out, options.example_inputs(), force=force, opset=options.opset)
        if options.arch is not None:
            raise LowbitError("export onnx: the vision model was not quantized (internal: call it through the CLI)")
        return export_onnx(qmodel, out, force=force, opset=options.opset)

    def summary(self, report: ExportReport, source: str) -> list[str]:
        return [f"wrote {report.path} ({report.bytes_written / 1e6:.2f} MB)",
                f"next: lowbit eval {report.path} --reference {source} --arch ARCH --images DIR"]
