import pytest
import torch

import lowbit.methods.hqq  # noqa: F401  (registers "hqq")
from lowbit.core.scheme import parse_scheme
from lowbit.errors import LowbitError
from lowbit.methods.hqq import HqqOptions, hqq, hqq_quantize, shrink_lp
from lowbit.methods.registry import LayerStats, MethodConfig, get_method, method_spec
from lowbit.methods.rtn import quantize_rtn
from lowbit.primitives.quant import group_view


def make_w(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed weights (Student-t, 4 d.o.f.) with per-row scales, like trained linear layers."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, cols, generator=g)
    chi = torch.randn(rows, cols, 4, generator=g).square().sum(-1) / 4
    row_scale = torch.rand(rows, 1, generator=g) * 0.04 + 0.01
    return z / chi.sqrt() * row_scale


def wmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).square().mean())


def run(w, scheme, **options):
    """HQQ on plain weight MSE (the reference's objective) unless ``weighting`` is given."""
    options.setdefault("weighting", "uniform")
    return hqq(w, LayerStats(), parse_scheme(scheme), MethodConfig(options=options))


@pytest.mark.parametrize("zero", ["", "-zf16"])
@pytest.mark.parametrize("base", ["int4-g64", "int3-g64", "int2-g64"])
def test_beats_minmax_rtn_on_weight_error(base, zero):
    scheme = base + zero
    w = make_w(64, 512)
    r = run(w, scheme)
    e_hqq = wmse(r.qtensor.dequantize(), w)
    e_rtn = wmse(quantize_rtn(w, parse_scheme(scheme)).dequantize(), w)
    assert e_hqq < 0.97 * e_rtn
    # It also beats RTN with the MSE-optimal clipping search it starts from.
    assert e_hqq < wmse(quantize_rtn(w, parse_scheme(scheme), "mse").dequantize(), w)
    assert r.loss == pytest.approx(e_hqq, rel=1e-4)
    assert r.info["rtn_mse"] == pytest.approx(e_rtn, rel=1e-4)


@pytest.mark.parametrize("scheme", ["int4-g64-sym", "nf4-g64", "int4-g128", "int4-ch", "int8", "int3-g128-zf16"])
def test_other_grids_beat_rtn(scheme):
    w = make_w(32, 256, seed=1)
    r = run(w, scheme)
    assert wmse(r.qtensor.dequantize(), w) < wmse(quantize_rtn(w, parse_scheme(scheme)).dequantize(), w)


@pytest.mark.parametrize("scheme", ["int3-g64", "int4-g64-zf16", "int4-g32-sym"])
def test_never_worse_than_rtn_per_group(scheme):
    w = make_w(32, 200, seed=2)  # ragged last group
    sch = parse_scheme(scheme)
    q = run(w, scheme, iters=5).qtensor
    err = group_view(q.dequantize() - w, sch.granularity, sch.group_size).square().sum(-1)
    err_rtn = group_view(quantize_rtn(w, sch).dequantize() - w, sch.granularity, sch.group_size).square().sum(-1)
    assert torch.all(err <= err_rtn)
    assert (err < err_rtn).float().mean() > 0.5


def test_integer_zero_points_stay_on_the_code_grid():
    q = run(make_w(16, 256), "int3-g64").qtensor
    _, z = q.qparams()
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 7
    assert q.bits_per_weight == pytest.approx(quantize_rtn(make_w(16, 256), parse_scheme("int3-g64")).bits_per_weight)


def test_output_error_beats_rtn_without_data():
    w = make_w(64, 256, seed=3)
    x = torch.randn(1024, 256, generator=torch.Generator().manual_seed(4))
    for scheme in ("int4-g64", "int3-g64", "int2-g64"):
        q = run(w, scheme).qtensor.dequantize()
        rtn = quantize_rtn(w, parse_scheme(scheme)).dequantize()
        assert (x @ (w - q).T).square().sum() < (x @ (w - rtn).T).square().sum()


def test_importance_weighting():
    w = make_w(32, 128, seed=5)
    imp = torch.rand(128, generator=torch.Generator().manual_seed(6)) ** 4 * 10  # very uneven input channels
    stats = LayerStats(sq_mean=imp)
    sch = parse_scheme("int3-g32")
    r = hqq(w, stats, sch, MethodConfig(importance=True, options={"weighting": "uniform"}))
    werr = float(((r.qtensor.dequantize() - w).square() * imp).mean())
    werr_rtn = float(((quantize_rtn(w, sch).dequantize() - w).square() * imp).mean())
    assert werr < werr_rtn
    assert r.loss == pytest.approx(werr, rel=1e-4)
    with pytest.raises(LowbitError, match="sq_mean"):
        hqq(w, LayerStats(), sch, MethodConfig(importance=True))


@pytest.mark.parametrize("scheme", ["int4-g64", "int3-g64", "int4-g32-sym"])
def test_magnitude_weighting_keeps_large_weights_closer(scheme):
    # the default objective: error weighted by (group rms + |w|) per element; never worse than RTN on it, and
    # the largest weights end closer to their values than under plain weight MSE
    w = make_w(64, 256, seed=8)
    sch = parse_scheme(scheme)
    r = hqq(w, LayerStats(), sch, MethodConfig())
    assert r.info["options"]["weighting"] == "magnitude"
    xg = group_view(w, sch.granularity, sch.group_size)
    weight = xg.square().mean(-1, keepdim=True).sqrt() + xg.abs()

    def objective(q):
        return (group_view(q.dequantize() - w, sch.granularity, sch.group_size).square() * weight).sum(-1)

    ours, rtn = objective(r.qtensor), objective(quantize_rtn(w, sch))
    assert torch.all(ours <= rtn) and float(ours.sum()) < 0.97 * float(rtn.sum())
    assert r.loss == pytest.approx(float(ours.sum()) / w.numel(), rel=1e-4)
    big = w.abs() >= w.abs().quantile(0.99)
    uniform = run(w, scheme).qtensor.dequantize()
    assert (r.qtensor.dequantize() - w)[big].abs().mean() < (uniform - w)[big].abs().mean()


def test_deterministic_and_pure():
    w = make_w(48, 192, seed=7)
    w_copy = w.clone()
    a, b = run(w, "int4-g64").qtensor, run(w, "int4-g64").qtensor
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    assert torch.equal(w, w_copy)


def test_options():
    w = make_w(16, 128)
    r = run(w, "int4-g64", iters=3, p=0.5, beta=1.0, kappa=1.5, polish=0, init="minmax")
    assert r.info["options"] == {"iters": 3, "p": 0.5, "beta": 1.0, "kappa": 1.5, "polish": 0, "init": "minmax",
                                 "weighting": "uniform"}
    assert r.loss <= r.info["rtn_mse"]
    for bad, match in [({"iters": -1}, "iters"), ({"p": 1.5}, "'p'"), ({"kappa": 0.5}, "kappa"),
                       ({"lr": 0.1}, "unknown option"), ({"init": "nope"}, "observer"),
                       ({"weighting": "nope"}, "weighting"), ({"iters": "x"}, "bad option")]:
        with pytest.raises(LowbitError, match=match):
            run(w, "int4-g64", **bad)
    with pytest.raises(LowbitError, match="NaN or Inf"):
        hqq_quantize(torch.full((4, 64), float("nan")), parse_scheme("int4-g32"), HqqOptions())


def test_plain_cast_and_tensor_granularity():
    w = make_w(8, 64)
    r = run(w, "bf16")
    assert torch.equal(r.qtensor.dequantize(), w.to(torch.bfloat16).float())
    r = run(w, "int8-tensor")
    assert wmse(r.qtensor.dequantize(), w) <= wmse(quantize_rtn(w, parse_scheme("int8-tensor")).dequantize(), w)


def test_shrink_lp():
    r = torch.tensor([-3.0, -0.2, 0.0, 0.2, 3.0])
    e = shrink_lp(r, beta=2.0, p=0.7)
    assert torch.equal(e[1:4], torch.zeros(3))  # small residuals are not outliers
    assert torch.allclose(e[[0, 4]], torch.tensor([-1.0, 1.0]) * (3 - 3**-0.3 / 2))


def test_registered_as_data_free_method():
    assert get_method("hqq") is hqq
    assert not method_spec("hqq").needs_data and method_spec("hqq").layouts == ("affine",)
