"""QAT of full-integer (static W8A8) CNNs: the training form computes the integer model bit for bit, trained
weights / scales / biases convert to quantize_static's form exactly, training lowers the KL, and the result
exports to ONNX like any static model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import LowbitError
from lowbit.isolate import run_isolated
from lowbit.model.qmodules import QConv2d, QLinear
from lowbit.model.static import ActQuant, quantize_static
from lowbit.qat.modules import QATConv2d, QATLinear
from lowbit.qat.static import (
    LearnedActQuant,
    StaticQatOptions,
    convert_static,
    prepare_static,
    random_crops,
    train_static,
)
from tests.model.test_static import _tiny


@pytest.fixture(scope="module")
def tiny():
    """A tiny CNN that 8-bit per-tensor activations hurt: two loud channels stretch the grid after the stem and
    the depthwise conv over the others (what per-tensor ranges cost MobileNetV2, in miniature)."""
    m = _tiny()
    m.stem[2] = nn.ReLU()
    with torch.no_grad():
        m.fc.weight.mul_(10)  # sharp class distributions
        m.stem[1].weight[:2].mul_(30)
        m.dw[1].weight[:2].mul_(30)
    torch.manual_seed(2)
    canvas = torch.randn(16, 3, 14, 14) + 1.5 * torch.randn(16, 3, 1, 1)  # images of different colours
    qm, _ = quantize_static(m, canvas[:, :, 1:13, 1:13], observer="minmax", equalize=None, progress=False)
    return m, qm, canvas


def test_the_training_form_is_the_integer_model_bit_for_bit(tiny):
    _, qm, canvas = tiny
    x = canvas[:, :, 1:13, 1:13]
    g = prepare_static(qm)
    kinds = {type(m) for m in g.modules()}
    assert QATConv2d in kinds and QATLinear in kinds and LearnedActQuant in kinds
    assert not any(type(m) in (QConv2d, QLinear, ActQuant) for m in g.modules())
    with torch.no_grad():
        assert torch.equal(g(x), qm(x))
    assert torch.equal(convert_static(prepare_static(qm))(x), qm(x))
    assert all(type(m) in (QConv2d, QLinear) for m in qm.modules() if isinstance(m, QConv2d | QLinear))  # unchanged


def test_trained_parameters_convert_exactly(tiny):
    """Whatever training did to latent weights, scales, activation scales and biases, the converted model is what
    the training form computed: the same codes, grids and int32 biases."""
    _, qm, canvas = tiny
    x = canvas[:, :, 1:13, 1:13]
    g = prepare_static(qm)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, QATLinear):
                m.weight.add_(0.02 * torch.randn(m.weight.shape, generator=gen))
                for p in m.grid_params():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
                if m.bias is not None:
                    m.bias.add_(0.1 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, LearnedActQuant):
                m.grid_s.fill_(0.1 * float(torch.randn((), generator=gen)))
        want = g(x)
    c = convert_static(g)
    assert torch.equal(c(x), want)
    for name, m in c.named_modules():
        if isinstance(m, ActQuant):
            assert type(m) is ActQuant and m.observer is None
        if isinstance(m, QConv2d | QLinear) and m.bias is not None:
            aq = lowbit.model.static.input_act(c, next(n for n in c.graph.nodes if n.target == name))
            codes, s = lowbit.model.static.bias_grid(m.bias, aq, m.qweight)
            assert torch.equal((codes.double() * s).float(), m.bias)  # on the accumulator's grid


def test_training_lowers_the_kl_and_is_deterministic(tiny):
    m, qm, canvas = tiny
    opts = StaticQatOptions(steps=60, batch=8, lr=1e-4, scale_lr=1e-2, val_images=4)
    a, ra = train_static(qm, m, canvas, opts, size=12, progress=False)
    b, rb = train_static(qm, m, canvas, opts, size=12, progress=False)
    assert ra.train_images == 12 and ra.val_images == 4 and ra.layers == 4
    assert ra.val_kl_start > 0.01 and ra.val_kl_end < 0.5 * ra.val_kl_start and ra.kept  # images it never saw
    assert "held-out KL" in ra.summary() and "trained model kept" in ra.summary()
    x = canvas[:, :, 1:13, 1:13]
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and rb.val_kl_end == ra.val_kl_end
        assert not torch.equal(a(x), qm(x))


def test_training_that_hurts_the_held_out_images_returns_the_start(tiny):
    m, qm, canvas = tiny
    m.train()
    try:
        out, r = train_static(qm, m, canvas, StaticQatOptions(steps=6, batch=4, lr=3.0, scale_lr=3.0), size=12,
                              progress=False)
        assert m.training  # the teacher ran in eval mode, and the caller's model is left as it was
    finally:
        m.eval()
    assert not r.kept and out is qm and "post-training model kept" in r.summary()


def test_random_crops_are_seeded_and_sized():
    canvas = torch.randn(3, 3, 20, 16)
    a = random_crops(canvas, 5, 8, torch.Generator().manual_seed(0), 0.25)
    b = random_crops(canvas, 5, 8, torch.Generator().manual_seed(0), 0.25)
    assert a.shape == (5, 3, 8, 8) and torch.equal(a, b)


@pytest.mark.parametrize("raw, message", [
    ({"stepz": 3}, "unknown option(s) stepz"),
    ({"init": "awq"}, "option 'init' must be gptq or rtn"),
    ({"steps": "many"}, "option 'steps' must be int"),
    ({"min_crop": 0}, "min_crop"),
])
def test_bad_options_are_one_line_errors(raw, message):
    with pytest.raises(LowbitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StaticQatOptions.parse(raw)


def test_images_smaller_than_the_input_are_refused(tiny):
    m, qm, canvas = tiny
    with pytest.raises(LowbitError, match="smaller than the model's input"):
        train_static(qm, m, canvas, StaticQatOptions(steps=1), size=32)


def _ort(path: str, x: np.ndarray):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_the_trained_model_exports_to_onnx_and_runs_there(tiny, tmp_path):
    m, qm, canvas = tiny
    out, r = train_static(qm, m, canvas, StaticQatOptions(steps=20, batch=8, lr=1e-4, scale_lr=1e-2, val_images=0),
                          size=12, progress=False)
    assert r.kept and r.val_kl_start is None
    x = canvas[:, :, 1:13, 1:13]
    path = tmp_path / "qat.onnx"
    rep = lowbit.export_onnx(out, path, example_inputs=(x[:1],))
    assert rep.quantized_layers == 4
    got = run_isolated(_ort, str(path), x.numpy(), what="onnxruntime (QDQ of the trained model)")
    with torch.no_grad():
        ours = out(x).numpy()
    step = float([mm for mm in out.modules() if isinstance(mm, ActQuant)][-1].scale)
    assert np.abs(got - ours).max() <= 1.01 * step  # DQ -> float op -> Q: lowbit's arithmetic


def test_a_killed_run_resumes_to_the_same_bits(tiny, tmp_path, monkeypatch):
    from lowbit.qat import static as S

    m, qm, canvas = tiny
    opts = StaticQatOptions(steps=8, batch=4, lr=1e-4, scale_lr=1e-2, val_images=4)
    ref, rr = train_static(qm, m, canvas, opts, size=12, progress=False)
    assert rr.kept  # the trained model, not the start
    monkeypatch.setattr(S, "CHECKPOINT_SECONDS", 0.0)  # a checkpoint after every step
    real = S.train_steps
    calls = []

    def killed(groups, steps, items, loss_of, **kw):
        def counted(i):
            calls.append(i)
            if len(calls) == 6:
                raise KeyboardInterrupt  # killed during step 6
            return loss_of(i)
        return real(groups, steps, items, counted, **kw)

    monkeypatch.setattr(S, "train_steps", killed)
    folder = tmp_path / "resume"
    with pytest.raises(KeyboardInterrupt):
        train_static(qm, m, canvas, opts, size=12, progress=False, resume_dir=folder)
    assert (folder / "e2e.safetensors").exists()
    calls.clear()
    def counting(groups, steps, items, loss_of, **kw):
        return real(groups, steps, items, lambda i: calls.append(i) or loss_of(i), **kw)

    monkeypatch.setattr(S, "train_steps", counting)
    out, r = train_static(qm, m, canvas, opts, size=12, progress=False, resume_dir=folder)
    assert r.resumed_at == 5 and len(calls) == 3 and "resumed at step 5" in r.summary()  # only steps 6-8 trained
    x = canvas[:, :, 1:13, 1:13]
    with torch.no_grad():
        assert torch.equal(out(x), ref(x))
    (folder / "e2e.safetensors").write_bytes(b"\x00" * 16)  # damaged: a one-line error naming it
    with pytest.raises(LowbitError, match="e2e.safetensors is unreadable"):
        train_static(qm, m, canvas, opts, size=12, progress=False, resume_dir=folder)


def test_lowbit_quantize_takes_method_qat_for_a_cnn(tiny):
    from lowbit.methods.registry import MethodConfig

    m, qm, canvas = tiny
    x = canvas[:, :, 1:13, 1:13]
    q, rep = lowbit.quantize(m, calib=x, scheme="int8", act="int8-static", method="qat", observer="minmax",
                             config=MethodConfig(options={"steps": 3, "batch": 4, "val_images": 0}), progress=False)
    assert rep.method == "qat" and rep.qat.steps == 3 and rep.qat.kept and rep.to_dict()["qat"]["steps"] == 3
    assert any(isinstance(mm, QConv2d) for mm in q.modules()) and not any(isinstance(mm, QATLinear)
                                                                         for mm in q.modules())
    with pytest.raises(LowbitError, match="unknown option"):
        lowbit.quantize(m, calib=x, scheme="int8", act="int8-static", method="qat",
                        config=MethodConfig(options={"stepz": 3}))
