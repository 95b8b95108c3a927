"""MobileNetV2 full-integer INT8 (issue 16): quality in lowbit, then the QDQ file in onnxruntime vs fp32 ONNX.

    python bench/edge_int8.py --calib-images DIR --eval-images DIR [--threads 1] [--json out.json]
        [--methods rtn,gptq,qat] [--qat-option steps=200 ...]

Calibration and evaluation images should be disjoint folders. Top-1 agreement with the float model, logits SQNR,
per method × observer in lowbit's own (simulated-integer) forward (``qat``: GPTQ, then quantization-aware training
on crops of the calibration images, lowbit.qat.static); then the best one exported, run in onnxruntime
(batch 1, ``--threads``), timed against the float model exported to fp32 ONNX in the same run.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit.cli.vision import _export_float
from lowbit.eval.vision import ms_per_call, sqnr_db
from lowbit.io.images import ImagePrep, load_images
from lowbit.io.onnx.runtime import ort_model
from lowbit.methods.registry import option_items
from lowbit.model.static import ActQuant, quantize_static
from lowbit.model.vision import load_vision, mobilenet_v2_weights
from lowbit.qat.static import StaticQatOptions, center, train_static


def kl_mean(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Mean KL(float || quantized) of the class distributions, in nats."""
    lp = torch.log_softmax(ref.double(), -1)
    return float((lp.exp() * (lp - torch.log_softmax(got.double(), -1))).sum(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-images", required=True)
    ap.add_argument("--eval-images", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--observers", default="minmax,percentile,mse")
    ap.add_argument("--qat-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the qat rows (lowbit.qat.static.StaticQatOptions), repeatable")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    qat_opts = StaticQatOptions.parse(option_items(args.qat_option))
    model = load_vision(mobilenet_v2_weights(), "mobilenet_v2")
    canvas = load_images(args.calib_images, ImagePrep(resize=256, crop=256))  # what qat's crops are cut from
    calib, x = center(canvas, 224), load_images(args.eval_images)  # = resize 256, center crop 224
    with torch.no_grad():
        ref = model(x)
    rows, best = [], None
    for method in args.methods.split(","):
        for obs in args.observers.split(","):
            t = time.perf_counter()
            qm, rep = quantize_static(model, calib, method=qat_opts.init if method == "qat" else method,
                                      observer=obs, progress=False)
            qrep = None
            if method == "qat":
                qm, qrep = train_static(qm, model, canvas, qat_opts, size=224, progress=False)
            secs = time.perf_counter() - t
            with torch.no_grad():
                got = qm(x)
            row = {"method": method, "observer": obs, "top1_agreement": float((got.argmax(1) == ref.argmax(1)).float()
                   .mean()), "logits_sqnr_db": sqnr_db(ref, got), "kl": kl_mean(ref, got), "quantize_s": secs,
                   "qat": None if qrep is None else qrep.to_dict()}
            wo_model = copy.deepcopy(qm)
            for m in wo_model.modules():  # weights only: the same model with every activation left in float
                if isinstance(m, ActQuant):
                    m.forward = lambda v: v  # noqa: B023
            with torch.no_grad():
                wo = wo_model(x)
            row["weights_only_agreement"] = float((wo.argmax(1) == ref.argmax(1)).float().mean())
            rows.append(row)
            print(f"{method:5s} {obs:10s} top-1 agreement {100 * row['top1_agreement']:5.1f}%  SQNR "
                  f"{row['logits_sqnr_db']:5.1f} dB  KL {row['kl']:.4f}  (weights only "
                  f"{100 * row['weights_only_agreement']:5.1f}%)  {secs:5.1f} s"
                  + ("" if qrep is None else f"  [{qrep.summary()}]"), flush=True)
            if best is None or row["top1_agreement"] > best[0]["top1_agreement"]:
                best = (row, method, obs, qm)
    row, method, obs, qm = best
    with tempfile.TemporaryDirectory() as d:
        q_path, f_path = Path(d) / "int8.onnx", Path(d) / "fp32.onnx"
        lowbit.export_onnx(qm, q_path, example_inputs=(x[:1],))
        _export_float(model, f_path, x.shape[-1])
        qrun, frun = ort_model(q_path, args.threads), ort_model(f_path, args.threads)
        o = torch.cat([qrun(x[i : i + 16]) for i in range(0, len(x), 16)])
        with torch.no_grad():
            sim = qm(x)
        step = float([m for m in qm.modules() if isinstance(m, ActQuant)][-1].scale)
        d_steps = (o - sim).abs() / step
        ort = {"method": method, "observer": obs, "int8_bytes": q_path.stat().st_size,
               "fp32_bytes": f_path.stat().st_size,
               "ort_top1_agreement_with_float": float((o.argmax(1) == ref.argmax(1)).float().mean()),
               "ort_top1_agreement_with_lowbit": float((o.argmax(1) == sim.argmax(1)).float().mean()),
               "ort_vs_lowbit_steps_median": float(d_steps.median()),
               "ort_vs_lowbit_steps_max": float(d_steps.max()),
               "ms_int8": ms_per_call(qrun, x[:1]), "ms_fp32": ms_per_call(frun, x[:1]), "threads": args.threads}
    ort["speedup"] = ort["ms_fp32"] / ort["ms_int8"]
    ort["size_ratio"] = ort["int8_bytes"] / ort["fp32_bytes"]
    print(f"onnxruntime ({method}, {obs}): {ort['int8_bytes'] / 1e6:.2f} MB vs {ort['fp32_bytes'] / 1e6:.2f} MB "
          f"({ort['size_ratio']:.3f}x); top-1 agreement with float {100 * ort['ort_top1_agreement_with_float']:.1f}%, "
          f"with lowbit's forward {100 * ort['ort_top1_agreement_with_lowbit']:.1f}%; logits vs lowbit: median "
          f"{ort['ort_vs_lowbit_steps_median']:.1f}, max {ort['ort_vs_lowbit_steps_max']:.1f} steps; batch 1, "
          f"{args.threads} thread(s): {ort['ms_int8']:.2f} ms vs {ort['ms_fp32']:.2f} ms = {ort['speedup']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "onnxruntime": ort, "n_eval": len(x),
                                               "n_calib": len(calib)}, indent=2))


if __name__ == "__main__":
    main()
