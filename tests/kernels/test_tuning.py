"""Kernels chosen by measurement: the fastest kernel that can run a call wins, whatever its priority; the
choice is remembered per kind of call and per machine in the cache folder, and a damaged file is ignored."""

import json
import time

import pytest
import torch

import lowbit
from lowbit.kernels import KERNELS, Kernel, register_kernel, tuning
from lowbit.kernels.base import dispatch
from lowbit.model.qmodules import QLinear


def _layer(scheme="nf4-g64", out=32, inp=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return QLinear(lowbit.quantize_tensor(torch.randn(out, inp, generator=g), scheme), None)


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Tuning on, choices in a fresh cache folder, and two test kernels for nf4 layers (a lookup grid no packed
    kernel serves): a slow one that outranks every other kernel and a fast one of the lowest priority; both
    compute the reference's values."""
    monkeypatch.setenv("LOWBIT_KERNEL_TUNING", "on")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    tuning.forget()
    calls = {"slow": 0, "fast": 0}

    def make(name, priority, delay):
        def run(m, state, x):
            calls[name] += 1
            if delay:
                time.sleep(delay)
            return torch.nn.functional.linear(x, state.to(x.dtype))

        return register_kernel(Kernel(f"test-{name}", priority, lambda m: m.qweight.scheme.name == "nf4-g64", run,
                                      prepare=lambda m: m.qweight.dequantize(torch.float32)))

    make("slow", 10_000, 0.003)
    make("fast", -1, 0.0)
    yield calls
    for n in ("test-slow", "test-fast"):
        KERNELS.remove(n)
    tuning.forget()


def test_the_fastest_kernel_wins_and_is_remembered(measured, tmp_path):
    layer, x = _layer(), torch.randn(3, 128)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, layer.qweight.dequantize(torch.float32))
        assert torch.equal(dispatch(layer, x), ref)
    assert layer._kernel.name == "test-fast"  # not the slow kernel that outranks it
    stored = json.loads((tmp_path / "kernel-choices.json").read_text())
    mine = stored["machines"][tuning.machine_key()]
    assert list(mine.values()) == ["test-fast"] and "tokens<=4" in next(iter(mine))
    # the same kind of call (tokens 3 and 4 share a bucket) is not measured again, in this process …
    n = dict(measured)
    layer(torch.randn(4, 128))
    assert measured["slow"] == n["slow"] and measured["fast"] == n["fast"] + 1
    # … nor in a later one (the choice is read back from the file) for a new layer of the same shape
    tuning.forget()
    other = _layer(seed=1)
    other(torch.randn(4, 128))
    assert other._kernel.name == "test-fast" and measured["slow"] == n["slow"]
    # another bucket is a new measurement
    layer(torch.randn(64, 128))
    assert measured["slow"] > n["slow"] and layer._kernel.name == "test-fast"


def test_off_keeps_the_priority_order(measured, monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL_TUNING", "off")
    layer = _layer()
    layer(torch.randn(3, 128))
    assert layer._kernel.name == "test-slow" and measured["fast"] == 0


def test_losers_give_back_their_packed_weight(measured):
    layer = _layer()
    layer(torch.randn(1, 128))
    assert set(layer._kernel_state) <= {"test-fast"}


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 99, "machines": {}}),
                                     json.dumps({"version": 1, "machines": {"x": 3}}), "[1, 2]"])
def test_a_damaged_choices_file_is_ignored_and_rewritten(measured, tmp_path, content, caplog):
    (tmp_path / "kernel-choices.json").write_text(content)
    layer = _layer()
    layer(torch.randn(1, 128))
    assert layer._kernel.name == "test-fast"
    data = json.loads((tmp_path / "kernel-choices.json").read_text())
    assert data["version"] == 1 and tuning.machine_key() in data["machines"]


def test_a_stored_choice_of_a_kernel_that_cannot_run_the_call_is_measured_again(measured, tmp_path):
    layer = _layer()
    key = tuning.call_key(layer, torch.randn(1, 128), 1)
    (tmp_path / "kernel-choices.json").write_text(json.dumps(
        {"version": 1, "machines": {tuning.machine_key(): {key: "int4-torch"}}}))  # does not serve nf4
    layer(torch.randn(1, 128))
    assert layer._kernel.name == "test-fast"


def test_calibration_weight_cache_is_never_timed_against_others(measured):
    layer = _layer()
    layer.cache_weight()
    layer(torch.randn(2, 128))
    assert layer._kernel.name == "cached-weight" and measured["slow"] == measured["fast"] == 0


def test_buckets():
    assert [tuning.bucket(t) for t in (1, 2, 3, 5, 16, 17, 512, 513, 10**6)] == [1, 2, 4, 8, 16, 32, 512, 1024,
                                                                               tuning.MAX_BUCKET]


def test_a_kernel_that_was_not_there_when_a_choice_was_made_is_measured(measured, tmp_path):
    """A choice stored among fewer kernels (the C++ kernels switched off, or not yet built) is not reused."""
    layer = _layer()
    x = torch.randn(1, 128)
    key = f"{tuning.call_key(layer, x, 1)}|among=dequantize,test-slow"
    (tmp_path / "kernel-choices.json").write_text(json.dumps(
        {"version": 1, "machines": {tuning.machine_key(): {key: "test-slow"}}}))
    layer(x)
    assert layer._kernel.name == "test-fast" and measured["slow"] > 0
