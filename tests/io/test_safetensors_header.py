import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from lowbit.errors import LowbitError, WeightsFileError
from lowbit.io.safetensors_header import (
    SAFETENSORS_DTYPES,
    dtype_bits,
    dtype_from_name,
    dtype_name,
    read_safetensors_header,
    safetensors_dtype,
    torch_dtype,
)


@pytest.fixture
def good(tmp_path):
    p = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(4, 8), "b": torch.ones(3, dtype=torch.bfloat16), "empty": torch.zeros(0, 5),
               "c": torch.zeros(2, 5, dtype=torch.int8)}, p, metadata={"note": "hi"})
    return p


def _raw(p):
    blob = p.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _write(p, header, data):
    raw = json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return p


def _error(p, needle):
    with pytest.raises(WeightsFileError) as e:
        read_safetensors_header(p)
    msg = str(e.value)
    assert isinstance(e.value, LowbitError) and str(p) in msg and needle in msg and "\n" not in msg, msg


def test_reads_what_safetensors_writes(good):
    h = read_safetensors_header(good)
    assert set(h.tensors) == {"a", "b", "c", "empty"}
    assert h.metadata == {"note": "hi"} and "a" in h and "__metadata__" not in h
    a = h["a"]
    assert (a.dtype, a.shape, a.nbytes, a.numel) == ("F32", (4, 8), 128, 32)
    assert h["empty"].nbytes == 0 and h["b"].nbytes == 6
    assert h.data_start + h.data_len == good.stat().st_size
    assert sum(t.nbytes for t in h.tensors.values()) == h.data_len


def test_dtype_table_round_trips():
    for name, dt in SAFETENSORS_DTYPES.items():
        assert torch_dtype(name) is dt and safetensors_dtype(dt) == name
        assert dtype_from_name(dtype_name(dt)) is dt and dtype_bits(name) == 8 * torch.empty(0, dtype=dt).element_size()
    assert (dtype_bits("F16"), dtype_bits("BOOL"), dtype_bits("F4")) == (16, 8, None)
    assert torch_dtype("F4") is None and dtype_from_name("float4") is None and dtype_from_name("nn") is None
    with pytest.raises(WeightsFileError, match="complex64"):
        safetensors_dtype(torch.complex64)


def test_truncated_and_hostile_lengths(tmp_path, good):
    blob = good.read_bytes()
    (tmp_path / "tiny.safetensors").write_bytes(blob[:5])
    _error(tmp_path / "tiny.safetensors", "no header")
    (tmp_path / "cut.safetensors").write_bytes(blob[:-3])
    _error(tmp_path / "cut.safetensors", "is truncated")
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", 2**63) + blob[8:])
    _error(tmp_path / "long.safetensors", "truncated or corrupt safetensors header")
    (tmp_path / "inside.safetensors").write_bytes(blob[:30])  # header length beyond the file
    _error(tmp_path / "inside.safetensors", "says")
    _error(tmp_path / "missing.safetensors", "no such file")


def test_corrupt_json_and_entries(tmp_path, good):
    header, data = _raw(good)
    _error(_write(tmp_path / "list.safetensors", [1, 2], data), "not a JSON object")
    p = tmp_path / "junk.safetensors"
    p.write_bytes(struct.pack("<Q", 6) + b"{nope}" + data)
    _error(p, "corrupt safetensors header")
    p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}" + data)
    _error(p, "corrupt safetensors header")
    _error(_write(tmp_path / "meta.safetensors", {**header, "__metadata__": {"x": 1}}, data), "__metadata__")
    for bad in ({"dtype": "F32", "shape": [4, 8]}, {"dtype": 7, "shape": [4], "data_offsets": [0, 16]},
                {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]},
                {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]},
                {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 32]}, "F32"):
        _error(_write(tmp_path / "entry.safetensors", {**header, "a": bad}, data), "entry for tensor 'a'")
    _error(_write(tmp_path / "back.safetensors", {**header, "a": {**header["a"], "data_offsets": [64, 0]}}, data),
           "entry for tensor 'a'")


def test_ranges_outside_overlapping_or_mis_sized(tmp_path, good):
    header, data = _raw(good)
    end = len(data)
    outside = {**header, "c": {**header["c"], "data_offsets": [end - 10, end + 10]}}
    _error(_write(tmp_path / "out.safetensors", outside, data), "tensor 'c' is truncated")
    a0, a1 = header["a"]["data_offsets"]
    overlap = {**header, "b": {"dtype": "U8", "shape": [6], "data_offsets": [a0 + 4, a0 + 10]}}
    _error(_write(tmp_path / "overlap.safetensors", overlap, data), "overlap")
    wrong = {**header, "a": {**header["a"], "shape": [4, 7]}}
    _error(_write(tmp_path / "size.safetensors", wrong, data), "tensor 'a' has 128 bytes, but F32 with shape [4, 7] "
           "needs 112")
    unknown = {**header, "a": {**header["a"], "dtype": "F4"}}  # a dtype lowbit does not know: size not checked
    assert read_safetensors_header(_write(tmp_path / "f4.safetensors", unknown, data))["a"].dtype == "F4"
