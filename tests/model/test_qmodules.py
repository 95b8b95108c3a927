import torch

import lowbit
from lowbit.kernels import use_kernels
from lowbit.model.qmodules import QEmbedding, QLinear, kernel_names


def test_qlinear_matches_dequantized_float():
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 96)
    q = lowbit.quantize_tensor(lin.weight.detach(), "int4-g128")
    ql = QLinear(q, lin.bias)
    x = torch.randn(3, 7, 576)
    ref = torch.nn.functional.linear(x, q.dequantize(), lin.bias)
    with use_kernels("reference"):
        assert torch.equal(ql(x), ref)
    assert "dequantize" in kernel_names() and ql._kernel.name == "dequantize"


def test_qembedding_row_gather_equals_full_dequant():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(1000, 576)
    for scheme in ("int8", "int3-g64", "int4-g128", "fp8", "nf4-g64"):
        q = lowbit.quantize_tensor(emb.weight.detach(), scheme)
        qe = QEmbedding(q, emb.padding_idx)
        ids = torch.tensor([[5, 999, 5, 0], [17, 3, 3, 42]])
        assert torch.equal(qe(ids), torch.nn.functional.embedding(ids, q.dequantize())), scheme


@use_kernels("reference")
def test_cached_weight_kernel_is_exact_and_temporary():
    w = torch.randn(48, 80)
    layer = QLinear(lowbit.quantize_tensor(w, "int4-g16"), torch.randn(48))
    x = torch.randn(3, 80)
    ref = layer(x)
    assert layer._kernel.name == "dequantize"
    layer.cache_weight()
    assert torch.equal(layer(x), ref) and layer._kernel.name == "cached-weight"
    assert "weight_cache" not in layer.state_dict()
    layer.drop_cache()
    assert torch.equal(layer(x), ref) and layer._kernel.name == "dequantize"
    layer.cache_weight(torch.bfloat16)  # a cache in another dtype than the input is not used
    assert torch.equal(layer(x), ref) and layer._kernel.name == "dequantize"
