import pytest
import torch

import lowbit.methods.gptq  # noqa: F401  (registers "gptq")
from lowbit.core.scheme import parse_scheme
from lowbit.errors import LowbitError
from lowbit.methods.gptq import gptq, gptq_quantize, hessian_inverse_factor, reconstruction_loss
from lowbit.methods.registry import LayerStats, MethodConfig, get_method, method_spec
from lowbit.methods.rtn import quantize_rtn


def make_x(kind: str, tokens: int, n: int, seed: int = 0) -> torch.Tensor:
    """Calibration inputs (tokens, n): isotropic, or ill-conditioned (huge-scale and correlated columns)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g)
    if kind == "illcond":
        x[:, :3] *= 300.0  # a few huge-scale channels, as LLM activations have
        x[:, 3:40] = x[:, 40:77] + 1e-3 * torch.randn(tokens, 37, generator=g)  # near-duplicate channels
        x = x @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g) / n**0.5)  # mix: correlated inputs
    return x


def make_w(rows: int, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n, generator=g) * 0.05


def out_err(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||X Wᵀ - X Ŵᵀ||² / tokens computed from X directly (float64)."""
    return float((x.double() @ (w - w_hat).double().T).square().sum()) / x.shape[0]


def run(w, x, scheme, **options):
    stats = LayerStats(xtx=x.T @ x, tokens=x.shape[0])
    return gptq(w, stats, parse_scheme(scheme), MethodConfig(options=options))


SCHEMES = ["int4-g128", "int3-g64", "int2-g64", "int4-g64-sym", "int8"]


@pytest.mark.parametrize("kind", ["random", "illcond"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_beats_rtn_on_output_error(scheme, kind):
    x, w = make_x(kind, 2048, 256), make_w(48, 256)
    r = run(w, x, scheme)
    w_hat = r.qtensor.dequantize()
    rtn_hat = quantize_rtn(w, parse_scheme(scheme)).dequantize()
    e_gptq, e_rtn = out_err(x, w, w_hat), out_err(x, w, rtn_hat)
    assert e_gptq < 0.95 * e_rtn
    # The reported losses are the same measure, computed from xtx.
    assert r.loss == pytest.approx(e_gptq, rel=1e-3)
    assert r.info["rtn_loss"] == pytest.approx(e_rtn, rel=1e-3)
    assert not r.info["damp_raised"]


@pytest.mark.parametrize("act_order", [False, True])  # dynamic groups / static groups
@pytest.mark.parametrize("scheme", ["int4-g64", "int3-g64", "int4-g64-zf16"])
def test_ragged_last_group(scheme, act_order):
    x, w = make_x("illcond", 1024, 200), make_w(24, 200)  # 200 = 3 groups of 64 + 8
    r = run(w, x, scheme, act_order=act_order)
    assert r.qtensor.shape == (24, 200)
    assert r.loss < 0.95 * r.info["rtn_loss"]
    assert r.loss == pytest.approx(out_err(x, w, r.qtensor.dequantize()), rel=1e-3)


@pytest.mark.parametrize("scheme", ["int4-g64", "int3-g128-sym", "int8", "int8-tensor", "int4-ch", "nf4-g64", "fp8",
                                    "int4-g32-zf16"])
def test_qtensor_round_trip_equals_gptq_weights(scheme):
    x, w = make_x("random", 512, 192), make_w(16, 192)
    q, w_hat, _ = gptq_quantize(w, x.T @ x, 512, parse_scheme(scheme))
    assert torch.equal(q.dequantize(), w_hat)
    assert q.scheme == parse_scheme(scheme)
    assert reconstruction_loss(w, w_hat, x.T @ x, 512) <= reconstruction_loss(
        w, quantize_rtn(w, parse_scheme(scheme)).dequantize(), x.T @ x, 512)


@pytest.mark.parametrize("scheme", ["int4-g64", "int3-g64", "int4-g32-sym"])
def test_act_order_static_groups(scheme):
    x, w = make_x("illcond", 2048, 256), make_w(32, 256)
    plain, ordered = run(w, x, scheme, act_order=False), run(w, x, scheme)  # act_order is the default
    assert ordered.info["act_order"] and ordered.info["static_groups"]
    assert ordered.loss < 0.95 * ordered.info["rtn_loss"]
    assert not torch.equal(ordered.qtensor.codes, plain.qtensor.codes)
    # Static groups: the scales are min-max of the original weights' groups, in the plain (R, G) layout.
    rtn = quantize_rtn(w, parse_scheme(scheme))
    assert torch.equal(ordered.qtensor.scales, rtn.scales)
    assert ordered.qtensor.scales.shape == (32, 256 // parse_scheme(scheme).group_size)
    assert ordered.loss == pytest.approx(out_err(x, w, ordered.qtensor.dequantize()), rel=1e-3)


def test_static_groups_without_act_order():
    x, w = make_x("random", 1024, 128), make_w(16, 128)
    r = run(w, x, "int3-g32", static_groups=True, act_order=False)
    assert r.info["static_groups"] and not r.info["act_order"]
    assert torch.equal(r.qtensor.scales, quantize_rtn(w, parse_scheme("int3-g32")).scales)
    assert r.loss < r.info["rtn_loss"]


@pytest.mark.parametrize("block_size", [16, 48, 64, 1000])
def test_block_size_does_not_change_the_result(block_size):
    # Lazy batched updates are exact: any block size (smaller or larger than a group) gives the same GPTQ.
    x, w = make_x("random", 1024, 160), make_w(16, 160)
    ref = run(w, x, "int4-g64", block_size=128)
    r = run(w, x, "int4-g64", block_size=block_size)
    same = (r.qtensor.dequantize() == ref.qtensor.dequantize()).float().mean()
    assert same > 0.99
    assert r.loss == pytest.approx(ref.loss, rel=1e-2)


def test_singular_xtx_and_dead_columns():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 12, generator=g) @ torch.randn(12, 96, generator=g)  # rank 12 of 96
    x[:, [5, 50, 90]] = 0.0  # inputs that never fire
    w = make_w(16, 96)
    r = run(w, x, "int4-g32")
    assert r.info["dead_columns"] == 3
    assert r.info["damp"] == 0.01 and not r.info["damp_raised"]
    assert torch.all(r.qtensor.dequantize()[:, [5, 50, 90]] == 0)
    assert r.loss < r.info["rtn_loss"]
    # Without dampening the Cholesky of a rank-deficient Hessian fails: dampening is raised and reported.
    r0 = run(w, x, "int4-g32", damp=0.0)
    assert r0.info["damp_raised"] and r0.info["damp"] > 0
    assert r0.loss < r0.info["rtn_loss"]


def test_hessian_inverse_factor():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(64, 32, generator=g, dtype=torch.float64)
    h = a.T @ a
    u, damp, raised = hessian_inverse_factor(h, damp=0.01)
    hd = h + 0.01 * h.diagonal().mean() * torch.eye(32, dtype=torch.float64)
    assert torch.allclose(u.T @ u, torch.linalg.inv(hd), rtol=1e-8, atol=1e-10)
    assert torch.equal(u, torch.triu(u)) and damp == 0.01 and not raised


def test_indefinite_xtx_is_an_error():
    xtx = torch.tensor([[1.0, 5.0], [5.0, 1.0]])  # positive diagonal, but no sum of x xᵀ looks like this
    with pytest.raises(LowbitError, match="not positive definite"):
        gptq(torch.randn(4, 2), LayerStats(xtx=xtx, tokens=10), parse_scheme("int4-ch"), MethodConfig())


@pytest.mark.parametrize(
    "stats, match",
    [
        (LayerStats(), "run calibration first"),
        (LayerStats(xtx=torch.eye(32), tokens=0), "no tokens"),
        (LayerStats(xtx=torch.eye(16), tokens=10), "expected \\(32, 32\\)"),
        (LayerStats(xtx=torch.full((32, 32), float("nan")), tokens=10), "NaN"),
        (LayerStats(xtx=-torch.eye(32), tokens=10), "negative diagonal"),
    ],
)
def test_bad_statistics(stats, match):
    with pytest.raises(LowbitError, match=match):
        gptq(torch.randn(8, 32), stats, parse_scheme("int4-g16"), MethodConfig())


def test_bad_options_and_weights():
    stats = LayerStats(xtx=torch.eye(32), tokens=10)
    with pytest.raises(LowbitError, match="unknown option"):
        gptq(torch.randn(8, 32), stats, parse_scheme("int4-g16"), MethodConfig(options={"dampp": 0.1}))
    w = torch.randn(8, 32)
    w[0, 0] = float("inf")
    with pytest.raises(LowbitError, match="NaN or Inf"):
        gptq(w, stats, parse_scheme("int4-g16"), MethodConfig())
    with pytest.raises(LowbitError, match="sq_mean"):
        gptq(torch.randn(8, 32), stats, parse_scheme("int4-g16"), MethodConfig(importance=True))


def test_mse_observer_and_importance():
    x, w = make_x("illcond", 1024, 128), make_w(16, 128)
    stats = LayerStats(xtx=x.T @ x, tokens=1024, sq_mean=x.square().mean(0))
    r = gptq(w, stats, parse_scheme("int3-g32"), MethodConfig(observer="mse", importance=True))
    assert r.loss < 0.95 * r.info["rtn_loss"]
    assert r.loss == pytest.approx(out_err(x, w, r.qtensor.dequantize()), rel=1e-3)


def test_deterministic_and_pure():
    x, w = make_x("illcond", 1024, 128), make_w(32, 128)
    xtx = x.T @ x
    w_copy, xtx_copy = w.clone(), xtx.clone()
    a = gptq(w, LayerStats(xtx=xtx, tokens=1024), parse_scheme("int4-g64"), MethodConfig())
    b = gptq(w, LayerStats(xtx=xtx, tokens=1024), parse_scheme("int4-g64"), MethodConfig())
    assert torch.equal(a.qtensor.codes, b.qtensor.codes)
    assert torch.equal(a.qtensor.scales, b.qtensor.scales) and torch.equal(a.qtensor.zeros, b.qtensor.zeros)
    assert torch.equal(w, w_copy) and torch.equal(xtx, xtx_copy)


def test_bf16_weight_keeps_its_dtype():
    x = make_x("random", 512, 64)
    w = make_w(8, 64).to(torch.bfloat16)
    r = run(w, x, "int4-g32")
    assert r.qtensor.dtype == torch.bfloat16 and r.qtensor.dequantize().dtype == torch.bfloat16
    assert r.loss <= r.info["rtn_loss"]


def test_registered_as_data_method():
    assert get_method("gptq") is gptq
    assert method_spec("gptq").needs == {"xtx"} and method_spec("gptq").needs_data


@pytest.mark.parametrize("scheme", ["int4-g64", "int3-g64"])
def test_float_target_fits_the_float_outputs(scheme):
    """Inputs X̃ drifted from the float inputs X (upstream quantization): with ``float_target`` GPTQ fits
    W X from X̃ and lands closer to the float outputs than plain GPTQ, which only fits W X̃."""
    from lowbit.methods.gptq import float_target_weight

    x = make_x("illcond", 2048, 128)
    g = torch.Generator().manual_seed(5)
    x_q = x + 0.3 * x.std(0) * torch.randn(x.shape, generator=g)  # the quantized path's inputs
    w = make_w(32, 128)
    stats = LayerStats(xtx=x_q.T @ x_q, tokens=x.shape[0], xtx_cross=x.T @ x_q)

    def err_to_float(r):
        w_hat = r.qtensor.dequantize()
        return float((x.double() @ w.double().T - x_q.double() @ w_hat.double().T).square().sum()) / x.shape[0]

    plain = gptq(w, stats, parse_scheme(scheme), MethodConfig())
    aimed = gptq(w, stats, parse_scheme(scheme), MethodConfig(options={"float_target": True}))
    assert aimed.info["float_target"] and not plain.info["float_target"]
    assert err_to_float(aimed) < 0.9 * err_to_float(plain)
    # The target itself is the least-squares map X̃ -> W X (up to dampening).
    w_star = float_target_weight(w, stats.xtx, stats.xtx_cross, damp=0.0)
    lsq = torch.linalg.lstsq(x_q.double(), (x @ w.T).double()).solution.T
    assert torch.allclose(w_star.double(), lsq, atol=1e-3)
    with pytest.raises(LowbitError, match="xtx_cross has shape"):
        float_target_weight(w, stats.xtx, torch.eye(3))


@pytest.mark.parametrize("scheme", ["q4_0", "q4_1", "q5_1", "q8_0", "iq4_nl", "iq4_xs", "q2_k", "q3_k", "q4_k", "q6_k"])
def test_refit_of_ggml_block_scales_lowers_every_rows_error(scheme):
    # After the sweep, each row's fp16 block scales (and mins) are re-solved for the chosen codes on the full
    # Hessian. No row may get worse, the whole layer must gain, and the QTensor must hold exactly the new Ŵ.
    x, w = make_x("illcond", 2048, 512), make_w(48, 512)
    xtx, s = x.T @ x, parse_scheme(scheme)
    q0, plain, info0 = gptq_quantize(w, xtx, 2048, s, refit=False)
    q, refit, info = gptq_quantize(w, xtx, 2048, s)
    assert info["refit"] and not info0["refit"]
    assert torch.equal(q.dequantize(torch.float32), refit)
    rows = lambda wh: (((w - wh).double() @ xtx.double()) * (w - wh).double()).sum(1)  # noqa: E731
    assert bool((rows(refit) <= rows(plain) * (1 + 1e-6)).all())
    assert reconstruction_loss(w, refit, xtx, 2048) < 0.999 * reconstruction_loss(w, plain, xtx, 2048)
    # the codes are the sweep's own: only the float parameters moved
    from lowbit.layouts.ggml import BLOCK_TYPES

    bt = BLOCK_TYPES[s.block.ggml]
    (c0, p0), (c1, p1) = (bt.unpack(t.codes.view(-1, bt.type_size)) for t in (q0, q))
    assert torch.equal(c0, c1) and any(not torch.equal(p0[k], p1[k]) for k in p0)


def test_refit_is_the_least_squares_optimum_for_one_block():
    # One Q8_0 block of a row with H = I: the refit scale is <w, c> / <c, c> for the sweep's codes c (then fp16).
    w = make_w(1, 32)
    x = torch.eye(32) * 4.0
    q, w_hat, _ = gptq_quantize(w, x.T @ x, 32, parse_scheme("q8_0"))
    from lowbit.layouts.ggml import BLOCK_TYPES

    codes, p = BLOCK_TYPES["Q8_0"].unpack(q.codes.view(1, -1))
    c = BLOCK_TYPES["Q8_0"].values(codes, {k: torch.ones_like(v) for k, v in p.items()})
    d = float((w * c).sum() / (c * c).sum())
    assert abs(float(p["d"].flatten()[0]) - d) <= abs(d) * 2**-10
