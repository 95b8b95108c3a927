import json
import os

import pytest
import torch

import lowbit
from lowbit.errors import CheckpointError


@pytest.fixture
def tensors():
    torch.manual_seed(0)
    return {
        "a": lowbit.quantize_tensor(torch.randn(32, 576), "int4-g128"),
        "b": lowbit.quantize_tensor(torch.randn(16, 64), "int3-g64-sym"),
        "c": lowbit.quantize_tensor(torch.randn(8, 40), "fp8"),
        "d": lowbit.quantize_tensor(torch.randn(8, 40), "bf16"),
        "e": lowbit.quantize_tensor(torch.randn(8, 40), "nf4-g64"),
        "f": lowbit.quantize_tensor(torch.randn(8, 40), "int4-g32-zf16"),
        "bias": torch.randn(32),
    }


def test_save_load_identity(tmp_path, tensors):
    p = tmp_path / "m.safetensors"
    lowbit.save_tensors(p, tensors)
    back = lowbit.load_tensors(p)
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        b = back[k]
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, b)
            continue
        assert b.scheme == t.scheme and b.shape == t.shape and b.dtype == t.dtype
        for part in ("codes", "scales", "zeros"):
            x, y = getattr(t, part), getattr(b, part)
            assert (x is None) == (y is None)
            if x is not None:
                assert torch.equal(x, y) and x.dtype == y.dtype
        assert torch.equal(b.dequantize(), t.dequantize())
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_bits_per_weight_matches_bytes_written(tmp_path):
    q = lowbit.quantize_tensor(torch.randn(512, 1024), "int4-g128")
    p = tmp_path / "w.safetensors"
    lowbit.save_tensors(p, {"w": q})
    n_header = int.from_bytes(p.read_bytes()[:8], "little")
    data_bytes = p.stat().st_size - 8 - n_header
    assert data_bytes == q.nbytes
    assert q.bits_per_weight == pytest.approx(4 + 20 / 128)


def test_corrupted_byte_names_tensor(tmp_path, tensors):
    p = tmp_path / "m.safetensors"
    lowbit.save_tensors(p, tensors)
    raw = bytearray(p.read_bytes())
    raw[-5] ^= 0xFF  # last bytes belong to some tensor's data
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        lowbit.load_tensors(p)


def test_truncated_file_rejected(tmp_path, tensors):
    p = tmp_path / "m.safetensors"
    lowbit.save_tensors(p, tensors)
    raw = p.read_bytes()
    p.write_bytes(raw[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        lowbit.load_tensors(p)
    p.write_bytes(raw[:20])
    with pytest.raises(CheckpointError):
        lowbit.load_tensors(p)


def test_tampered_shape_rejected(tmp_path, tensors):
    p = tmp_path / "m.safetensors"
    lowbit.save_tensors(p, tensors)
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8 : 8 + n])
    doc = json.loads(head["__metadata__"]["lowbit"])
    doc["tensors"]["a"]["shape"] = [32, 640]
    head["__metadata__"]["lowbit"] = json.dumps(doc)
    new = json.dumps(head).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    p.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])
    with pytest.raises(CheckpointError, match="'a'"):
        lowbit.load_tensors(p)


def test_version_and_not_lowbit(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(p))
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        lowbit.load_tensors(p)
    save_file({"x": torch.zeros(2)}, str(p), metadata={"lowbit": json.dumps(
        {"format": "lowbit", "version": 42, "tensors": {}})})
    with pytest.raises(CheckpointError, match="version 42"):
        lowbit.load_tensors(p)
    with pytest.raises(CheckpointError, match="no such"):
        lowbit.load_tensors(tmp_path / "missing.safetensors")


def test_written_files_get_usual_permissions(tmp_path):
    p = tmp_path / "w.safetensors"
    lowbit.save_tensors(p, {"w": torch.zeros(2)})
    mask = os.umask(0)
    os.umask(mask)
    assert (p.stat().st_mode & 0o777) == 0o666 & ~mask
