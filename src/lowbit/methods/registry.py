"""The method registry and the types every method shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.core.qtensor import QTensor
from lowbit.core.scheme import Scheme
from lowbit.errors import SchemeError
from lowbit.registry import Registry


@dataclass
class LayerStats:
    """What calibration saw at one layer's input (all optional: data-free methods need none).

    ``xtx`` — X^T X summed over tokens ``(in, in)`` (float64/float32), ``sq_mean`` — E[x²] per input
    channel ``(in,)``, ``absmax`` — max |x| per input channel ``(in,)``, ``tokens`` — how many rows of X,
    ``sample`` — a subsample of the input rows ``(n, in)`` for searches that need real activations (AWQ).
    """

    xtx: torch.Tensor | None = None
    sq_mean: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    tokens: int = 0
    sample: torch.Tensor | None = None
    act_range: float | None = None  # per-tensor activation range for static activation quantization
    # Σ x_float x_quantᵀ ``(in, in)``: the layer's input on the float model's path against its input on the
    # quantized model's path, token by token (for methods that aim at the float model's outputs).
    xtx_cross: torch.Tensor | None = None


@dataclass(frozen=True)
class MethodConfig:
    """Options shared by methods; each method reads the ones it knows."""

    observer: str = "minmax"
    importance: bool = False  # weight the rounding error per input channel by E[x²]
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"observer": self.observer, "importance": self.importance, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MethodConfig:
        return cls(d.get("observer", "minmax"), bool(d.get("importance", False)), dict(d.get("options", {})))


@dataclass
class QuantResult:
    qtensor: QTensor
    loss: float | None = None  # the method's own reconstruction loss, where it has one
    info: dict[str, Any] = field(default_factory=dict)


# -- what a method declares ----------------------------------------------------------------------
STATISTICS = ("xtx", "sq_mean", "absmax", "sample", "cross")  # what calibration can collect per layer
TRANSFORMS = ("awq", "smooth")  # rescalings of (previous op -> layers) pairs applied before quantizing


@dataclass(frozen=True)
class PipelineOptions:
    """Options every method accepts: read by the pipeline around it (activation quantization)."""

    act: str | None = field(default=None, metadata={"help": "also quantize activations: int8-dynamic | "
                                                             "int8-static | fp8-dynamic"})
    act_observer: str = field(default="minmax", metadata={"help": "range observer for int8-static "
                                                                  "activations: minmax | percentile | entropy"})


@dataclass(frozen=True)
class NoOptions:
    """A method without options of its own."""


def _coerce(method: str, f: Any, value: Any) -> Any:
    """``value`` as field ``f``'s declared type (bool / int / float / str, optionally None)."""
    t = str(f.type)
    kinds = [k for k in ("bool", "int", "float", "str") if k in t.replace("None", "")]
    if value is None and "None" in t:
        return None
    for k in kinds:
        if k == "bool" and isinstance(value, bool):
            return value
        if k == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if k == "float" and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if k == "str" and isinstance(value, str):
            return value
    raise SchemeError(f"{method}: option {f.name!r} must be {' or '.join(kinds + (['null'] if 'None' in t else []))}, "
                      f"got {value!r}")


def option_value(text: str) -> Any:
    """A method option's value as typed on a command line: true/false, an int, a float, else the text."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def option_items(items: list[str], where: str = "--option") -> dict[str, Any]:
    """``["KEY=VALUE", …]`` as a dict of typed values; a malformed item is one error naming it.

    >>> option_items(["damp=0.05", "act_order=true", "init=awq+gptq"])
    {'damp': 0.05, 'act_order': True, 'init': 'awq+gptq'}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SchemeError(f"{where} {item!r}: expected KEY=VALUE, e.g. act_order=true")
        out[key.strip()] = option_value(value)
    return out


def parse_options(method: str, cls: type, raw: dict[str, Any]) -> Any:
    """``raw`` (name -> value) as an instance of the options dataclass ``cls``; unknown names and wrong
    types are one error naming the option.

    >>> parse_options("rtn", PipelineOptions, {"act": "int8-dynamic"}).act
    'int8-dynamic'
    """
    from dataclasses import fields

    fs = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(fs))
    if unknown:
        known = ", ".join(sorted(fs)) or "none"
        raise SchemeError(f"{method}: unknown option(s) {', '.join(unknown)} (known: {known})")
    return cls(**{k: _coerce(method, fs[k], v) for k, v in raw.items()})


@dataclass(frozen=True)
class MethodSpec:
    """A registered method and what it declares: the statistics it reads (``needs``, from
    :data:`STATISTICS`), a pair transform it wants applied first (``transform``), its typed ``options``, the
    layout families it can produce, and the data-free method standing in when a layer saw no tokens."""

    name: str
    fn: Callable[..., QuantResult]
    needs: frozenset[str] = frozenset()
    transform: str | None = None
    options: type = NoOptions
    layouts: tuple[str, ...] = ("affine", "ggml")
    fallback: str = "rtn"
    help: str = ""
    act: str | None = None  # activation scheme implied by the method (SmoothQuant: int8 per token)
    trains: bool = False  # the runner trains the method's blocks after quantizing them (qat)

    @property
    def needs_data(self) -> bool:
        return bool(self.needs)

    def _inherit_field(self) -> Any:
        from dataclasses import fields

        return next((f for f in fields(self.options) if f.metadata.get("inherits")), None)

    def inherited(self, config: MethodConfig) -> tuple[MethodSpec, MethodConfig] | None:
        """The method this one starts from (an option declared ``inherits``, e.g. qat's ``init``) with the
        options meant for it, or None. That method's statistics, transform and options are this one's too."""
        from dataclasses import fields

        f = self._inherit_field()
        if f is None:
            return None
        name = config.options.get(f.name, f.default)
        if not isinstance(name, str) or name not in _METHODS or name == self.name:
            known = ", ".join(n for n in _METHODS.names() if n != self.name)
            raise SchemeError(f"{self.name}: option {f.name}={name!r} is not a method (known: {known})")
        mine = {g.name for g in fields(self.options)}
        return _METHODS[name], MethodConfig(config.observer, config.importance,
                                            {k: v for k, v in config.options.items() if k not in mine})

    def parse(self, config: MethodConfig) -> tuple[PipelineOptions, Any]:
        """``config.options`` split and validated: (pipeline options, this method's own options). A method that
        inherits another's options (see :meth:`inherited`) passes the ones it does not know on to it."""
        from dataclasses import fields

        pipe = {f.name for f in fields(PipelineOptions)}
        own = {k: v for k, v in config.options.items() if k not in pipe}
        po = parse_options(self.name, PipelineOptions, {k: v for k, v in config.options.items() if k in pipe})
        base = self.inherited(config)
        if base is not None:
            mine = {f.name for f in fields(self.options)}
            base[0].parse(base[1])  # the rest must be the starting method's (it raises naming the option)
            own = {k: v for k, v in own.items() if k in mine}
        return po, parse_options(self.name, self.options, own)

    def needs_for(self, config: MethodConfig) -> frozenset[str]:
        """The statistics this layer's calibration must collect: the declared ones, E[x²] for importance
        weighting, and what options ask for (an option field ``wants`` metadata, e.g. float_target -> cross)."""
        from dataclasses import fields

        _, opts = self.parse(config)
        extra = {f.metadata["wants"] for f in fields(opts) if f.metadata.get("wants") and getattr(opts, f.name)}
        base = self.inherited(config)
        inherited = base[0].needs_for(base[1]) if base is not None else frozenset()
        return self.needs | extra | inherited | ({"sq_mean"} if config.importance else set())

    def transform_for(self, config: MethodConfig) -> tuple[str, MethodSpec, MethodConfig] | None:
        """The pair transform this layer wants applied first — ``(kind, the method declaring it, its config)`` —
        its own or the one of the method it starts from; None when there is none."""
        if self.transform is not None:
            return self.transform, self, config
        base = self.inherited(config)
        return None if base is None else base[0].transform_for(base[1])

    def check_layout(self, scheme: Scheme) -> None:
        if scheme.layout not in self.layouts:
            raise SchemeError(f"method {self.name} cannot produce {scheme.name} ({scheme.layout} layout; it "
                              f"supports {', '.join(self.layouts)})")


Method = Callable[[torch.Tensor, LayerStats, Scheme, MethodConfig], QuantResult]
_METHODS: Registry[MethodSpec] = Registry("method", SchemeError)


def register_method(name: str, needs: tuple[str, ...] | frozenset[str] = (), *, needs_data: bool = False,
                    transform: str | None = None, options: type = NoOptions,
                    layouts: tuple[str, ...] = ("affine", "ggml"), fallback: str = "rtn",
                    act: str | None = None, trains: bool = False) -> Callable[[Method], Method]:
    """Register ``fn(weight, stats, scheme, config) -> QuantResult`` with its declarations.

    ``needs_data=True`` (older form) declares E[x²].
    """
    need = frozenset(needs) | ({"sq_mean"} if needs_data and not needs else frozenset())
    bad = need - set(STATISTICS)
    if bad or (transform is not None and transform not in TRANSFORMS):
        raise SchemeError(f"method {name}: unknown statistic/transform {sorted(bad) or transform}")

    def deco(fn: Method) -> Method:
        doc = " ".join((fn.__doc__ or "").split()).split(". ")[0].rstrip(".")  # the first sentence
        _METHODS.add(name, MethodSpec(name, fn, need, transform, options, layouts, fallback, doc, act, trains))
        return fn

    return deco


def method_spec(name: str) -> MethodSpec:
    return _METHODS.get(name)


def get_method(name: str) -> Method:
    return method_spec(name).fn


def method_names() -> list[str]:
    return _METHODS.names()


def method_options(config: MethodConfig) -> dict[str, Any]:
    """The options meant for the method itself (``config.options`` minus the pipeline's)."""
    from dataclasses import fields

    pipe = {f.name for f in fields(PipelineOptions)}
    return {k: v for k, v in config.options.items() if k not in pipe}


def options_help() -> str:
    """Every method with its declared options, for ``--help``.

    >>> "damp" in options_help()
    True
    """
    from dataclasses import MISSING, fields

    lines = []
    for name in method_names():
        spec = _METHODS[name]
        needs = ", ".join(sorted(spec.needs)) or "no data"
        lines.append(f"  {name} ({needs}{'; rescales layer pairs' if spec.transform else ''}): {spec.help}")
        for f in fields(spec.options):
            default = f.default if f.default is not MISSING else "required"
            lines.append(f"      {f.name}={default}  {f.metadata.get('help', '')}")
    lines.append("  every method: " + ", ".join(f"{f.name} ({f.metadata['help']})" for f in fields(PipelineOptions)))
    return "\n".join(lines)
