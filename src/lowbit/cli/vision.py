"""The CLI's vision path: ``lowbit export onnx WEIGHTS.pth --arch A --calib-images DIR`` (full-integer quantization,
then a QDQ file) and ``lowbit eval M.onnx --reference WEIGHTS.pth --arch A --images DIR`` (top-1 agreement, size
and speed against the float model, in onnxruntime)."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lowbit.errors import LowbitError
from lowbit.io.exporters import Exporter, disk_bytes
from lowbit.io.images import ImagePrep, image_files, load_images
from lowbit.io.onnx.exporter import OnnxOptions
from lowbit.model.resume import folder_beside
from lowbit.threads import torch_threads

STATIC_METHODS = ("gptq", "rtn", "qat")


def _prep(size: int) -> ImagePrep:
    return ImagePrep(resize=round(size * 8 / 7), crop=size)


def _spaced(files: list[Path], n: int) -> list[Path]:
    if len(files) <= n:
        return files
    return [files[i * len(files) // n] for i in range(n)]


def export_vision(args: argparse.Namespace, exporter: Exporter, options: OnnxOptions, out: Console,
                  check_out) -> dict[str, Any] | None:
    from lowbit.methods.registry import option_items
    from lowbit.model.static import quantize_static
    from lowbit.model.vision import load_vision
    from lowbit.qat.static import StaticQatOptions, center, train_static

    method = args.method or "gptq"
    if method not in STATIC_METHODS:
        raise LowbitError(f"--method {method}: a vision model's weights are quantized with "
                          f"{', '.join(STATIC_METHODS[:-1])} or {STATIC_METHODS[-1]}")
    raw = option_items(list(args.option))
    if raw and method != "qat":
        raise LowbitError(f"--option {args.option[0]}: a vision model's {method} takes no options (qat does: "
                          f"steps, lr, scale_lr, batch, val_images, min_crop, seed, init)")
    qat = StaticQatOptions.parse(raw) if method == "qat" else None  # checked before anything is loaded
    observer = args.act_observer or "percentile"
    if observer == "entropy":
        raise LowbitError("--act-observer entropy: not offered for the asymmetric activation ranges of the "
                          "full-integer scheme (minmax, percentile or mse)")
    if args.scheme not in (None, "int8"):
        raise LowbitError(f"--scheme {args.scheme}: the full-integer scheme stores weights as int8 (drop --scheme)")
    check_out(args.out, args.force, args.model)
    files = _spaced(image_files(options.calib_images), options.calib_count)  # the folder is checked before loading
    model = load_vision(args.model, options.arch)
    size = options.image_size
    if qat is None:
        calib = load_images(files, _prep(size))
    else:  # the eval transform's resized square, which training's random crops are cut from
        side = _prep(size).resize
        canvas = load_images(files, ImagePrep(resize=side, crop=side))
        calib = center(canvas, size)  # = the eval transform's center crops
    progress = None if not args.json else False
    qmodel, rep = quantize_static(model, calib, observer=observer, method=method if qat is None else qat.init,
                                  act_dtype=options.act_dtype, keep=args.keep, progress=progress)
    qrep, resume = None, None
    if qat is not None:  # a killed run's training state waits beside the output; a rerun continues from it
        resume = folder_beside(args.out)
        with torch_threads(getattr(args, "threads", None)):
            qmodel, qrep = train_static(qmodel, model, canvas, qat, size=size, progress=progress, resume_dir=resume)
    report = exporter.export(qmodel, args.out, None, options, force=args.force)
    if resume is not None:
        shutil.rmtree(resume, ignore_errors=True)  # the file is written: nothing left to resume
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if args.json:
        return report.to_dict() | {"calib_images": len(files), "observer": observer, "method": method,
                                   "folded_bn": rep.folded_bn, "float_param_bytes": float_bytes,
                                   "qat": None if qrep is None else qrep.to_dict()}
    start = method if qat is None else f"qat from {qat.init}"
    out.print(f"{len(rep.layers)} layers int8 per channel ({start}), {len(rep.points)} activation points "
              f"{options.act_dtype} per tensor ({observer}, {len(files)} calibration images), "
              f"{rep.folded_bn} BatchNorms folded" + (f"; kept in float: {', '.join(rep.kept)}" if rep.kept else ""))
    if qrep is not None:
        out.print(qrep.summary(), markup=False)
    for w in report.warnings:
        out.print(f"[yellow]warning[/]: {w}")
    out.print(f"wrote {report.path} ({report.bytes_written / 1e6:.2f} MB; float parameters "
              f"{float_bytes / 1e6:.2f} MB: {report.bytes_written / float_bytes:.3f}x)", markup=False)
    out.print(f"next: lowbit eval {report.path} --reference {args.model} --arch {options.arch} --images DIR",
              markup=False)
    return None


def eval_vision(args: argparse.Namespace, out: Console) -> dict[str, Any] | None:
    """Top-1 agreement of MODEL (a .onnx file) with the float reference, sizes, and speed in onnxruntime."""
    from lowbit.model.vision import load_vision, vision_arch_names

    if not args.arch or not args.reference:
        raise LowbitError("eval --images: pass --reference WEIGHTS.pth --arch ARCH (the float model to compare with; "
                          f"archs: {', '.join(vision_arch_names())})")
    if Path(args.model).suffix != ".onnx":
        raise LowbitError(f"{args.model}: eval --images takes an .onnx file (from lowbit export onnx)")
    size = args.image_size
    x = load_images(image_files(args.images), _prep(size))
    reference = load_vision(args.reference, args.arch)
    threads = args.threads
    if threads < 1:
        raise LowbitError(f"--threads {threads}: must be at least 1")
    with torch_threads(threads):
        return _eval_vision(args, out, x, reference, threads)


def _eval_vision(args: argparse.Namespace, out: Console, x: torch.Tensor, reference: torch.nn.Module,
                 threads: int) -> dict[str, Any] | None:
    from lowbit.eval.vision import evaluate_images, ms_per_call
    from lowbit.io.onnx.runtime import ort_model

    size = args.image_size
    qrun = ort_model(args.model, threads=threads)
    r = evaluate_images(qrun, reference, x, per_layer=False)
    with tempfile.TemporaryDirectory() as d:
        fp32 = Path(d) / "float.onnx"
        _export_float(reference, fp32, size)
        frun = ort_model(fp32, threads=threads)
        fbytes = disk_bytes(fp32)
        r.reference_bytes, r.model_bytes = fbytes, disk_bytes(Path(args.model))
        if not args.no_speed:
            r.ms_per_image = ms_per_call(qrun, x[:1])
            r.reference_ms_per_image = ms_per_call(frun, x[:1])
        r.threads = threads
        r.note = "speed: onnxruntime CPU, batch 1, the float model exported to fp32 ONNX in the same run"
    if args.json:
        return r.to_dict()
    t = Table(title=f"{r.n_images} images, onnxruntime, {threads} thread(s)")
    for c in ("model", "size", "top-1 agreement", "logits SQNR", "ms / image", "speed"):
        t.add_column(c)
    t.add_row("float (fp32 ONNX)", f"{fbytes / 1e6:.2f} MB", "–", "–",
              "–" if r.reference_ms_per_image is None else f"{r.reference_ms_per_image:.2f}", "1.00x")
    speed = "–" if r.ms_per_image is None else f"{r.reference_ms_per_image / r.ms_per_image:.2f}x"
    t.add_row(Path(args.model).name, f"{r.model_bytes / 1e6:.2f} MB ({r.model_bytes / fbytes:.3f}x)",
              f"{100 * r.top1_agreement:.1f}%", f"{r.logits_sqnr_db:.1f} dB",
              "–" if r.ms_per_image is None else f"{r.ms_per_image:.2f}", speed)
    out.print(t)
    return None


def _export_float(model: torch.nn.Module, path: Path, size: int) -> None:
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
