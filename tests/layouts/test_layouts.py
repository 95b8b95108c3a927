"""Layouts: one registry for grouped and GGML storage; GGML schemes quantize, save, load and run like any
scheme; IQ4 blocks bit-exact against gguf's reference; the differentiable fake-quant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants
from gguf.constants import GGMLQuantizationType

from lowbit.core.qtensor import QTensor
from lowbit.core.scheme import parse_scheme
from lowbit.errors import LowbitError
from lowbit.io.checkpoint import load_tensors, save_tensors
from lowbit.layouts import layout_names, layout_of
from lowbit.layouts.ggml import BLOCK_TYPES
from lowbit.model.plan import fit_row_length

GGML = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"]


def test_registry_and_scheme_names():
    assert layout_names() == ["affine", "ggml"]
    for name in GGML:
        s = parse_scheme(name.upper())
        assert s.name == name and parse_scheme(s.name) == s and s.layout == "ggml"
        assert s.block.block_size == BLOCK_TYPES[name.upper()].block_size
    assert layout_of(parse_scheme("int4-g128")).family == "affine"
    with pytest.raises(LowbitError, match="GGML"):
        parse_scheme("q4_k").grid  # noqa: B018


@pytest.mark.parametrize("name", GGML)
def test_ggml_scheme_quantize_save_load(name, tmp_path):
    s = parse_scheme(name)
    lay = layout_of(s)
    w = torch.randn(6, 512, generator=torch.Generator().manual_seed(0))
    q = lay.quantize(w, s)
    assert q.nbytes == lay.nbytes(s, (6, 512)) == sum(q.expected_nbytes().values())
    bt = BLOCK_TYPES[name.upper()]
    ref = quants.dequantize(q.codes.reshape(-1, bt.type_size).numpy(), GGMLQuantizationType[name.upper()])
    assert np.array_equal(q.dequantize(torch.float32).numpy(), ref.reshape(6, 512))  # gguf's own arithmetic
    rel = float((q.dequantize(torch.float32) - w).norm() / w.norm())
    assert rel < {2: 0.45, 3: 0.2, 4: 0.1, 5: 0.05, 6: 0.025, 8: 0.0065}[s.bits], rel
    save_tensors(tmp_path / "t.safetensors", {"w": q})
    back = load_tensors(tmp_path / "t.safetensors")["w"]
    assert isinstance(back, QTensor) and back.scheme == s and torch.equal(back.codes, q.codes)


def test_iq4_pack_unpack_bit_exact():
    for name in ("IQ4_NL", "IQ4_XS"):
        bt = BLOCK_TYPES[name]
        data = torch.randint(0, 256, (16, bt.type_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        data[:, :2] = torch.tensor([0x00, 0x3C], dtype=torch.uint8)  # d = 1.0: finite scales
        codes, p = bt.unpack(data)
        assert torch.equal(bt.pack(codes, p), data)
        ref = quants.dequantize(data.numpy(), GGMLQuantizationType[name])
        assert np.array_equal(bt.dequantize(data).numpy(), ref.reshape(16, -1))


def test_iq4_beats_q4_0_at_equal_size():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    err = {n: float((layout_of(parse_scheme(n)).quantize(w, parse_scheme(n)).dequantize() - w).norm())
           for n in ("q4_0", "iq4_nl", "iq4_xs")}
    assert err["iq4_nl"] < err["q4_0"] and err["iq4_xs"] < err["q4_0"], err


def test_rows_that_blocks_do_not_fit():
    with pytest.raises(LowbitError, match="whole blocks of 256"):
        layout_of(parse_scheme("q4_k")).quantize(torch.randn(4, 576), parse_scheme("q4_k"))
    assert fit_row_length(parse_scheme("q4_k"), 576)[0].name == "q5_0"
    assert fit_row_length(parse_scheme("q6_k"), 576)[0].name == "q8_0"
    s, note = fit_row_length(parse_scheme("q4_k"), 80)  # nothing fits: fp16, as llama.cpp writes F16
    assert s.name == "fp16" and "F16 instead" in note
    assert fit_row_length(parse_scheme("int4-g128"), 80) == (parse_scheme("int4-g128"), "")


@pytest.mark.parametrize("name", ["int4-g32", "int8", "nf4-g64", "q4_k", "iq4_xs"])
def test_fake_is_differentiable_and_matches_the_stored_grid(name):
    s = parse_scheme(name)
    lay = layout_of(s)
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(3))
    want = lay.quantize(w, s).dequantize(torch.float32)
    wg = w.clone().requires_grad_(True)
    y = lay.fake(wg, s)
    assert torch.allclose(y.detach(), want, atol=1e-6)
    (y * torch.arange(256.0)).sum().backward()
    assert wg.grad is not None and float(wg.grad.abs().sum()) > 0


def test_gptq_on_every_layout_beats_the_round_to_nearest_fit():
    from lowbit.methods.gptq import gptq_quantize, reconstruction_loss

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2048, 256, generator=g) @ (torch.eye(256) + torch.randn(256, 256, generator=g) / 16)
    w = torch.randn(16, 256, generator=g) * 0.05
    xtx = x.T @ x
    for name in ("int4-g64", "int3-g128-sym", "q4_k", "q5_0", "q3_k", "iq4_nl"):
        s = parse_scheme(name)
        q, w_hat, _ = gptq_quantize(w, xtx, 2048, s)
        assert torch.equal(q.dequantize(torch.float32), w_hat), name
        rtn = layout_of(s).quantize(w, s, importance=xtx.diagonal() / 2048).dequantize(torch.float32)
        assert reconstruction_loss(w, w_hat, xtx, 2048) < 0.9 * reconstruction_loss(w, rtn, xtx, 2048), name


@pytest.mark.parametrize("name", GGML)
def test_every_ggml_type_has_a_grouped_proxy_of_its_width_and_sub_block(name):
    s = parse_scheme(name)
    p = layout_of(s).proxy(s)
    bt = BLOCK_TYPES[name.upper()]
    assert p.layout == "affine" and p.bits == s.bits and p.group_size == bt.sub
    assert layout_of(p).proxy(p) == p  # the affine family is its own proxy
