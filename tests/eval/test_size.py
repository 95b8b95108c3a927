import torch

import lowbit
from lowbit.eval import model_size
from tests.eval import tiny_llama


def test_plain_linear():
    info = model_size(torch.nn.Linear(64, 32))
    assert info.total_bytes == info.float_bytes == (64 * 32 + 32) * 4
    assert info.quantized_numel == info.quantized_bytes == 0 and info.bpw_quantized is None
    assert info.bpw_total == 32.0


def test_tied_embeddings_counted_once():
    tied, untied = tiny_llama(100, tie=True), tiny_llama(100, tie=False)
    emb = 100 * 64 * 4
    n_tied = sum(p.numel() for p in tied.parameters())  # parameters() already dedupes tied weights
    assert model_size(tied).float_bytes >= n_tied * 4
    assert model_size(untied).total_bytes - model_size(tied).total_bytes == emb


def test_bf16_halves_parameter_bytes():
    m = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 8))
    assert model_size(m.to(torch.bfloat16)).total_bytes * 2 == model_size(m.float()).total_bytes


class _QLinear(torch.nn.Module):
    """Stand-in for lowbit's QLinear: a QTensor in ``qweight``, parts also registered as buffers."""

    def __init__(self, lin: torch.nn.Linear, scheme: str, keep_float: bool = False):
        super().__init__()
        self.qweight = lowbit.quantize_tensor(lin.weight.detach(), scheme)
        self.register_buffer("codes", self.qweight.codes)  # aliases the QTensor: must not count twice
        self.bias = torch.nn.Parameter(lin.bias.detach().clone())
        if keep_float:
            self.weight = torch.nn.Parameter(lin.weight.detach().clone())


def test_qweight_counts_qtensor_bytes():
    torch.manual_seed(0)
    lin, head = torch.nn.Linear(128, 64), torch.nn.Linear(64, 10)
    m = torch.nn.Sequential(_QLinear(lin, "int4-g32"), head)
    q = m[0].qweight
    info = model_size(m)
    assert info.quantized_numel == 128 * 64
    assert info.quantized_bytes == q.nbytes
    assert abs(info.bpw_quantized - q.bits_per_weight) < 1e-12 and abs(info.bpw_quantized - 4.625) < 1e-12
    assert info.float_bytes == (64 + 64 * 10 + 10) * 4  # biases + float head
    assert info.total_bytes == info.quantized_bytes + info.float_bytes
    kept = model_size(torch.nn.Sequential(_QLinear(lin, "int4-g32", keep_float=True), head))
    assert kept.total_bytes == info.total_bytes  # a float copy beside the QTensor is not counted


def test_shared_qtensor_counted_once():
    lin = torch.nn.Linear(64, 64)
    a = _QLinear(lin, "int8")
    b = _QLinear(lin, "int8")
    b.qweight = a.qweight  # tied quantized weight
    b.codes = a.qweight.codes
    one = model_size(torch.nn.Sequential(a))
    two = model_size(torch.nn.Sequential(a, b))
    assert two.quantized_bytes == one.quantized_bytes
    assert two.float_bytes == one.float_bytes + 64 * 4  # only b's own bias is new
