"""``--device``: parsing, and the runner's moves (a no-op on the model's own device)."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import LowbitError
from lowbit.model.calibrate import BlockInput
from lowbit.model.device import layer_on, module_device, optional_device, parse_device, send, to_device
from tests.model.families import build, random_ids


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_cpu_and_none():
    assert parse_device("cpu") == torch.device("cpu") == parse_device(" CPU ")
    assert parse_device(torch.device("cpu")) == torch.device("cpu")
    assert optional_device(None) is None


@pytest.mark.parametrize("text", ["tpu", "gpu", "cuda:", "cuda:x", "cpu:0", "", "cuda:-1"])
def test_unknown_device_is_one_line_naming_the_option(text):
    with pytest.raises(LowbitError) as e:
        parse_device(text)
    msg = str(e.value)
    assert msg.startswith(f"--device {text.strip()}") and "unknown device" in msg and "\n" not in msg


@pytest.mark.parametrize("text", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_cuda(no_cuda, text):
    with pytest.raises(LowbitError, match=f"--device {text}: CUDA is not available.*use --device cpu"):
        parse_device(text)


def test_cuda_index_past_the_device_count(two_gpus):
    assert parse_device("cuda") == torch.device("cuda", 0)
    assert parse_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(LowbitError, match=r"--device cuda:2: there are 2 CUDA devices \(cuda:0 \.\. cuda:1\)"):
        parse_device("cuda:2")


def test_to_device_walks_block_inputs():
    bi = BlockInput(torch.zeros(1, 2, 4), {"position_embeddings": (torch.ones(2), torch.ones(2)), "mask": None,
                                           "ids": [torch.arange(3)]}, 0)
    assert to_device(bi, None) is bi
    moved = to_device([bi], torch.device("meta"))[0]
    assert isinstance(moved, BlockInput) and moved.first_window == 0 and moved.hidden.is_meta
    assert all(t.is_meta for t in moved.kwargs["position_embeddings"]) and moved.kwargs["ids"][0].is_meta
    assert moved.kwargs["mask"] is None and not bi.hidden.is_meta  # the original stays where it was


def test_send_and_module_device():
    lin = nn.Linear(4, 4)
    assert module_device(lin) == torch.device("cpu") and module_device(nn.ReLU()) is None
    assert send(lin, None) == torch.device("cpu") and not lin.weight.is_meta  # None: stays
    assert send(lin, torch.device("meta")) == torch.device("cpu") and lin.weight.is_meta
    assert module_device(lin) == torch.device("meta")


def test_layer_on_own_device_is_a_no_op():
    model = nn.Sequential(nn.Linear(4, 4))
    with layer_on(model, "0", torch.device("cpu")):
        model[0] = nn.Linear(4, 2)
    assert module_device(model[0]) == torch.device("cpu")


def test_quantize_on_the_models_own_device_is_the_default():
    """device="cpu" on a CPU model moves nothing and computes exactly what device=None does."""
    ids = random_ids(n=4, t=16)
    runs = []
    for device in (None, "cpu"):
        model = build("llama")
        qmodel, report = lowbit.quantize(model, scheme="int4-g32", method="gptq", calib=ids, progress=False,
                                         inplace=True, device=device)
        with torch.no_grad():
            runs.append((qmodel(ids).logits, report.calib_windows))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1] == 4


def test_quantize_refuses_cuda_without_it(no_cuda):
    with pytest.raises(LowbitError, match="--device cuda"):
        lowbit.quantize(build("llama"), scheme="int4-g32", device="cuda", progress=False)


def test_evaluate_moves_to_the_device(tiny_llama):
    model, tok = tiny_llama
    qmodel, _ = lowbit.quantize(model, scheme="int8", progress=False)
    res = lowbit.evaluate(qmodel, reference=model, tokenizer=tok, text="the river and the bridge\n" * 40, windows=2,
                          window_len=32, speed=False, cache_dir=False, device="cpu")
    assert res.kl_mean >= 0 and module_device(qmodel) == torch.device("cpu")
