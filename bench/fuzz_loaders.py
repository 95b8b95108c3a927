"""Fuzz lowbit's readers with mutations of real files: every case must end in success or a LowbitError.

Seeds (built here, seeded): a lowbit model directory (model.safetensors + quantization.json + config.json) of
a tiny Llama, its checkpoint file alone, a plain safetensors file, a GGUF file (F32, F16, Q8_0, Q4_0 tensors,
string/int/array metadata), a Plan JSON and a config.json. Mutations: truncations, byte flips, hostile 8-byte
integers in the header, and structure-aware edits (a JSON field, a safetensors header field or the lowbit
metadata inside it, a GGUF count or an inserted GGUF key) set to hostile values (-1, 2**64, NaN, Infinity,
1e999, wrong types, 10 000-deep nesting, long strings, 100k keys).

Each case runs in a forked child with an address-space cap (``resource.setrlimit``) and a timeout, and is
counted as ok, LowbitError, other exception (a traceback the user would see), hang (> timeout), oom (the cap
hit: MemoryError or a failed allocation) or crash (a signal)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/fuzz_loaders.py --cases 10000 [--loaders gguf,plan] [--json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # forked children must not inherit an OpenMP pool
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

OUTCOMES = ("ok", "LowbitError", "other", "hang", "oom", "crash")
DEEP = "[" * 10000 + "]" * 10000
HOSTILE_JSON = [-1, 0, 2**64, 10**400, 1.5, "x", "", [], {}, None, True, [[[[1]]]], {"a": 1}, "int99-g0",
                "\ud800"[:0] + "é" * 1000, "__DEEP__", "__INF__", "__NAN__", "__BIG__"]
HOSTILE_INTS = [0, 1, 2**31 - 1, 2**32, 2**63 - 1, 2**64 - 1, 2**40, 100_000, 7]


# -- seeds ----------------------------------------------------------------------------------------------


def build_seeds(root: Path) -> dict[str, Path]:
    """The valid files each loader's cases mutate."""
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    import lowbit

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    qmodel, report = lowbit.quantize(model, None, scheme="int4-g16", method="rtn")
    report = dataclasses.replace(report, seconds=0.0)  # the seeds are byte-identical run to run
    qdir = lowbit.save(qmodel, root / "qdir", plan=qmodel.lowbit_plan, report=report)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "float.safetensors"))
    shutil.copy(qdir / "model.safetensors", root / "checkpoint.safetensors")
    (root / "plan.json").write_text(qmodel.lowbit_plan.to_json())
    shutil.copy(qdir / "config.json", root / "config.json")
    w = gguf.GGUFWriter(str(root / "model.gguf"), "llama")
    w.add_name("fuzz")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_token_list([f"t{i}" for i in range(70)])
    w.add_array("fuzz.short", [1, 2, 3])
    rng = np.random.default_rng(0)
    for name, qtype in (("a", "F32"), ("b", "F16"), ("c", "Q8_0"), ("d", "Q4_0")):
        a = rng.standard_normal((4, 64)).astype(np.float32)
        t = gguf.GGMLQuantizationType[qtype]
        if qtype == "F32":
            w.add_tensor(f"{name}.weight", a)
        else:
            w.add_tensor(f"{name}.weight", gguf.quants.quantize(a, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"checkpoint": root / "checkpoint.safetensors", "lowbit-dir": qdir,
            "safetensors": root / "float.safetensors", "gguf": root / "model.gguf", "plan": root / "plan.json",
            "config": root / "config.json"}


# -- mutations --------------------------------------------------------------------------------------------


def _json_text(doc) -> str:
    text = json.dumps(doc)
    return (text.replace('"__DEEP__"', DEEP).replace('"__INF__"', "Infinity").replace('"__NAN__"', "NaN")
            .replace('"__BIG__"', "1e999"))


def _nodes(doc, path=()):
    yield path
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _nodes(v, (*path, i))


def mutate_json_doc(doc, rng: random.Random):
    """``doc`` with one node replaced by a hostile value (or a key dropped); the lowbit metadata string inside a
    safetensors header is itself parsed and mutated half the time."""
    paths = list(_nodes(doc))
    path = rng.choice(paths)
    if not path:
        return rng.choice(HOSTILE_JSON)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if isinstance(parent[key], str) and parent[key].startswith("{") and rng.random() < 0.7:
        try:
            parent[key] = _json_text(mutate_json_doc(json.loads(parent[key]), rng))
            return doc
        except ValueError:
            pass
    if isinstance(parent, dict) and rng.random() < 0.15:
        del parent[key]
    else:
        parent[key] = rng.choice(HOSTILE_JSON)
    return doc


def _safetensors_header(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def mutate_safetensors(raw: bytes, rng: random.Random) -> bytes:
    header, data = _safetensors_header(raw)
    text = _json_text(mutate_json_doc(header, rng)).encode()
    if rng.random() < 0.1:
        data = data[:rng.randrange(len(data) + 1)]
    return struct.pack("<Q", len(text)) + text + data


def _gguf_kv(key: str, vtype: int, payload: bytes) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + payload


def _gguf_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_insert_kv(raw: bytes, entries: list[bytes]) -> bytes:
    """``raw`` with metadata entries inserted after the header, padded so the tensor data keeps its alignment."""
    body = b"".join(entries)
    pad = len(_gguf_kv("fuzz.pad", 8, _gguf_str("")))
    body += _gguf_kv("fuzz.pad", 8, _gguf_str("x" * ((-(len(body) + pad)) % 32)))
    n_t, n_kv = struct.unpack_from("<QQ", raw, 8)
    return raw[:8] + struct.pack("<QQ", n_t, n_kv + len(entries) + 1) + body + raw[24:]


def _hostile_kvs(rng: random.Random) -> list[bytes]:
    choice = rng.randrange(6)
    if choice == 0:  # alignment of every type and value
        vt, fmt, v = rng.choice([(4, "<I", 0), (4, "<I", 3), (4, "<I", 2**31), (6, "<f", float("nan")),
                                 (6, "<f", 32.0), (10, "<Q", 2**64 - 1), (7, "<?", True)])
        return [_gguf_kv("general.alignment", vt, struct.pack(fmt, v))]
    if choice == 1:
        return [_gguf_kv("general.alignment", 8, _gguf_str("32"))]
    if choice == 2:  # arrays nested deep
        depth = rng.choice([5, 100, 10000])
        return [_gguf_kv("fuzz.nested", 9, struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 4, 0))]
    if choice == 3:  # an array claiming more elements than the file holds
        return [_gguf_kv("fuzz.arr", 9, struct.pack("<IQ", rng.choice([4, 8, 9]), rng.choice(HOSTILE_INTS)))]
    if choice == 4:
        return [_gguf_kv(f"fuzz.k{i}", 4, struct.pack("<I", i)) for i in range(rng.choice([2000, 100_000]))]
    return [_gguf_kv("general.architecture", 8, _gguf_str(rng.choice(["mamba", "", "x" * 5000])))]


def mutate_gguf(raw: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return gguf_insert_kv(raw, _hostile_kvs(rng))
    b = bytearray(raw)  # a hostile integer over a header field (counts, lengths, dims, types, offsets)
    pos = rng.choice([8, 16]) if rng.random() < 0.3 else rng.randrange(8, min(len(b) - 8, 4096))
    b[pos:pos + rng.choice([4, 8])] = struct.pack("<Q", rng.choice(HOSTILE_INTS))[:rng.choice([4, 8])]
    return bytes(b)


def mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return raw[:rng.randrange(len(raw))]
    b = bytearray(raw)
    head = min(len(b), rng.choice([64, 4096, len(b)]))  # most structure sits at the start
    if kind == 1:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(head)] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 2:
        pos = rng.randrange(max(1, head - 8))
        b[pos:pos + 8] = struct.pack("<Q", rng.choice(HOSTILE_INTS))
        return bytes(b)
    pos = rng.randrange(head)
    return bytes(b[:pos] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + b[pos:])


def mutate_file(path: Path, rng: random.Random) -> bytes:
    raw = path.read_bytes()
    structured = rng.random() < 0.6
    if structured and path.suffix == ".json":
        return _json_text(mutate_json_doc(json.loads(raw), rng)).encode()
    if structured and path.suffix == ".safetensors":
        return mutate_safetensors(raw, rng)
    if structured and path.suffix == ".gguf":
        return mutate_gguf(raw, rng)
    return mutate_bytes(raw, rng)


def make_case(loader: str, seed_path: Path, work: Path, rng: random.Random) -> Path:
    """A mutated copy of the loader's seed in ``work`` (a directory: one of its files mutated)."""
    if seed_path.is_dir():
        case = work / "case"
        shutil.copytree(seed_path, case)
        target = case / rng.choice(["model.safetensors", "model.safetensors", "quantization.json", "config.json"])
        target.write_bytes(mutate_file(target, rng))
        return case
    case = work / f"case{seed_path.suffix}"
    case.write_bytes(mutate_file(seed_path, rng))
    return case


# -- loaders ----------------------------------------------------------------------------------------------


def load(loader: str, path: Path) -> None:
    """What lowbit does with such a file (the CLI verb that reads it)."""
    if loader == "checkpoint":
        from lowbit import load_tensors

        load_tensors(path)
    elif loader == "lowbit-dir":
        import torch

        import lowbit

        model, _ = lowbit.load(path)
        model(torch.tensor([[1, 2, 3]]))  # a model that loads must also run
    elif loader == "safetensors":
        from lowbit.io.inspect import inspect_path
        from lowbit.io.safetensors_header import read_safetensors_header

        read_safetensors_header(path)
        inspect_path(path)
    elif loader == "gguf":
        from lowbit.io.gguf.reader import read_gguf_weights
        from lowbit.io.inspect import inspect_path

        inspect_path(path)
        read_gguf_weights(path)
    elif loader == "plan":
        from lowbit.model.plan import Plan

        Plan.from_json(path)
    elif loader == "config":
        from lowbit.model.shape import model_shape

        model_shape(path)  # `lowbit size config.json`: read, validated, built on meta
    else:
        raise ValueError(loader)


def _classify(e: BaseException) -> str:
    from lowbit.errors import LowbitError

    if isinstance(e, LowbitError):
        return "LowbitError"
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "alloc" in str(e).lower()):
        return "oom"
    return "other"


def run_case(loader: str, path: Path, timeout: float, mem_bytes: int) -> tuple[str, str]:
    """``(outcome, detail)`` of loading ``path`` in a forked child capped at ``mem_bytes`` more address space."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        outcome, detail = "ok", ""
        try:
            with open("/proc/self/statm") as f:
                vm = int(f.read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (vm + mem_bytes, vm + mem_bytes))
            load(loader, path)
        except BaseException as e:  # noqa: B036 -- every outcome is reported to the parent
            outcome = _classify(e)
            detail = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            if outcome != "LowbitError":  # where it came from, for the report
                import traceback

                frames = traceback.extract_tb(e.__traceback__)[-3:]
                detail += " at " + " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
        os.write(w, json.dumps([outcome, detail]).encode()[:60000])
        os._exit(0)
    os.close(w)
    ready, _, _ = select.select([r], [], [], timeout)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        return "hang", f"no answer in {timeout:.0f} s"
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "crash", f"signal {os.WTERMSIG(status)}"
    try:
        outcome, detail = json.loads(data)
    except ValueError:
        return "crash", "child died without an answer"
    return outcome, detail


def fuzz(loaders: list[str], cases: int, seed: int = 0, timeout: float = 10.0, mem_mb: int = 1024,
         cases_for: dict[str, int] | None = None, progress: bool = False) -> dict[str, dict]:
    """Run ``cases`` mutated inputs per loader; returns ``{loader: {outcome: count, "examples": {...}}}``."""
    import torch

    torch.set_num_threads(1)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lowbit-fuzz-") as tmp:
        seeds = build_seeds(Path(tmp))
        for loader in loaders:
            n = (cases_for or {}).get(loader, cases)
            counts: Counter = Counter()
            examples: dict[str, str] = {}
            t0 = time.time()
            ok_seed = run_case(loader, seeds[loader], timeout, mem_mb << 20)
            if ok_seed[0] != "ok":
                raise SystemExit(f"{loader}: the unmutated seed does not load: {ok_seed}")
            for i in range(n):
                rng = random.Random(f"{seed}:{loader}:{i}")
                work = Path(tmp) / "work"
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
                outcome, detail = run_case(loader, make_case(loader, seeds[loader], work, rng), timeout, mem_mb << 20)
                counts[outcome] += 1
                if outcome not in ("ok", "LowbitError"):
                    examples.setdefault(f"{outcome} {detail.split(':')[0]}", f"case {i}: {detail}")
                if progress and (i + 1) % 500 == 0:
                    print(f"  {loader}: {i + 1}/{n} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
            out[loader] = {"cases": n, **{o: counts[o] for o in OUTCOMES}, "seconds": round(time.time() - t0, 1),
                           "examples": examples}
    return out


def format_table(results: dict[str, dict]) -> str:
    cols = ("cases", "ok", "LowbitError", "other", "hang", "oom", "crash", "seconds")
    lines = ["| loader | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for loader, r in results.items():
        lines.append(f"| {loader} | " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000, help="cases per loader (default 10000)")
    ap.add_argument("--loaders", default="checkpoint,lowbit-dir,safetensors,gguf,plan,config")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds a case may take (default 10)")
    ap.add_argument("--mem-mb", type=int, default=1024, help="address space a case may add (default 1024 MB)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = fuzz(args.loaders.split(","), args.cases, args.seed, args.timeout, args.mem_mb, progress=not args.json)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(format_table(res))
        for loader, r in res.items():
            for k, v in r["examples"].items():
                print(f"{loader}: {k}: {v}")
    return 0 if all(r["other"] + r["hang"] + r["oom"] + r["crash"] == 0 for r in res.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
