"""``export_onnx`` of full-integer models: the QDQ graph holds lowbit's own codes, and onnxruntime runs it on its
integer kernels (in a child process: a crash in onnxruntime fails one test, not the run)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import lowbit
from lowbit.errors import LowbitError
from lowbit.isolate import run_isolated
from lowbit.model.qmodules import QConv2d, QLinear
from lowbit.model.static import ActQuant, quantize_static
from tests.model.test_static import _tiny


def _run_ort(path: str, x: np.ndarray, optimize: bool, optimized_copy: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_copy:
        so.optimized_model_filepath = optimized_copy
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory):
    m = _tiny()
    torch.manual_seed(1)
    x = torch.randn(24, 3, 12, 12)
    qm, rep = quantize_static(m, x[:16], observer="minmax")
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    report = lowbit.export_onnx(qm, path, example_inputs=(x[:1],))
    return m, qm, x, path, report


def test_the_file_holds_lowbits_codes_and_scales(tiny_int8):
    _, qm, _, path, report = tiny_int8
    assert report.quantized_layers == 4 and report.activation_points == sum(
        isinstance(m, ActQuant) for m in qm.modules())
    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for name, mod in qm.named_modules():
        if not isinstance(mod, QConv2d | QLinear):
            continue
        codes = inits[f"{name}.weight_quantized"]
        assert codes.dtype == np.uint8  # lowbit's stored codes (int8 + 128) with zero point 128: u8 x u8 kernels
        assert np.array_equal(codes, mod.qweight.codes.reshape(codes.shape).numpy()), name  # nothing re-rounded
        assert (inits[f"{name}.weight_zero_point"] == 128).all()
        assert np.array_equal(inits[f"{name}.weight_scale"], mod.qweight.qparams()[0].reshape(-1).numpy())
        assert inits[f"{name}.bias_quantized"].dtype == np.int32
        assert f"{name}.weight" not in inits  # no float copy of the weight
    qs = [n for n in g.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == report.activation_points


def test_onnxruntime_runs_it_on_integer_kernels_and_matches_lowbit(tiny_int8, tmp_path):
    _, qm, x, path, _ = tiny_int8
    opt = tmp_path / "opt.onnx"
    got = run_isolated(_run_ort, str(path), x.numpy(), True, str(opt), what="onnxruntime (QDQ, optimised)")
    plain = run_isolated(_run_ort, str(path), x.numpy(), False, what="onnxruntime (QDQ, no fusion)")
    ops = {n.op_type for n in onnx.load(str(opt)).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops  # every conv fused into the integer kernel
    assert "QGemm" in ops and "Gemm" not in ops  # and the classifier
    with torch.no_grad():
        ours = qm(x).numpy()
    step = float(qm.get_submodule([n for n, m in qm.named_modules() if isinstance(m, ActQuant)][-1]).scale)
    # the graph without fusion is lowbit's arithmetic: DQ -> float op -> Q, up to float summation order
    assert np.abs(plain - ours).max() <= 1.01 * step
    # onnxruntime's integer kernels requantize in their own order: a few logits move by one step
    assert np.abs(got - ours).max() <= 3.01 * step
    assert (got.argmax(1) == ours.argmax(1)).mean() >= 0.9


def _zero_point_types(path) -> set:
    g = onnx.load(str(path)).graph
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"}
    consts |= {i.name: numpy_helper.to_array(i) for i in g.initializer}
    return {consts[n.input[2]].dtype for n in g.node if n.op_type == "QuantizeLinear"}


def test_int8_activations_are_the_uint8_graph_shifted(tmp_path):
    m = _tiny()
    x = torch.randn(8, 3, 12, 12)
    qu, _ = quantize_static(m, x, observer="minmax", act_dtype="uint8", method="rtn")
    qs, _ = quantize_static(m, x, observer="minmax", act_dtype="int8", method="rtn")
    with torch.no_grad():
        assert torch.equal(qu(x), qs(x))  # the same values, codes shifted by 128
    lowbit.export_onnx(qu, tmp_path / "u8.onnx", example_inputs=(x[:1],))
    lowbit.export_onnx(qs, tmp_path / "s8.onnx", example_inputs=(x[:1],))
    assert _zero_point_types(tmp_path / "u8.onnx") == {np.dtype(np.uint8)}
    assert _zero_point_types(tmp_path / "s8.onnx") == {np.dtype(np.int8)}
    a = run_isolated(_run_ort, str(tmp_path / "u8.onnx"), x.numpy(), False, what="onnxruntime u8")
    b = run_isolated(_run_ort, str(tmp_path / "s8.onnx"), x.numpy(), False, what="onnxruntime s8")
    assert np.array_equal(a, b)


def test_export_refuses_what_it_cannot_write(tiny_int8, tmp_path, tiny_llama):
    _, qm, x, path, _ = tiny_int8
    with pytest.raises(LowbitError, match="exists"):
        lowbit.export_onnx(qm, path, example_inputs=(x[:1],))
    with pytest.raises(LowbitError, match="example_inputs"):
        lowbit.export_onnx(qm, tmp_path / "a.onnx")
    from lowbit.io.onnx.qdq import write_qdq_onnx

    with pytest.raises(LowbitError, match="not a full-integer"):
        write_qdq_onnx(tiny_llama[0] if isinstance(tiny_llama, tuple) else tiny_llama, tmp_path / "b.onnx", (x[:1],))
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()
