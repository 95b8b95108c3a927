"""Exporters: one interface for writing a model in a runtime's format, and the registry ``lowbit export`` is built from.

An exporter is a class with a ``name``, a one-line ``help``, typed ``Options`` (a frozen dataclass whose fields
carry their help) and ``write``. :meth:`Exporter.export` wraps ``write`` with what every exporter shares: the
options type, refusing an existing output unless ``force``, timing, and the common :class:`ExportReport`.

>>> exporter = get_exporter("gguf")
>>> report = exporter.export(model, "tiny-q8.gguf", tok, exporter.Options(type="Q8_0"))
>>> report.format, report.details.gguf.bpw
('gguf', 8.5)

A new exporter is one file; registering it adds ``lowbit export NAME`` with a flag per option:

>>> @dataclass(frozen=True)
... class NpzOptions(ExportOptions):
...     compress: bool = option(False, "zip-compress the arrays")          # --compress
...     max_rows: int | None = option(None, "write at most this many rows", minimum=1)   # --max-rows N
>>> @register_exporter
... class NpzExporter(Exporter):
...     name, help, Options = "npz", "the dequantized weights as one numpy .npz file", NpzOptions
...
...     def write(self, qmodel, out, tokenizer, options, *, force=False, progress=None):
...         ...                                  # returns its own report: a dataclass with warnings and to_dict()
>>> exporter_names()
['gguf', 'hf', 'npz', 'onnx']
>>> _ = _EXPORTERS.remove("npz")  # (this example's exporter writes nothing: unregister it again)
"""

from __future__ import annotations

import importlib
import numbers
import time
import types
from abc import ABC, abstractmethod
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, Union, get_args, get_origin, get_type_hints

from lowbit.errors import LowbitError
from lowbit.registry import Registry

# Modules whose exporters register themselves on import; loaded on the first registry look-up, so importing this
# module stays light and an exporter file only depends on this one.
_BUILTINS = ("lowbit.io.gguf.exporter", "lowbit.io.hf_exporter", "lowbit.io.onnx.exporter")
_EXPORTERS: Registry[type[Exporter]] = Registry("exporter")
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


class OptionError(LowbitError, ValueError):
    """An exporter option with a wrong type or value. ``option`` is the field name; the CLI names it as its flag.

    >>> from lowbit.io.gguf.exporter import GGUFOptions
    >>> GGUFOptions(calib_windows=0)
    Traceback (most recent call last):
    lowbit.io.exporters.OptionError: GGUFOptions.calib_windows=0: must be at least 1
    """

    def __init__(self, owner: str, option: str, value: Any, problem: str):
        self.owner, self.option, self.value, self.problem = owner, option, value, problem
        super().__init__(f"{owner}.{option}{'' if value is None else f'={value!r}'}: {problem}")


def option(default: Any, help: str, *, minimum: float | None = None) -> Any:
    """An options field: its default, its help (the CLI flag's help) and an optional lower bound.

    Shorthand for ``field(default=default, metadata={"help": help, "minimum": minimum})``.
    """
    return field(default=default, metadata={"help": help, "minimum": minimum})


@dataclass(frozen=True)
class OptionSpec:
    """One option as the validation and the CLI see it: ``kind`` is bool, int, float or str."""

    name: str
    kind: type
    default: Any
    help: str
    optional: bool = False  # None is a valid value
    choices: tuple[Any, ...] | None = None  # from a Literal annotation
    minimum: float | None = None


def _kind(hint: Any, where: str) -> tuple[type, bool, tuple[Any, ...] | None]:
    """(kind, optional, choices) of an annotation such as ``int``, ``str | None`` or ``Literal["a", "b"]``."""
    optional = False
    if get_origin(hint) in (Union, types.UnionType):
        rest = [a for a in get_args(hint) if a is not type(None)]
        optional = len(rest) < len(get_args(hint))
        hint = rest[0] if len(rest) == 1 else None
    choices = None
    if get_origin(hint) is Literal:
        choices = get_args(hint)
        kinds = {type(c) for c in choices}
        hint = kinds.pop() if len(kinds) == 1 else None
    if hint not in _KINDS:
        raise LowbitError(f"{where}: an option is bool, int, float or str (a Literal of them, or one of them | None)")
    return hint, optional, choices


def option_specs(options_cls: type[ExportOptions]) -> list[OptionSpec]:
    """The options of an ``Options`` class, in field order; a field the CLI cannot hold is an error here."""
    hints = get_type_hints(options_cls)
    specs = []
    for f in fields(options_cls):
        where = f"{options_cls.__qualname__}.{f.name}"
        if f.default is MISSING:
            raise LowbitError(f"{where}: an option needs a default (use option(default, help))")
        if not f.metadata.get("help"):
            raise LowbitError(f"{where}: an option needs help text (use option(default, help))")
        kind, optional, choices = _kind(hints[f.name], where)
        specs.append(OptionSpec(f.name, kind, f.default, f.metadata["help"], optional, choices,
                                f.metadata.get("minimum")))
    return specs


def _checked(spec: OptionSpec, value: Any, owner: str) -> Any:
    """``value`` as the option's kind (an integral number for a float option becomes a float), or an OptionError."""
    if value is None:
        if spec.optional:
            return None
        raise OptionError(owner, spec.name, value, f"must be set (expected {_KINDS[spec.kind]})")
    if spec.kind is not bool and isinstance(value, bool):
        raise OptionError(owner, spec.name, value, f"expected {_KINDS[spec.kind]}, got a bool")
    if spec.kind is int and isinstance(value, numbers.Integral):
        value = int(value)
    elif spec.kind is float and isinstance(value, numbers.Real):
        value = float(value)
    if not isinstance(value, spec.kind):
        raise OptionError(owner, spec.name, value, f"expected {_KINDS[spec.kind]}, got {type(value).__name__}")
    if spec.choices is not None and value not in spec.choices:
        raise OptionError(owner, spec.name, value, f"expected one of {', '.join(map(str, spec.choices))}")
    if spec.minimum is not None and value < spec.minimum:
        raise OptionError(owner, spec.name, value, f"must be at least {spec.minimum:g}")
    return value


@dataclass(frozen=True)
class ExportOptions:
    """Base of every exporter's options: typed fields made with :func:`option`, checked on construction (type,
    choices, lower bound, then :meth:`validate` for rules between options), serialisable with a version."""

    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        owner = type(self).__qualname__
        for spec in option_specs(type(self)):
            object.__setattr__(self, spec.name, _checked(spec, getattr(self, spec.name), owner))
        self.validate()

    def validate(self) -> None:
        """Rules between options or against a live table (known methods, types); raise :meth:`invalid`."""

    def invalid(self, option: str, problem: str) -> OptionError:
        return OptionError(type(self).__qualname__, option, getattr(self, option), problem)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION} | {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExportOptions:
        d = dict(d)
        version = d.pop("version", cls.VERSION)
        if version != cls.VERSION:
            raise LowbitError(f"{cls.__qualname__}: options version {version} (this lowbit reads {cls.VERSION})")
        known = [f.name for f in fields(cls)]
        for k in d:
            if k not in known:
                raise LowbitError(f"{cls.__qualname__}: unknown option {k!r} (known: {', '.join(known)})")
        return cls(**d)


class ExportDetails(Protocol):
    """An exporter's own report (the GGUF per-tensor table, the HF layer list): its warnings and a dict form."""

    warnings: list[str]

    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class ExportReport:
    """What every export returns: where, which format, how big, how long, the warnings, and the exporter's own
    ``details``. In :meth:`to_dict` the details' keys sit beside the common ones (the common ones win)."""

    path: str
    format: str  # the exporter's name
    options: ExportOptions
    bytes_written: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    details: ExportDetails | None = None

    def to_dict(self) -> dict[str, Any]:
        common = {"path": self.path, "format": self.format, "options": self.options.to_dict(),
                  "bytes_written": self.bytes_written, "seconds": self.seconds, "warnings": list(self.warnings)}
        return (self.details.to_dict() if self.details is not None else {}) | common


def disk_bytes(path: Path) -> int:
    """Size of a written file, or of every file under a written folder."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


class Exporter(ABC):
    """Writes a model in one runtime's format. Subclasses set the class attributes and implement :meth:`write`.

    ``quantizes_first``: MODEL on the command line may be a float model, quantized first with the ``lowbit
    quantize`` flags (``--scheme``, ``--method``, ``--calib`` …) when it is not a lowbit directory already.
    ``weight_only``: the format holds quantized weights only, so quantizing first refuses activation schemes.
    """

    name: ClassVar[str]
    help: ClassVar[str]  # one line, for `lowbit export --help`
    description: ClassVar[str] = ""  # for `lowbit export NAME --help`
    out_help: ClassVar[str] = "output path (must not exist unless --force)"
    Options: ClassVar[type[ExportOptions]] = ExportOptions
    quantizes_first: ClassVar[bool] = False
    weight_only: ClassVar[bool] = True

    def export(self, qmodel: Any, out: str | Path, tokenizer: Any = None, options: ExportOptions | None = None, *,
               force: bool = False, progress: bool | None = None) -> ExportReport:
        """Write ``qmodel`` to ``out``; an existing ``out`` is refused unless ``force``."""
        options = self.Options() if options is None else options
        if not isinstance(options, self.Options):
            raise LowbitError(f"the {self.name} exporter takes {self.Options.__qualname__}, "
                              f"got {type(options).__qualname__}")
        path = Path(out)
        if path.exists() and not force:
            raise LowbitError(f"{out}: already exists (pass force=True / --force to replace it)")
        t0 = time.perf_counter()
        details = self.write(qmodel, path, tokenizer, options, force=force, progress=progress)
        return ExportReport(str(out), self.name, options, disk_bytes(path), time.perf_counter() - t0,
                            list(details.warnings), details)

    @abstractmethod
    def write(self, qmodel: Any, out: Path, tokenizer: Any, options: Any, *, force: bool,
              progress: bool | None) -> ExportDetails:
        """Write the file or folder at ``out`` (atomically) and return this exporter's own report."""

    def preflight(self, options: Any) -> None:
        """Check what the options point at (a calibration file …) before a slow model load. Default: nothing."""
        return None

    def streams(self, options: Any) -> bool:
        """Whether :meth:`write` takes a float safetensors folder's path in place of a loaded model (read tensor by
        tensor) with these options. Default: no."""
        return False

    def summary(self, report: ExportReport, source: str) -> list[str]:
        """Lines the CLI prints after the warnings: what was written, what to do next."""
        return [f"wrote {report.path} ({report.bytes_written / 1e6:.1f} MB)"]


def register_exporter(cls: type[Exporter]) -> type[Exporter]:
    """Class decorator: make ``cls`` available as ``get_exporter(cls.name)`` and ``lowbit export NAME``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or not name.replace("-", "").isalnum() or not name.islower():
        raise LowbitError(f"{cls.__qualname__}: an exporter needs a lower-case name such as 'gguf'")
    if not getattr(cls, "help", None):
        raise LowbitError(f"{cls.__qualname__}: an exporter needs a one-line help")
    option_specs(cls.Options)  # an option the CLI cannot hold fails here, not at the first export
    if name in _EXPORTERS and _EXPORTERS[name] is cls:  # a module imported twice
        return cls
    _EXPORTERS.add(name, cls)
    return cls


def unregister_exporter(name: str) -> None:
    """Remove an exporter (tests that register their own)."""
    _EXPORTERS.remove(name)


def _registry() -> Registry[type[Exporter]]:
    for module in _BUILTINS:
        importlib.import_module(module)  # registers on first import; a dict look-up after that
    return _EXPORTERS


def exporter_names() -> list[str]:
    return _registry().names()


def get_exporter(name: str) -> Exporter:
    """The registered exporter ``name``.

    >>> get_exporter("tflite")
    Traceback (most recent call last):
    lowbit.errors.LowbitError: unknown exporter 'tflite' (known: gguf, hf, onnx)
    """
    return _registry().get(name)()
