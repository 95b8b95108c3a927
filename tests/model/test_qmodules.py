import torch

import lowbit
from lowbit.model.qmodules import QEmbedding, QLinear, kernel_names


def test_qlinear_matches_dequantized_float():
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 96)
    q = lowbit.quantize_tensor(lin.weight.detach(), "int4-g128")
    ql = QLinear.from_linear(lin, q)
    x = torch.randn(3, 7, 576)
    ref = torch.nn.functional.linear(x, q.dequantize(), lin.bias)
    assert torch.equal(ql(x), ref)
    assert "dequantize" in kernel_names()


def test_qembedding_row_gather_equals_full_dequant():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(1000, 576)
    for scheme in ("int8", "int3-g64", "int4-g128", "fp8", "nf4-g64"):
        q = lowbit.quantize_tensor(emb.weight.detach(), scheme)
        qe = QEmbedding.from_embedding(emb, q)
        ids = torch.tensor([[5, 999, 5, 0], [17, 3, 3, 42]])
        assert torch.equal(qe(ids), torch.nn.functional.embedding(ids, q.dequantize())), scheme
