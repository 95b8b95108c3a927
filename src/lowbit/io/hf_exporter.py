"""``lowbit export hf``: :func:`export_hf` (compressed-tensors) behind the exporter interface.

>>> from lowbit.io.exporters import get_exporter
>>> qsym, _ = lowbit.quantize(model, tok, "int4-g64-sym")   # symmetric: every linear layer can be packed
>>> report = get_exporter("hf").export(qsym, "tiny-int4-hf", tok, HFOptions(strict=True))
>>> round(report.details.packed_bpw, 2), report.details.floated
(4.76, ['model.embed_tokens'])
>>> get_exporter("hf").export(qmodel, "tiny-asym-hf", tok, HFOptions(strict=True))  # doctest: +ELLIPSIS
Traceback (most recent call last):
lowbit.errors.LowbitError: layer lm_head: int8 cannot be packed beside the asymmetric int4-g128-asym layers: ...
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.io.exporters import Exporter, ExportOptions, ExportReport, option, register_exporter
from lowbit.io.hf_export import HFExportReport, export_hf


@dataclass(frozen=True)
class HFOptions(ExportOptions):
    strict: bool = option(False, "fail instead of writing a quantized linear layer the format cannot pack as float")


@register_exporter
class HFExporter(Exporter):
    name = "hf"
    help = "a Hugging Face folder (compressed-tensors pack-quantized) transformers loads"
    description = ("Export MODEL as a Hugging Face folder that transformers loads natively (with compressed-tensors "
                   "installed): int2/int4/int8 linear layers packed, embeddings and layers the format cannot pack "
                   "written as float (reported). MODEL is a lowbit model directory, or a float model with --scheme "
                   "(and --method, --calib ...) to quantize it first.")
    out_help = "output directory (must not exist unless --force)"
    Options = HFOptions
    quantizes_first = True

    def write(self, qmodel: Any, out: Path, tokenizer: Any, options: HFOptions, *, force: bool,
              progress: bool | None) -> HFExportReport:
        return export_hf(qmodel, out, tokenizer=tokenizer, force=force, strict=options.strict)

    def summary(self, report: ExportReport, source: str) -> list[str]:
        d: HFExportReport = report.details
        how = ", which dequantizes its asymmetric layers as it loads" if d.dequantize_on_load else ""
        return [f"wrote {report.path} ({report.bytes_written / 1e6:.1f} MB; {len(d.packed)} linear layers packed at "
                f"{d.packed_bpw:.2f} bpw, {len(d.floated)} quantized layers written as float)",
                f"next: transformers.AutoModelForCausalLM.from_pretrained({report.path!r}) with compressed-tensors "
                f"installed{how}"]
