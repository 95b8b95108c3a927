"""What quantizing a model did: one :class:`LayerReport` per layer, summed in a :class:`QuantReport`.

>>> from lowbit.model.plan import Plan
>>> from lowbit.model.quantize import quantize_model
>>> report = quantize_model(model, Plan.default("int8"))
>>> round(report.linear_bpw, 3), [(r.name, r.scheme) for r in report.layers[:2]]
(8.059, [('model.layers.0.self_attn.q_proj', 'int8'), ('model.layers.0.self_attn.k_proj', 'int8')])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerReport:
    name: str
    scheme: str
    method: str
    bpw: float
    numel: int
    nbytes: int
    rel_error: float  # ‖W − Ŵ‖ / ‖W‖
    loss: float | None = None  # the method's own (e.g. output reconstruction) loss
    seconds: float = 0.0
    note: str = ""
    kind: str = "linear"


@dataclass
class QuantReport:
    layers: list[LayerReport] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # layers left in float
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    calib_windows: int = 0
    calib_tokens: int = 0
    unfolded: dict[str, list[str]] = field(default_factory=dict)  # AWQ/SmoothQuant pair -> layers it skipped
    notes: list[str] = field(default_factory=list)  # what whole-model steps did (qat's end-to-end distillation)

    @property
    def quantized_numel(self) -> int:
        return sum(r.numel for r in self.layers if r.note != "tied")

    @property
    def quantized_bytes(self) -> int:
        return sum(r.nbytes for r in self.layers if r.note != "tied")

    @property
    def bpw(self) -> float:
        n = self.quantized_numel
        return 8 * self.quantized_bytes / n if n else 0.0

    @property
    def linear_bpw(self) -> float:
        """Bits per weight over the linear layers (embeddings excluded): the figure schemes are compared by."""
        rows = [r for r in self.layers if r.note != "tied" and r.kind == "linear"]
        n = sum(r.numel for r in rows)
        return 8 * sum(r.nbytes for r in rows) / n if n else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bpw"] = self.bpw
        d["linear_bpw"] = self.linear_bpw
        return d
