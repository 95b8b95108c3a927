"""The method registry and the types every method shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.core.qtensor import QTensor
from lowbit.core.scheme import Scheme
from lowbit.errors import SchemeError


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


# Options read by the pipeline around a method (activation quantization, scale migration), not by the
# method itself: every method accepts them.
PIPELINE_OPTIONS = frozenset({"act", "act_observer", "alpha", "awq_grid"})


def method_options(config: MethodConfig) -> dict[str, Any]:
    """The options meant for the method itself (``config.options`` minus :data:`PIPELINE_OPTIONS`)."""
    return {k: v for k, v in config.options.items() if k not in PIPELINE_OPTIONS}


Method = Callable[[torch.Tensor, LayerStats, Scheme, MethodConfig], QuantResult]
_METHODS: dict[str, Method] = {}
NEEDS_DATA: set[str] = set()


def register_method(name: str, needs_data: bool = False) -> Callable[[Method], Method]:
    def deco(fn: Method) -> Method:
        _METHODS[name] = fn
        if needs_data:
            NEEDS_DATA.add(name)
        return fn

    return deco


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise SchemeError(f"unknown method {name!r} (known: {', '.join(sorted(_METHODS))})") from None


def method_names() -> list[str]:
    return sorted(_METHODS)
