"""Quantization-aware training: the trainable grids are the stored grids, bit for bit; block training lowers
the block's error and never leaves it worse; the method runs through the one runner, the API and the CLI."""

from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.kernels import use_kernels
from lowbit.methods.registry import MethodConfig, method_spec
from lowbit.model.plan import Plan
from lowbit.model.qmodules import QLinear
from lowbit.model.quantize import quantize_model
from lowbit.qat import QATLinear, convert, prepare
from lowbit.qat.block import BlockTrainOptions, train_block
from tests.conftest import make_tiny_llama

SCHEMES = ["int4-g64", "int3-g64", "int2-g64", "int4-g32-sym", "int8", "int4-g64-zf16", "fp8",
           "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


@pytest.mark.parametrize("name", SCHEMES)
def test_trainable_grid_is_the_stored_grid(name):
    """Untrained, the layer stores exactly the PTQ tensor; after random moves of the weight and of every float
    grid parameter its forward weight is still bit for bit what it stores."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 512, generator=g) * 0.05
    q = lowbit.quantize_tensor(w, name)
    layer = QATLinear(q, w)
    start = layer.to_qtensor()
    assert torch.equal(start.codes, q.codes)
    for part in ("scales", "zeros"):
        a, b = getattr(start, part), getattr(q, part)
        assert (a is None and b is None) or torch.equal(a, b)
    with torch.no_grad():
        layer.weight.add_(torch.randn(layer.weight.shape, generator=g) * 0.01)
        for p in layer.grid_params():
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))
    assert torch.equal(layer.fake_weight(), layer.to_qtensor().dequantize(torch.float32))
    x = torch.randn(3, 512, generator=g)
    layer(x).square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.grid_params())
    assert any(p.grad.abs().sum() > 0 for p in layer.grid_params())


def test_scale_trains_at_its_stored_precision():
    q = lowbit.quantize_tensor(torch.randn(4, 64), "int4-g32")
    layer = QATLinear(q, q.dequantize(torch.float32))
    with torch.no_grad():
        layer.grid_s.add_(1e-5)  # below float16's resolution at these scales: stored as before
    assert torch.equal(layer.to_qtensor().scales, q.scales)


def test_lookup_grids_have_no_trainable_form():
    q = lowbit.quantize_tensor(torch.randn(4, 256), "iq4_nl")
    with pytest.raises(LowbitError, match="iq4_nl.*no trainable form"):
        QATLinear(q, q.dequantize(torch.float32))


def _block_and_data(seed: int = 0):
    model = make_tiny_llama(300)
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(1, 300, (8, 32), generator=g)
    return model, windows


def _kl(a, b, ids) -> float:
    with torch.no_grad():
        la, lb = a(ids).logits.log_softmax(-1), b(ids).logits.log_softmax(-1)
    return float((la.exp() * (la - lb)).sum(-1).mean())


def test_block_training_lowers_the_block_error_and_lr_zero_keeps_ptq():
    from lowbit.model.calibrate import capture_block_inputs, run_block

    model, windows = _block_and_data()
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, windows, batch_size=4)
    targets = [t.hidden for t in run_block(block, inputs)]
    qmodel = copy.deepcopy(model)
    quantize_model(qmodel, Plan.default("int2-g32", "rtn"), progress=False)
    qblock = qmodel.model.layers[0]
    names = [n for n, m in qblock.named_modules() if isinstance(m, QLinear)]
    before = {n: qblock.get_submodule(n).qweight for n in names}

    still = train_block(copy.deepcopy(qblock), names, inputs, targets, BlockTrainOptions(lr=0.0, scale_lr=0.0))
    assert not still.kept and still.loss_after == pytest.approx(still.loss_before, rel=1e-6)

    # judged on the windows it trains on (val_windows=0): the optimisation itself must work
    res = train_block(qblock, names, inputs, targets, BlockTrainOptions(epochs=10, lr=1e-3, scale_lr=1e-2,
                                                                         val_windows=0))
    assert res.kept and res.loss_after < 0.5 * res.loss_before
    assert all(isinstance(qblock.get_submodule(n), QLinear) for n in names)  # converted back
    changed = [n for n in names if not torch.equal(qblock.get_submodule(n).qweight.codes, before[n].codes)]
    assert changed  # codes moved: the weights trained, not only the scales


def test_qat_method_beats_its_start_and_is_deterministic():
    """On a random tiny model generalisation means nothing, so it is judged where it trains (val_windows=0, KL on
    the calibration windows): the mechanism, not the recipe (SmolLM2's held-out figures are in bench/RESULTS.md)."""
    model, windows = _block_and_data()
    ids = windows
    opts = {"block_epochs": 10.0, "lr": 1e-3, "scale_lr": 1e-2, "val_windows": 0}
    kls, codes = {}, []
    for method, options in (("gptq", {}), ("qat", opts), ("qat", opts)):
        qm = copy.deepcopy(model)
        rep = quantize_model(qm, Plan.default("int2-g32", method, config=MethodConfig(options=options)), windows,
                             batch_size=4, progress=False)
        kls.setdefault(method, []).append(_kl(model, qm, ids))
        if method == "qat":
            codes.append([m.qweight.codes for m in qm.modules() if isinstance(m, QLinear)])
            assert all("qat block loss" in r.note for r in rep.layers if r.name.startswith("model.layers."))
    assert kls["qat"][0] < kls["gptq"][0]
    assert kls["qat"][0] == kls["qat"][1]  # deterministic: same inputs and seed, same model
    assert all(torch.equal(a, b) for a, b in zip(*codes, strict=True))


def test_qat_options_pass_to_the_start_method_and_are_checked():
    spec = method_spec("qat")
    cfg = MethodConfig(options={"init": "awq+gptq", "damp": 0.05, "lr": 1e-5})
    assert spec.transform_for(cfg)[0] == "awq" and "xtx" in spec.needs_for(cfg)
    _, own = spec.parse(cfg)
    assert own.lr == 1e-5 and own.init == "awq+gptq"
    assert spec.transform_for(MethodConfig(options={"init": "rtn"})) is None
    with pytest.raises(LowbitError, match="init='nope' is not a method"):
        spec.parse(MethodConfig(options={"init": "nope"}))
    with pytest.raises(LowbitError, match="unknown option.*bogus"):
        spec.parse(MethodConfig(options={"bogus": 1}))


def test_prepare_train_convert_api():
    """Your own training loop: prepare a float (or quantized) model, train it, convert it to QLinear layers."""
    model, windows = _block_and_data()
    qat_model = prepare(copy.deepcopy(model), "int4-g32")
    layers = [m for m in qat_model.modules() if isinstance(m, QATLinear)]  # 7 per block and the head
    assert len(layers) == 15 and not any(isinstance(m, torch.nn.Linear) and not isinstance(m, QATLinear)
                                         for m in qat_model.model.layers.modules())
    opt = torch.optim.Adam([p for m in layers for p in m.parameters() if p.requires_grad], lr=1e-4)
    loss = torch.nn.functional.cross_entropy(qat_model(windows).logits[:, :-1].reshape(-1, 300),
                                             windows[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    with torch.no_grad():
        fake = qat_model(windows).logits
    qmodel = convert(qat_model)
    assert not any(isinstance(m, QATLinear) for m in qmodel.modules())
    with torch.no_grad(), use_kernels("reference"):  # the dequantized weights, as training computed them
        assert torch.allclose(qmodel(windows).logits, fake, atol=1e-5, rtol=1e-5)
    # prepare from an already quantized model: training starts exactly at it
    ptq, _ = lowbit.quantize(copy.deepcopy(model), scheme="int4-g32", method="rtn")
    again = convert(prepare(copy.deepcopy(ptq)))
    a = [m.qweight.codes for m in ptq.modules() if isinstance(m, QLinear)]
    b = [m.qweight.codes for m in again.modules() if isinstance(m, QLinear)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_end_to_end_distillation_lowers_the_kl_to_the_teacher():
    from lowbit.qat.e2e import DistillOptions, distill, teacher_topk, topk_kl

    model, windows = _block_and_data()
    teacher = teacher_topk(model, windows, k=300)  # the whole vocabulary: the top-k KL is the exact KL
    with torch.no_grad():
        exact = _kl(model, model, windows)
        assert float(topk_kl(model(windows).logits, *teacher).mean()) == pytest.approx(exact, abs=1e-6)
    qm = copy.deepcopy(model)
    quantize_model(qm, Plan.default("int3-g32", "rtn"), progress=False)
    names = [n for n, m in qm.named_modules() if isinstance(m, QLinear)]
    floats = {n: model.get_submodule(n).weight for n in names}  # RTN rounded these: the latent weights
    with use_kernels("reference"):
        before = _kl(model, qm, windows)
        res = distill(qm, names, windows, teacher, DistillOptions(steps=40, lr=1e-2, val_windows=0), latents=floats)
        after = _kl(model, qm, windows)
    assert res.kept and after < 0.8 * before and res.kl_after < res.kl_before
    assert all(isinstance(qm.get_submodule(n), QLinear) for n in names)


def test_topk_kl_with_the_tail_lies_between_the_top_k_terms_and_the_full_kl():
    from lowbit.qat.e2e import topk_kl

    g = torch.Generator().manual_seed(0)
    t_logits, s_logits = torch.randn(5, 7, 300, generator=g) * 3, torch.randn(5, 7, 300, generator=g) * 3
    t = t_logits.log_softmax(-1)
    full = (t.exp() * (t - s_logits.log_softmax(-1))).sum(-1)
    for k in (1, 8, 64):
        v, i = t.topk(k, dim=-1)
        with_tail, without = topk_kl(s_logits, v, i), topk_kl(s_logits, v, i, rest=False)
        assert torch.all(with_tail <= full + 1e-5) and torch.all(with_tail >= -1e-6)  # a KL over k + 1 categories
        assert not torch.equal(with_tail, without)
    v, i = t.topk(300, dim=-1)  # the whole vocabulary: nothing left in the tail, the exact KL
    assert torch.allclose(topk_kl(s_logits, v, i), full, atol=1e-4)
    # the flaw the tail term removes: a student that copies the teacher's top-k and drops its tail scores better
    # than the teacher itself on the top-k terms alone; with the tail, the teacher (KL 0) wins
    v, i = t.topk(8, dim=-1)
    dropped = torch.full_like(t, -1e4).scatter_(-1, i, v)  # the top-k logits kept, the tail's mass gone
    assert float(topk_kl(dropped, v, i, rest=False).mean()) < float(topk_kl(t, v, i, rest=False).mean())
    assert abs(float(topk_kl(t, v, i).mean())) < 1e-5 < float(topk_kl(dropped, v, i).mean())


def test_end_to_end_weights_train_too_and_bfloat16_products_still_lower_the_kl():
    """At ``weight_lr`` > 0 the latent weights move across grid points (codes change, not only scales); with the
    matrix products in bfloat16 the trained model (stored, evaluated in float32) is still closer to the teacher."""
    from lowbit.qat.e2e import DistillOptions, distill, teacher_topk

    model, windows = _block_and_data()
    teacher = teacher_topk(model, windows, k=300)
    results = {}
    for weight_lr, dtype in ((0.0, "float32"), (1e-4, "float32"), (1e-4, "bfloat16")):
        qm = copy.deepcopy(model)
        quantize_model(qm, Plan.default("int3-g32", "rtn"), progress=False)
        names = [n for n, m in qm.named_modules() if isinstance(m, QLinear)]
        start = {n: qm.get_submodule(n).qweight.codes.clone() for n in names}
        floats = {n: model.get_submodule(n).weight for n in names}
        with use_kernels("reference"):
            before = _kl(model, qm, windows)
            res = distill(qm, names, windows, teacher, DistillOptions(steps=40, lr=1e-2, val_windows=0,
                                                                      weight_lr=weight_lr, dtype=dtype),
                          latents=floats)
            after = _kl(model, qm, windows)
        assert res.kept and after < 0.8 * before
        moved = sum(int((qm.get_submodule(n).qweight.codes != start[n]).sum()) for n in names)
        results[weight_lr, dtype] = after, moved
    # more codes move when the weights train (with the scales alone, codes change only as the scales move), and
    # the model ends closer to the teacher (measured: KL 6.1e-4 with the grids alone, 4.5e-4 with the weights)
    assert results[1e-4, "float32"][1] > 1.1 * results[0.0, "float32"][1]
    assert results[1e-4, "float32"][0] < 0.9 * results[0.0, "float32"][0]


def test_end_to_end_dtype_is_checked_and_auto_follows_the_hardware():
    from lowbit.qat.e2e import compute_dtype

    assert compute_dtype("float32") == torch.float32 and compute_dtype("bfloat16") == torch.bfloat16
    assert compute_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(LowbitError, match="e2e_dtype"):
        compute_dtype("fp16")
    with pytest.raises(LowbitError, match="'e2e_dtype' must be one of"):
        method_spec("qat").parse(MethodConfig(options={"e2e_dtype": "half"}))
    with pytest.raises(LowbitError, match="learning rates"):
        method_spec("qat").parse(MethodConfig(options={"e2e_weight_lr": -1.0}))


@pytest.mark.parametrize("block_epochs", [1.0, 0.0])
def test_qat_runs_its_end_to_end_step_through_the_runner(block_epochs):
    model, windows = _block_and_data()
    opts = {"block_epochs": block_epochs, "steps": 8, "e2e_lr": 1e-2, "val_windows": 0, "topk": 16}
    qm = copy.deepcopy(model)
    rep = quantize_model(qm, Plan.default("int3-g32", "qat", config=MethodConfig(options=opts)), windows,
                         batch_size=4, progress=False)
    assert len(rep.notes) == 1 and rep.notes[0].startswith("qat end-to-end: held-out KL(top-k)")


@pytest.mark.parametrize("name", ["int3-g64", "q4_0", "q4_k", "q3_k"])
def test_training_starts_exactly_at_gptq(name):
    """GPTQ's rounded columns are the latent weights; where a GGML type refit its scales after choosing codes,
    the few latents that would now round elsewhere start at their stored value: step 0 is GPTQ's model."""
    from lowbit.core.scheme import parse_scheme
    from lowbit.methods.gptq import gptq_quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.05
    x = torch.randn(2000, 256, generator=g) * torch.linspace(0.1, 3, 256)
    q, _, info = gptq_quantize(w, x.T @ x, 2000, parse_scheme(name))
    layer = QATLinear(q, info["latent"])
    assert torch.equal(layer.fake_weight(), q.dequantize(torch.float32))
    assert torch.equal(layer.to_qtensor().codes, q.codes)
    moved = (layer.weight != q.dequantize(torch.float32)).float().mean()
    assert moved > 0.9  # the latents sit between grid points (else scales get no gradient)
