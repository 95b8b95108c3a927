import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from lowbit.errors import WeightsFileError
from lowbit.io.lazy import read_safetensors_tensors, weight_files


def test_reads_tensors_exactly_in_the_order_asked(tmp_path):
    torch.manual_seed(0)
    tensors = {"w": torch.randn(5, 7), "h": torch.randn(3).to(torch.bfloat16), "i": torch.arange(6).reshape(2, 3),
               "m": torch.tensor([True, False]), "s": torch.tensor(2.5)}
    p = tmp_path / "model.safetensors"
    save_file(tensors, p)
    got = list(read_safetensors_tensors(str(p), ["s", "w", "m", "h", "i"]))
    for want, t in zip(("s", "w", "m", "h", "i"), got, strict=True):
        assert t.dtype == tensors[want].dtype and torch.equal(t, tensors[want]), want
    assert weight_files(tmp_path) == dict.fromkeys(tensors, p)
    with pytest.raises(WeightsFileError, match=r"model.safetensors: no tensor 'nope'"):
        list(read_safetensors_tensors(str(p), ["w", "nope"]))


def test_unknown_dtype_is_one_clear_error(tmp_path):
    header = json.dumps({"x": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}).encode()
    p = tmp_path / "f4.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00\x00")
    with pytest.raises(WeightsFileError, match=r"f4.safetensors: tensor 'x' has dtype F4, which lowbit cannot stream"):
        list(read_safetensors_tensors(str(p), ["x"]))
