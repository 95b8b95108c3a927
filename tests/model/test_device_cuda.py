"""The same contracts on a CUDA device: moves keep ties, the runner works there, saved files do not change.

Needs a GPU (skipped without one: the CPU is the tested floor, see test_device.py and test_qmodules_state.py).
"""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.model.qmodules import QPARTS, QEmbedding, QLinear, QModule
from tests.model.families import build, random_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_tied_layers_move_to_cuda_and_back_as_one():
    q = lowbit.quantize_tensor(torch.randn(100, 64), "int4-g32")
    ref = q.dequantize()
    emb, head = QEmbedding(q), QLinear(q)
    pair = nn.ModuleList([emb, head]).to("cuda")
    assert emb.qweight_codes.is_cuda and head.qweight is emb.qweight
    assert all(getattr(head, f"qweight_{p}") is getattr(emb, f"qweight_{p}") for p in QPARTS)
    ids = torch.tensor([[3, 99, 3, 0]])
    torch.testing.assert_close(emb(ids.cuda()).cpu(), nn.functional.embedding(ids, ref))
    pair.to("cpu")
    assert not emb.qweight_codes.is_cuda and head.qweight is emb.qweight
    assert torch.equal(emb.qweight.dequantize(), ref)


def test_quantize_on_cuda_returns_the_model_where_it_was():
    ids = random_ids(n=4, t=16)
    want = build("llama")
    lowbit.quantize(want, scheme="int4-g32", method="gptq", calib=ids, inplace=True, progress=False)
    model = build("llama")
    seen = []
    model.model.layers[1].register_forward_pre_hook(lambda m, a, kw: seen.append(a[0].device.type if a else
                                                                                   kw["hidden_states"].device.type),
                                                    with_kwargs=True)
    lowbit.quantize(model, scheme="int4-g32", method="gptq", calib=ids, inplace=True, progress=False, device="cuda")
    assert "cuda" in seen  # the block ran there
    assert not any(t.is_cuda for t in model.state_dict().values())
    assert model.lm_head.qweight is model.model.embed_tokens.qweight
    same = [float((a.qweight_codes == b.qweight_codes).float().mean())
            for a, b in zip(want.modules(), model.modules(), strict=True) if isinstance(a, QModule)]
    assert min(same) > 0.95  # GPTQ's float32 sums differ between devices; a code near a step may flip
    with torch.no_grad():
        a, b = want(ids).logits, model(ids).logits
    assert float((a - b).norm() / a.norm()) < 5e-2


def test_save_from_cuda_writes_the_same_file(tmp_path):
    model = build("llama")
    lowbit.quantize(model, scheme="int4-g32", inplace=True, progress=False)
    ids = random_ids()
    with torch.no_grad():
        want = model(ids).logits
    lowbit.save(model, tmp_path / "cpu")
    model.to("cuda")
    assert model.lm_head.qweight is model.model.embed_tokens.qweight and model.lm_head.qweight_codes.is_cuda
    with torch.no_grad():
        torch.testing.assert_close(model(ids.cuda()).logits.cpu(), want, rtol=1e-4, atol=1e-4)
    lowbit.save(model, tmp_path / "cuda")
    for f in ("model.safetensors", "quantization.json"):
        assert (tmp_path / "cpu" / f).read_bytes() == (tmp_path / "cuda" / f).read_bytes(), f
