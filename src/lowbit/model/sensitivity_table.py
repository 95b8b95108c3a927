"""The sensitivity table: per unit of layers × candidate scheme, its exact bytes and the predicted cost (ΔKL of
the final logits) of quantizing that unit alone. Measured by :mod:`lowbit.model.sensitivity`, read by the
budget allocator (:mod:`lowbit.model.budget`), saved as JSON so that a later run reuses it.

A *unit* is layers that must share one scheme (by default the architecture's sequential groups: q/k/v of a
block, gate/up; o and down alone), so that AWQ's shared input scale and fused kernels stay possible.
Layers outside every unit (embeddings, the head) are *fixed*: their scheme is in ``fixed``, their bytes in
``fixed_bytes`` with everything else the checkpoint stores (norms, biases), and the linear ones among them
(an untied head) in ``fixed_linear`` (weights, bytes), which bits-per-weight budgets count as
``report.linear_bpw`` does.

>>> t = SensitivityTable(model={"name": "toy"}, method="gptq", config=MethodConfig(), candidates=("int8", "int4-g64"),
...                      units=(Unit(("a", "b"), 2048, {"int8": Cost(2080, 1e-4), "int4-g64": Cost(1104, 3e-3)}),),
...                      fixed={}, fixed_bytes=0, fixed_linear=(0, 0))
>>> _ = t.save("table.json"); SensitivityTable.load("table.json") == t
True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.core.jsonio import JSONFileError, read_json
from lowbit.core.jsonio import field as jfield
from lowbit.errors import LowbitError
from lowbit.methods.registry import MethodConfig

TABLE_FORMAT = "lowbit-sensitivity"
TABLE_VERSION = 1


@dataclass(frozen=True)
class Cost:
    """One candidate for one unit: stored ``bytes`` (every layer's layout ``nbytes``), predicted ``kl`` (mean
    nats per position), and ``schemes``: each layer's scheme after a GGML fallback, when one applied."""

    bytes: int
    kl: float
    schemes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"bytes": self.bytes, "kl": self.kl}
        if self.schemes:
            d["schemes"] = list(self.schemes)
        return d


@dataclass(frozen=True)
class Unit:
    layers: tuple[str, ...]
    weights: int  # number of weights of its layers
    costs: dict[str, Cost]  # candidate scheme name -> cost; candidates the unit cannot take are absent

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "weights": self.weights,
                "costs": {k: c.to_dict() for k, c in self.costs.items()}}


@dataclass(frozen=True)
class SensitivityTable:
    model: dict[str, Any]  # identity: name, model_type, fingerprint (checked when a table is reused)
    method: str  # the method the plan quantizes with (its pair transforms are not part of the measurement)
    config: MethodConfig
    candidates: tuple[str, ...]
    units: tuple[Unit, ...]
    fixed: dict[str, str | None]  # layers outside the units -> scheme (rtn), None = float
    fixed_bytes: int  # checkpoint bytes outside the units: fixed layers, norms, biases
    fixed_linear: tuple[int, int]  # (weights, bytes) of the linear layers among ``fixed``
    windows: int = 0  # calibration windows of the block pass (XᵀX)
    window_len: int = 0
    fisher_windows: int = 0  # windows of the backward pass (output gradients)
    seed: int = 0
    tokens: int = 0
    proxy: str = "fisher-rank1"  # ½ Σ_o f_o (ΔW H_w ΔWᵀ)_oo / tokens, H_w = Σ_t w_t x_t x_tᵀ (see sensitivity)
    version: int = TABLE_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def unit_weights(self) -> int:
        return sum(u.weights for u in self.units)

    def to_dict(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "version": self.version, "model": self.model, "method": self.method,
                "config": self.config.to_dict(), "proxy": self.proxy, "windows": self.windows,
                "window_len": self.window_len, "fisher_windows": self.fisher_windows, "seed": self.seed,
                "tokens": self.tokens, "candidates": list(self.candidates), "fixed": self.fixed,
                "fixed_bytes": self.fixed_bytes, "fixed_linear": list(self.fixed_linear), "extra": self.extra,
                "units": [u.to_dict() for u in self.units]}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON (atomically)."""
        from lowbit.io.atomic import atomic_file

        p = Path(path)
        with atomic_file(p) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return p

    @classmethod
    def from_dict(cls, d: Any, where: str | os.PathLike = "sensitivity table") -> SensitivityTable:
        if jfield(d, "format", str, where) != TABLE_FORMAT:
            raise JSONFileError(f"{where}: not a lowbit sensitivity table (format {d.get('format')!r})")
        if jfield(d, "version", int, where) != TABLE_VERSION:
            raise JSONFileError(f"{where}: sensitivity table version {d['version']} is not supported "
                                f"(this lowbit reads {TABLE_VERSION})")
        units = tuple(_unit(u, where, i) for i, u in enumerate(jfield(d, "units", list, where)))
        fl = jfield(d, "fixed_linear", list, where)
        if len(fl) != 2 or not all(type(v) is int for v in fl):
            raise JSONFileError(f"{where}: field 'fixed_linear' must be [weights, bytes]")
        fixed = jfield(d, "fixed", dict, where)
        for k in fixed:
            jfield(fixed, k, (str, type(None)), where, what="fixed: ")
        return cls(
            model=jfield(d, "model", dict, where), method=jfield(d, "method", str, where),
            config=MethodConfig.from_dict(jfield(d, "config", dict, where)),
            candidates=tuple(jfield(d, "candidates", list, where)), units=units, fixed=dict(fixed),
            fixed_bytes=jfield(d, "fixed_bytes", int, where), fixed_linear=(fl[0], fl[1]),
            windows=jfield(d, "windows", int, where, 0), window_len=jfield(d, "window_len", int, where, 0),
            fisher_windows=jfield(d, "fisher_windows", int, where, 0), seed=jfield(d, "seed", int, where, 0),
            tokens=jfield(d, "tokens", int, where, 0), proxy=jfield(d, "proxy", str, where, "fisher-rank1"),
            extra=jfield(d, "extra", dict, where, {}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SensitivityTable:
        """Read a table written by :meth:`save`; any problem is one LowbitError naming the file."""
        try:
            return cls.from_dict(read_json(path), path)
        except JSONFileError as e:
            raise LowbitError(str(e)) from None

    def check_model(self, identity: dict[str, Any], where: str | os.PathLike) -> None:
        """Refuse a table measured on another model (its fingerprint differs)."""
        mine, theirs = self.model.get("fingerprint"), identity.get("fingerprint")
        if mine != theirs:
            raise LowbitError(f"{where}: this sensitivity table was measured on another model "
                              f"({self.model.get('name', '?')}, fingerprint {str(mine)[:12]}; this model: "
                              f"{str(theirs)[:12]}); delete it or pass another --table")


def _unit(u: Any, where: str | os.PathLike, i: int) -> Unit:
    what = f"unit {i}: "
    layers = tuple(jfield(u, "layers", list, where, what=what))
    if not layers or not all(isinstance(n, str) for n in layers):
        raise JSONFileError(f"{where}: {what}'layers' must be a non-empty list of layer names")
    costs = {}
    for name, c in jfield(u, "costs", dict, where, what=what).items():
        w = f"{what}{name}: "
        schemes = tuple(jfield(c, "schemes", list, where, [], w))
        costs[name] = Cost(jfield(c, "bytes", int, where, what=w), float(jfield(c, "kl", float, where, what=w)),
                           schemes)
    return Unit(layers, jfield(u, "weights", int, where, what=what), costs)
