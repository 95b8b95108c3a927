"""The exporter interface: registry, typed options, and ``lowbit export NAME`` generated from them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

import lowbit
from lowbit.cli import commands
from lowbit.cli.main import build_parser, main
from lowbit.errors import LowbitError
from lowbit.io.exporters import (
    Exporter,
    ExportOptions,
    OptionError,
    exporter_names,
    get_exporter,
    option,
    register_exporter,
    unregister_exporter,
)
from lowbit.io.gguf.exporter import GGUFOptions
from lowbit.io.hf_exporter import HFOptions
from lowbit.model.qmodules import QLinear


def run(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# -- a toy exporter, registered only by the tests that ask for it -------------------------------------------


@dataclass(frozen=True)
class ToyOptions(ExportOptions):
    repeat: int = option(1, "lines per parameter tensor", minimum=1)
    shout: bool = option(False, "upper-case the tensor names")
    layout: Literal["lines", "json"] = option("lines", "how the names are written")
    scale: float = option(1.0, "a number for the header")
    header: bool = option(True, "write a header line")
    label: str | None = option(None, "a label for the header")


@dataclass
class ToyDetails:
    tensors: int
    quantized: int  # QLinear layers in the model it was given
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "quantized": self.quantized}


class ToyExporter(Exporter):
    name = "toy"
    help = "parameter names in a text file"
    Options = ToyOptions

    def write(self, qmodel, out: Path, tokenizer, options: ToyOptions, *, force: bool, progress) -> ToyDetails:
        names = [n.upper() if options.shout else n for n, _ in qmodel.named_parameters()]
        names = [n for n in names for _ in range(options.repeat)]
        body = json.dumps(names) if options.layout == "json" else "\n".join(names)
        head = f"toy {options.label} x{options.scale}\n" if options.header else ""
        out.write_text(head + body)
        quantized = sum(isinstance(m, QLinear) for m in qmodel.modules())
        return ToyDetails(len(names), quantized, ["the toy format keeps no weights"])


class QuantizingToyExporter(ToyExporter):
    name = "qtoy"
    help = "the toy format, quantizing a float model first"
    quantizes_first = True


@pytest.fixture
def toy():
    register_exporter(ToyExporter)
    register_exporter(QuantizingToyExporter)
    yield
    unregister_exporter("toy")
    unregister_exporter("qtoy")


# -- registry --------------------------------------------------------------------------------------------


def test_registry_names_and_unknown_name():
    assert exporter_names() == ["gguf", "hf", "onnx"]
    assert get_exporter("gguf").Options is GGUFOptions and get_exporter("hf").quantizes_first
    with pytest.raises(LowbitError) as info:
        get_exporter("tflite")
    assert str(info.value) == "unknown exporter 'tflite' (known: gguf, hf, onnx)"
    with pytest.raises(LowbitError, match="unknown exporter 'tflite'"):
        unregister_exporter("tflite")


def test_registration_refuses_what_the_cli_cannot_hold():
    @dataclass(frozen=True)
    class ListOptions(ExportOptions):
        names: list = field(default_factory=list, metadata={"help": "names"})

    @dataclass(frozen=True)
    class NoHelp(ExportOptions):
        n: int = 3

    for opts, needle in ((ListOptions, "an option needs a default"), (NoHelp, "an option needs help")):
        cls = type("Bad", (ToyExporter,), {"name": "bad", "Options": opts})
        with pytest.raises(LowbitError, match=needle):
            register_exporter(cls)

    @dataclass(frozen=True)
    class Tuples(ExportOptions):
        shape: tuple = option((), "a shape")

    with pytest.raises(LowbitError, match="bool, int, float or str"):
        register_exporter(type("Bad", (ToyExporter,), {"name": "bad", "Options": Tuples}))
    with pytest.raises(LowbitError, match="lower-case name"):
        register_exporter(type("Bad", (ToyExporter,), {"name": "Bad Name"}))
    with pytest.raises(LowbitError, match="'gguf' is already registered"):
        register_exporter(type("Other", (ToyExporter,), {"name": "gguf"}))
    assert exporter_names() == ["gguf", "hf", "onnx"]


# -- options ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    ({"calib_windows": 0}, "GGUFOptions.calib_windows=0: must be at least 1"),
    ({"calib_windows": "4"}, "GGUFOptions.calib_windows='4': expected an integer, got str"),
    ({"calib_windows": True}, "GGUFOptions.calib_windows=True: expected an integer, got a bool"),
    ({"threads": 0}, "GGUFOptions.threads=0: must be at least 1"),
    ({"method": "magic"}, "GGUFOptions.method='magic': unknown method 'magic' (known: awq, awq+gptq, gptq, hqq, "
                          "qat, rtn, smoothquant)"),
    ({"method": "gptq"}, "GGUFOptions.calib: method 'gptq' needs calibration text"),
    ({"type": "Q9_Z"}, "GGUFOptions.type='Q9_Z': not a llama.cpp type or mix (known: F32, F16"),
    ({"check": "yes"}, "GGUFOptions.check='yes': expected true or false, got str"),
])
def test_gguf_options_are_checked_in_one_place(kwargs, message):
    with pytest.raises(OptionError) as info:
        GGUFOptions(**kwargs)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert info.value.option in kwargs or info.value.option == "calib"


def test_options_types_round_trip_and_defaults():
    o = ToyOptions(scale=3, layout="json", label="x")
    assert o.scale == 3.0 and isinstance(o.scale, float)
    assert ToyOptions.from_dict(o.to_dict()) == o and o.to_dict()["version"] == 1
    with pytest.raises(OptionError, match=r"ToyOptions.layout='xml': expected one of lines, json"):
        ToyOptions(layout="xml")
    with pytest.raises(OptionError, match="ToyOptions.repeat: must be set"):
        ToyOptions(repeat=None)
    with pytest.raises(LowbitError, match="unknown option 'colour' .known: repeat, shout"):
        ToyOptions.from_dict({"colour": "red"})
    with pytest.raises(LowbitError, match="options version 2"):
        ToyOptions.from_dict({"version": 2})
    with pytest.raises(OptionError, match="HFOptions.strict=1: expected true or false, got int"):
        HFOptions(strict=1)
    assert GGUFOptions() == GGUFOptions(type=None, method=None, calib=None, calib_windows=128,
                                        window_len=512, threads=None, check=False)
    assert GGUFOptions(method="gptq", calib="random").calib == "random"


def test_cli_defaults_are_the_options_defaults():
    """The generated flags parse to the same options and quantize flags the hand-written parsers gave."""
    ap = build_parser()
    args = ap.parse_args(["export", "gguf", "m", "-o", "m.gguf"])
    assert commands._export_options(get_exporter("gguf"), args) == GGUFOptions()
    assert (args.force, args.json, args.out) == (False, False, "m.gguf")
    args = ap.parse_args(["export", "gguf", "m", "-o", "x", "--type", "Q8_0", "--method", "gptq", "--calib", "c.txt",
                          "--calib-windows", "4", "--window-len", "64", "--threads", "2", "--check"])
    assert commands._export_options(get_exporter("gguf"), args) == GGUFOptions(
        type="Q8_0", method="gptq", calib="c.txt", calib_windows=4, window_len=64, threads=2, check=True)
    args = ap.parse_args(["export", "hf", "m", "-o", "d", "--strict"])
    assert commands._export_options(get_exporter("hf"), args) == HFOptions(strict=True)
    assert (args.scheme, args.method, args.observer, args.calib, args.calib_windows, args.window_len) == (
        None, None, "minmax", None, 128, 512)  # no --method: rtn, or gptq for a vision model (cmd_export decides)


def test_a_bad_option_is_one_line_naming_the_flag(capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "m.gguf"
    code, _, err = run(capsys, "export", "gguf", str(tiny_llama_dir), "-o", str(out), "--method", "magic")
    assert code == 2 and err == ("error: --method magic: unknown method 'magic' (known: awq, awq+gptq, gptq, hqq, qat, "
                                 "rtn, smoothquant)\n")
    code, _, err = run(capsys, "export", "gguf", str(tiny_llama_dir), "-o", str(out), "--calib-windows", "0")
    assert code == 2 and err == "error: --calib-windows 0: must be at least 1\n"
    code, _, err = run(capsys, "export", "gguf", str(tiny_llama_dir), "-o", str(out), "--type", "Q9")
    assert code == 2 and err.startswith("error: --type Q9: not a llama.cpp type or mix (known: F32")
    code, _, err = run(capsys, "export", "gguf", str(tiny_llama_dir), "-o", str(out), "--method", "gptq")
    assert code == 2 and err.startswith("error: --calib: method 'gptq' needs calibration text")
    code, _, err = run(capsys, "export", "gguf", str(tiny_llama_dir), "-o", str(out), "--calib", str(tmp_path / "no"))
    assert code == 2 and err == f"error: {tmp_path / 'no'}: no such text file\n"  # before the model loads
    assert not out.exists()


# -- the generated CLI, on a toy exporter ----------------------------------------------------------------


def test_export_help_lists_the_registered_exporters(toy, capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    for name in ("gguf", "hf", "toy", "qtoy"):
        assert f"    {name} " in text
    assert "parameter names in a text file" in text
    with pytest.raises(SystemExit):
        main(["export", "toy", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--repeat REPEAT lines per parameter tensor (default 1)", "--shout upper-case the tensor names",
                 "--layout {lines,json}", "--scale SCALE", "--header, --no-header", "--label LABEL", "-o OUT",
                 "--force", "--json"):
        assert flag in text, flag
    assert "--scheme" not in text and "--calib" not in text


def test_a_registered_exporter_runs_end_to_end(toy, capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "names.txt"
    code, stdout, err = run(capsys, "export", "toy", str(tiny_llama_dir), "-o", str(out), "--repeat", "2", "--shout",
                            "--layout", "json", "--scale", "3", "--no-header", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    names = json.loads(out.read_text())
    assert names[0] == names[1] == "MODEL.EMBED_TOKENS.WEIGHT" and report["tensors"] == len(names)
    assert report["format"] == "toy" and report["bytes_written"] == out.stat().st_size
    assert report["options"] == {"version": 1, "repeat": 2, "shout": True, "layout": "json", "scale": 3.0,
                                 "header": False, "label": None}
    assert report["warnings"] == ["the toy format keeps no weights"] and report["quantized"] == 0

    code, stdout, err = run(capsys, "export", "toy", str(tiny_llama_dir), "-o", str(out), "--label", "x")
    assert code == 2 and "already exists (pass --force" in err
    code, stdout, err = run(capsys, "export", "toy", str(tiny_llama_dir), "-o", str(out), "--label", "[x]", "--force")
    assert code == 0, err
    assert out.read_text().startswith("toy [x] x1.0\nmodel.embed_tokens.weight\n")
    assert "warning: the toy format keeps no weights" in stdout and f"wrote {out} (" in stdout
    code, _, err = run(capsys, "export", "toy", str(tiny_llama_dir), "-o", str(out), "--repeat", "0")
    assert code == 2 and err == "error: --repeat 0: must be at least 1\n"


def test_an_exporter_that_quantizes_first_takes_the_quantize_flags(toy, capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "q.txt"
    code, stdout, err = run(capsys, "export", "qtoy", str(tiny_llama_dir), "-o", str(out), "--scheme", "int8",
                            "--keep", "lm_head", "--repeat", "1", "--json")
    assert code == 0, err
    assert json.loads(stdout)["quantized"] == 14  # 2 blocks x 7 linear layers; lm_head kept
    never = tmp_path / "never.txt"
    code, _, err = run(capsys, "export", "qtoy", str(tiny_llama_dir), "-o", str(never))
    assert code == 2 and "pass --scheme" in err
    code, _, err = run(capsys, "export", "qtoy", str(tiny_llama_dir), "-o", str(never), "--scheme", "int8", "--act",
                       "int8-dynamic")
    assert code == 2 and "the qtoy export is weight-only" in err
    assert not never.exists()


def test_unregistered_exporters_leave_the_cli(capsys):
    assert "toy" not in exporter_names()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "toy", "m", "-o", "x"])
    assert "invalid choice: 'toy'" in capsys.readouterr().err


# -- the two built-in exporters through the interface -----------------------------------------------------


def test_gguf_and_hf_through_the_interface(tmp_path, tiny_llama):
    model, tok = tiny_llama
    gguf = get_exporter("gguf")
    path = tmp_path / "m.gguf"
    report = gguf.export(model, path, tok, GGUFOptions(type="Q8_0"), progress=False)
    d = report.to_dict()
    assert (report.format, report.path, report.bytes_written) == ("gguf", str(path), path.stat().st_size)
    assert d["mix"] == "Q8_0" and d["tensors"] and report.options.type == "Q8_0" and "check" not in d
    assert report.details.gguf.bpw == 8.5 and report.warnings == report.details.gguf.warnings
    with pytest.raises(LowbitError, match="already exists"):
        gguf.export(model, path, tok, GGUFOptions(type="Q8_0"))
    with pytest.raises(LowbitError, match="the gguf exporter takes GGUFOptions, got HFOptions"):
        gguf.export(model, tmp_path / "x.gguf", tok, HFOptions())

    qmodel, _ = lowbit.quantize(model, tok, scheme="int4-g32-sym", progress=False)
    report = get_exporter("hf").export(qmodel, tmp_path / "hf", tok)
    assert report.format == "hf" and len(report.details.packed) == 15
    assert report.bytes_written == sum(f.stat().st_size for f in (tmp_path / "hf").iterdir())
    assert report.to_dict()["layers"] and report.to_dict()["packed_bpw"] > 4
