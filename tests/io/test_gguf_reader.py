"""The GGUF reader against the gguf package's, and against corrupt files: truncated anywhere, flipped bytes,
hostile counts and lengths. Every rejection is one WeightsFileError line naming the file."""

import random
import struct

import numpy as np
import pytest
import torch

import lowbit.io.gguf
import lowbit.io.gguf.source
import lowbit.io.inspect
from lowbit.errors import WeightsFileError
from lowbit.io.gguf.reader import iter_gguf_tensors, load_gguf_into, read_gguf_index, read_gguf_weights

F32, Q8_0, STRING, U32, ARRAY, U8 = 0, 8, 8, 4, 9, 0


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", vtype) + payload


def _tensor(name: str, dims: list[int], gtype: int, offset: int) -> bytes:
    return (_str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
            + struct.pack("<IQ", gtype, offset))


def _gguf(path, kvs=None, tensors=None, data=None, n_tensors=None, n_kv=None, version=3, align=32):
    kvs = [_kv("general.architecture", STRING, _str("llama")), _kv("general.alignment", U32, struct.pack("<I", 32))
           ] if kvs is None else kvs
    tensors = [_tensor("a", [8], F32, 0), _tensor("b", [2, 4], F32, 32)] if tensors is None else tensors
    data = np.arange(16, dtype=np.float32).tobytes() if data is None else data
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors)
    head += b"\0" * (-len(head) % align)
    path.write_bytes(head + data)
    return path


def _rejected(path, needle: str = "") -> str:
    with pytest.raises(WeightsFileError) as e:
        read_gguf_index(path)
    msg = str(e.value)
    assert str(path) in msg and needle in msg and "\n" not in msg, msg
    return msg


def test_a_hand_built_file_reads_back(tmp_path):
    p = _gguf(tmp_path / "ok.gguf")
    idx = read_gguf_index(p)
    assert idx.version == 3 and idx.metadata == {"general.architecture": "llama", "general.alignment": 32}
    assert [(t.name, t.shape, t.type_name, t.nbytes) for t in idx.tensors] == [("a", (8,), "F32", 32),
                                                                               ("b", (4, 2), "F32", 32)]
    raw = dict((t.name, b) for t, b in iter_gguf_tensors(p))
    assert raw["a"].dtype == torch.uint8 and raw["a"].numpy().tobytes() == np.arange(8, dtype=np.float32).tobytes()
    w = read_gguf_weights(p)
    assert torch.equal(w["b"], torch.arange(8, 16, dtype=torch.float32).reshape(4, 2))


def test_matches_the_gguf_package(tiny_gguf):
    import gguf

    reader = gguf.GGUFReader(str(tiny_gguf.path))
    ours = list(iter_gguf_tensors(tiny_gguf.path))
    assert len(ours) == len(reader.tensors)
    weights = read_gguf_weights(tiny_gguf.path)
    for (info, raw), t in zip(ours, reader.tensors, strict=True):
        assert info.name == t.name and info.offset == int(t.data_offset) and info.nbytes == int(t.n_bytes)
        assert raw.numpy().tobytes() == np.asarray(t.data).tobytes()
        ref = np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)
        assert torch.equal(weights[t.name], torch.from_numpy(ref.copy()).reshape(info.shape)), t.name


def test_one_reader_behind_every_old_name():
    assert lowbit.io.gguf.source.read_gguf_weights is read_gguf_weights is lowbit.io.gguf.read_gguf_weights
    assert lowbit.io.gguf.source.load_gguf_into is load_gguf_into is lowbit.io.gguf.load_gguf_into
    assert lowbit.io.inspect.read_gguf_index is read_gguf_index


def test_truncated_anywhere(tmp_path, tiny_gguf):
    data = tiny_gguf.path.read_bytes()
    end = max(t.offset + t.nbytes for t in read_gguf_index(tiny_gguf.path).tensors)
    p = tmp_path / "cut.gguf"
    for cut in sorted({*range(0, len(data), 97), 3, 23, 24, 25, end - 1}):
        p.write_bytes(data[:cut])
        if cut < end:
            _rejected(p)
        else:
            read_gguf_index(p)  # only padding after the last tensor was cut


def test_flipped_bytes_never_escape_as_other_errors(tmp_path, tiny_gguf):
    data = tiny_gguf.path.read_bytes()
    header_end = min(t.offset for t in read_gguf_index(tiny_gguf.path).tensors)
    rng = random.Random(0)
    p = tmp_path / "flip.gguf"
    outcomes = {"ok": 0, "rejected": 0}
    for _ in range(400):
        blob = bytearray(data)
        for _ in range(rng.choice((1, 1, 3))):
            blob[rng.randrange(header_end)] ^= rng.choice((0xFF, 0x80, 0x01, rng.randrange(1, 256)))
        p.write_bytes(bytes(blob))
        try:
            idx = read_gguf_index(p)
        except WeightsFileError as e:
            assert str(p) in str(e) and "\n" not in str(e), str(e)
            outcomes["rejected"] += 1
            continue
        outcomes["ok"] += 1  # a flip inside a string or a float value: nothing to check it against
        for t, raw in iter_gguf_tensors(p, idx):
            assert raw.numel() == t.nbytes and t.offset + t.nbytes <= len(blob)
    assert outcomes["rejected"] > 100 and outcomes["ok"] > 10, outcomes


def test_hostile_counts_and_lengths(tmp_path):
    p = tmp_path / "bad.gguf"
    _rejected(_gguf(p, n_tensors=2**63), "cannot fit")
    _rejected(_gguf(p, n_kv=2**40), "cannot fit")
    _rejected(_gguf(p, kvs=[_kv("k", STRING, struct.pack("<Q", 2**63) + b"x")]), "string of")
    _rejected(_gguf(p, kvs=[_kv("k", ARRAY, struct.pack("<IQ", U8, 2**62))]), "array of")
    _rejected(_gguf(p, kvs=[_kv("k", ARRAY, struct.pack("<IQ", U32, 200) + b"\0" * 100)]), "array of 800 bytes")
    _rejected(_gguf(p, kvs=[_kv("k", ARRAY, struct.pack("<IQ", STRING, 100) + _str("x") * 50)]), "past the end")
    nested = _kv("k", ARRAY, struct.pack("<IQ", ARRAY, 1) * 6 + struct.pack("<IQ", U8, 0))
    _rejected(_gguf(p, kvs=[nested]), "nested")
    _rejected(_gguf(p, kvs=[_kv("k", 99, b"\0" * 8)]), "unknown metadata value type 99")
    _rejected(_gguf(p, kvs=[_kv("k", ARRAY, struct.pack("<IQ", 77, 1) + b"\0")]), "unknown metadata value type 77")


def test_corrupt_tables(tmp_path):
    p = tmp_path / "bad.gguf"
    _rejected(_gguf(p, version=1), "GGUF version 1")
    p.write_bytes(b"GGUS" + bytes(60))
    _rejected(p, "not a GGUF file")
    p.write_bytes(b"GGUF\x03\0\0")
    _rejected(p, "truncated GGUF file")
    _rejected(tmp_path / "missing.gguf", "no such file")
    same = _kv("general.architecture", STRING, _str("llama"))
    _rejected(_gguf(p, kvs=[same, same]), "'general.architecture' appears twice")
    _rejected(_gguf(p, tensors=[_tensor("a", [8], F32, 0), _tensor("a", [8], F32, 32)]), "tensor 'a' appears twice")
    for align in (struct.pack("<I", 0), struct.pack("<I", 24)):
        _rejected(_gguf(p, kvs=[_kv("general.alignment", U32, align)], align=32), "power of two")
    _rejected(_gguf(p, kvs=[_kv("general.alignment", STRING, _str("32"))]), "power of two")
    _rejected(_gguf(p, tensors=[_tensor("a", [8], F32, 4)], data=bytes(64)), "not a multiple of the alignment")
    _rejected(_gguf(p, tensors=[_tensor("a", [16], F32, 0), _tensor("b", [8], F32, 32)]), "'a' and 'b' overlap")
    _rejected(_gguf(p, tensors=[_tensor("a", [8], 200, 0)]), "unknown GGML type 200")
    _rejected(_gguf(p, tensors=[_tensor("a", [1] * 9, F32, 0)]), "9 dims")
    _rejected(_gguf(p, tensors=[_tensor("q", [40], Q8_0, 0)]), "not whole blocks of 32")
    _rejected(_gguf(p, tensors=[_tensor("a", [2**40], F32, 0)]), "tensor 'a' is truncated")
