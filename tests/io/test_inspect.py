import json
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

import lowbit
from lowbit.errors import LowbitError
from lowbit.io.inspect import InspectError, TensorRow, inspect_path, read_gguf_index, summarize


@pytest.fixture
def qtensors():
    torch.manual_seed(0)
    return {
        "ragged": lowbit.quantize_tensor(torch.randn(32, 576), "int4-g128"),  # 4.5 groups per row
        "three": lowbit.quantize_tensor(torch.randn(16, 64), "int3-g64-sym"),
        "fp8": lowbit.quantize_tensor(torch.randn(8, 40), "fp8"),
        "cast": lowbit.quantize_tensor(torch.randn(8, 40), "bf16"),
        "norm": torch.randn(32),
    }


def test_lowbit_checkpoint(tmp_path, qtensors):
    p = tmp_path / "w.safetensors"
    lowbit.save_tensors(p, qtensors)
    rows = {r.name: r for r in inspect_path(p)}
    assert set(rows) == set(qtensors)
    for name, q in qtensors.items():
        if isinstance(q, torch.Tensor):
            continue
        r = rows[name]
        assert r.format == q.scheme.name and r.shape == q.shape
        assert r.nbytes == q.nbytes and r.bpw == pytest.approx(q.bits_per_weight, rel=1e-12)
    assert rows["ragged"].format == "int4-g128"
    # 4-bit codes + 5 groups per row of (fp16 scale + 4-bit zero) over 576 weights
    assert rows["ragged"].nbytes == 32 * 576 // 2 + 32 * 5 * 2 + 32 * 5 // 2
    assert rows["norm"] == TensorRow("norm", (32,), "float32", 32.0, 128)


def test_lowbit_output_directory(tmp_path, qtensors):
    out = tmp_path / "smol-int4"
    out.mkdir()
    lowbit.save_tensors(out / "model.safetensors", qtensors)
    (out / "quantization.json").write_text("{}")
    assert inspect_path(out) == inspect_path(out / "model.safetensors")


def test_plain_safetensors(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(4, 8), "b": torch.zeros(3, dtype=torch.bfloat16),
               "c": torch.zeros(2, 5, dtype=torch.int8), "d": torch.zeros(6, dtype=torch.float8_e4m3fn)}, p)
    got = {r.name: (r.shape, r.format, r.bpw, r.nbytes) for r in inspect_path(p)}
    assert got == {"a": ((4, 8), "float32", 32.0, 128), "b": ((3,), "bfloat16", 16.0, 6),
                   "c": ((2, 5), "int8", 8.0, 10), "d": ((6,), "float8_e4m3fn", 8.0, 6)}


def test_hf_folder(tiny_llama_dir, tiny_llama):
    rows = inspect_path(tiny_llama_dir)
    sd = tiny_llama[0].state_dict()
    assert {r.name: r.shape for r in rows} == {k: tuple(v.shape) for k, v in sd.items()}
    params, nbytes, bpw = summarize(rows)
    assert params == sum(v.numel() for v in sd.values()) and nbytes == 4 * params and bpw == 32.0


def test_gguf_matches_gguf_reader(tiny_gguf):
    from gguf import GGUFReader

    rows = inspect_path(tiny_gguf.path)
    reader = GGUFReader(str(tiny_gguf.path))
    assert len(rows) == len(reader.tensors)
    for r, t in zip(rows, reader.tensors, strict=True):
        assert r.name == t.name and r.format == t.tensor_type.name and r.nbytes == int(t.n_bytes)
        assert r.shape == tuple(int(d) for d in reversed(t.shape))
    idx = read_gguf_index(tiny_gguf.path)
    assert [t.offset for t in idx.tensors] == [int(t.data_offset) for t in reader.tensors]
    assert idx.metadata["general.architecture"] == "llama" and idx.metadata["llama.block_count"] == 2
    assert idx.metadata["tokenizer.ggml.tokens"] == {"array_length": 384}  # long arrays are skipped
    bpw = {r.format: r.bpw for r in rows}
    assert bpw == {"F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5,
                   "Q5_1": 6.0}
    assert rows[0].shape == tuple(tiny_gguf.reference["model.embed_tokens.weight"].shape)


def test_summarize_weights_by_params():
    rows = [TensorRow("a", (2, 32), "Q8_0", 8.5, 68), TensorRow("b", (64,), "F32", 32.0, 256)]
    assert summarize(rows) == (128, 324, 8 * 324 / 128)
    assert summarize([]) == (0, 0, 0.0)


@pytest.mark.integration
def test_smollm2_gguf():
    from lowbit.cli.assets import smollm2_gguf

    rows = inspect_path(smollm2_gguf())
    assert Counter(r.format for r in rows) == {"Q4_1": 210, "F32": 61, "Q8_0": 1}  # as ASSETS.md says
    assert rows[0] == TensorRow("token_embd.weight", (49152, 576), "Q8_0", 8.5, 30081024)
    params, nbytes, _ = summarize(rows)
    assert params == 134_515_008 and nbytes < smollm2_gguf().stat().st_size


# -- bad input -------------------------------------------------------------------------------------------


def _error(path, needle):
    with pytest.raises(InspectError) as e:
        inspect_path(path)
    assert isinstance(e.value, LowbitError) and needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_inputs(tmp_path, tiny_gguf, qtensors):
    _error(tmp_path / "missing.gguf", "missing.gguf: no such file")
    (tmp_path / "notes.txt").write_text("hi")
    _error(tmp_path / "notes.txt", "unknown file type")
    _error(tmp_path, "no model.safetensors")
    data = tiny_gguf.path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    _error(tmp_path / "cut.gguf", "is truncated")
    (tmp_path / "head.gguf").write_bytes(data[:3000])
    _error(tmp_path / "head.gguf", "truncated or corrupt GGUF header")
    p = tmp_path / "w.safetensors"
    lowbit.save_tensors(p, qtensors)
    blob = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[:-10])
    _error(tmp_path / "cut.safetensors", "truncated")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    _error(tmp_path / "tiny.safetensors", "no header")
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header["__metadata__"]["lowbit"] = "{broken"
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (tmp_path / "bad.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + blob[8 + n:])
    _error(tmp_path / "bad.safetensors", "corrupt lowbit header")
