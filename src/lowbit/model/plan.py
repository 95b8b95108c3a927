"""``Plan``: ordered rules (module-name pattern -> scheme + method, or keep in float).

Rules are matched against full module names; a pattern matches a name when it equals it, when it
matches it as a glob (``model.layers.*.mlp.*``), when it matches a dotted suffix of it (``mlp.down_proj``
matches ``model.layers.3.mlp.down_proj``), or, prefixed ``re:``, as a regular expression (search).
**The last matching rule wins**, so later rules refine earlier ones: the family defaults come first,
then the user's ``--rule`` / ``--keep`` options.

>>> plan = Plan.default("int4-g128", method="gptq", family="llama").with_rules(["mlp.down_proj=int8"], keep=["lm_head"])
>>> print(plan.to_json())  # hand-editable JSON, read back with Plan.from_json  # doctest: +ELLIPSIS
{
  "version": 1,
  "rules": [
    {
      "pattern": "*",
      "scheme": "int4-g128",
      "method": "gptq",
      "config": {
        "observer": "minmax",
        "importance": false,
        "options": {}
      },
      "kind": "linear"
    },
    ...
    {
      "pattern": "lm_head",
      "scheme": null
    }
  ]
}
>>> _ = plan.to_json("plan.json")
>>> Plan.from_json("plan.json") == plan
True
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.core.scheme import Scheme, parse_scheme
from lowbit.errors import LowbitError, SchemeError
from lowbit.methods.registry import MethodConfig, get_method

PLAN_VERSION = 1
KINDS = ("linear", "embedding")


def layer_kind(module: nn.Module) -> str | None:
    """'linear' / 'embedding' for layers lowbit can quantize, None otherwise."""
    from transformers.pytorch_utils import Conv1D

    from lowbit.model.qmodules import QEmbedding, QLinear

    if isinstance(module, nn.Linear | Conv1D | QLinear):
        return "linear"
    if isinstance(module, nn.Embedding | QEmbedding):
        return "embedding"
    return None


def unsupported_leaf(module: nn.Module) -> bool:
    """Weight-carrying leaf layers lowbit does not quantize (reported, kept in float)."""
    return (
        layer_kind(module) is None
        and not list(module.children())
        and isinstance(getattr(module, "weight", None), nn.Parameter)
        and module.weight.dim() >= 2
    )


def row_length(module: nn.Module) -> int:
    """Length of the rows a layer's weight is quantized along (its input features; an embedding's width)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return int(module.weight.shape[0])  # stored (in, out)
    for attr in ("in_features", "embedding_dim"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    return int(module.weight.shape[-1])


def fit_row_length(scheme: Scheme, ncols: int) -> tuple[Scheme, str]:
    """``scheme``, or llama.cpp's fallback when it is a GGML type whose block does not divide the rows
    (Q4_K -> Q5_0, Q6_K -> Q8_0 …; fp16 when no block fits), with a note saying so.

    >>> fit_row_length(parse_scheme("q4_k"), 576)
    (Scheme(format='q5_0', ...), "row length 576 is not a multiple of Q4_K's block of 256: Q5_0 instead")
    """
    blk = scheme.block
    if blk is None or ncols % blk.block_size == 0:
        return scheme, ""
    from lowbit.layouts.ggml import fallback_type

    alt = fallback_type(blk.ggml, ncols)
    new = parse_scheme(alt.lower() if alt else "fp16")
    return new, (f"row length {ncols} is not a multiple of {blk.ggml}'s block of {blk.block_size}: "
                 f"{alt or 'F16'} instead")


@dataclass(frozen=True)
class Rule:
    pattern: str
    scheme: str | None  # None: keep in float
    method: str = "rtn"
    config: MethodConfig = field(default_factory=MethodConfig)
    kind: str | None = None  # restrict to 'linear' or 'embedding'

    def __post_init__(self) -> None:
        if self.scheme is not None:
            parse_scheme(self.scheme)
            get_method(self.method)
        if self.kind is not None and self.kind not in KINDS:
            raise SchemeError(f"rule kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as e:
                raise SchemeError(f"rule pattern {self.pattern!r} is not a valid regular expression ({e})") from None

    def matches(self, name: str, kind: str) -> bool:
        if self.kind is not None and self.kind != kind:
            return False
        p = self.pattern
        if p.startswith("re:"):
            return re.search(p[3:], name) is not None
        return name == p or fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*.{p}")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"pattern": self.pattern, "scheme": self.scheme}
        if self.scheme is not None:
            d["method"] = self.method
            d["config"] = self.config.to_dict()
        if self.kind:
            d["kind"] = self.kind
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rule:
        if not isinstance(d, dict) or "pattern" not in d:
            raise SchemeError(f"a plan rule needs a 'pattern' (got {d!r})")
        return cls(d["pattern"], d.get("scheme"), d.get("method", "rtn"),
                   MethodConfig.from_dict(d.get("config", {})), d.get("kind"))


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer: ``scheme is None`` means it stays in float."""

    name: str
    kind: str
    scheme: Scheme | None
    method: str
    config: MethodConfig
    rule: int  # index of the deciding rule, -1 when no rule matched
    note: str = ""  # e.g. a GGML type's fallback, as llama.cpp applies it

    def to_dict(self) -> dict[str, Any]:
        d = {"kind": self.kind, "scheme": None if self.scheme is None else self.scheme.name,
             "method": self.method, "config": self.config.to_dict(), "rule": self.rule}
        if self.note:
            d["note"] = self.note
        return d


@dataclass(frozen=True)
class Plan:
    rules: tuple[Rule, ...]
    version: int = PLAN_VERSION

    @classmethod
    def default(cls, scheme: str | Scheme, method: str = "rtn", family: str | None = None,
                config: MethodConfig | None = None, embeddings: tuple[str, ...] = (),
                head: str | None = None) -> Plan:
        """Every linear layer at ``scheme``; embeddings and the LM head at 8 bits unless ``scheme`` is wider.

        The first and last layers are the most sensitive, so they get int8 (RTN) by default.
        """
        s = parse_scheme(scheme)
        cfg = config or MethodConfig()
        rules = [Rule("*", s.name, method, cfg, kind="linear")]
        edge = s.name if s.bits >= 8 else "int8"
        for e in embeddings:
            for alt in e.split("|"):
                rules.append(Rule(alt, edge, "rtn", MethodConfig(), kind="embedding"))
        if head:
            rules.append(Rule(head, edge, "rtn", MethodConfig(), kind="linear"))
        return cls(tuple(rules))

    def with_rules(self, rules: list[str] | tuple[str, ...] = (), keep: list[str] | tuple[str, ...] = (),
                   method: str | None = None, config: MethodConfig | None = None) -> Plan:
        """Append ``pattern=scheme[:method]`` rules and keep-in-float patterns (they win over earlier rules)."""
        new = list(self.rules)
        for text in rules:
            if "=" not in text:
                raise SchemeError(f"cannot parse rule {text!r} (expected PATTERN=SCHEME[:METHOD], "
                                  f"e.g. 'mlp.down_proj=int8' or 'lm_head=keep')")
            pat, rhs = (t.strip() for t in text.split("=", 1))
            sch, _, meth = rhs.partition(":")
            if sch in ("keep", "float", "none"):
                new.append(Rule(pat, None))
            else:
                new.append(Rule(pat, parse_scheme(sch).name, meth or method or "rtn", config or MethodConfig()))
        new.extend(Rule(p, None) for p in keep)
        return replace(self, rules=tuple(new))

    def resolve(self, model: nn.Module) -> dict[str, LayerPlan]:
        """One entry per quantizable layer of ``model``, in module order."""
        out: dict[str, LayerPlan] = {}
        for name, mod in model.named_modules():
            kind = layer_kind(mod)
            if kind is None:
                continue
            chosen, idx = None, -1
            for i, rule in enumerate(self.rules):
                if rule.matches(name, kind):
                    chosen, idx = rule, i
            if chosen is None or chosen.scheme is None:
                out[name] = LayerPlan(name, kind, None, "keep", MethodConfig(), idx)
            else:
                scheme, note = fit_row_length(parse_scheme(chosen.scheme), row_length(mod))
                out[name] = LayerPlan(name, kind, scheme, chosen.method, chosen.config, idx, note)
        return out

    def unmatched_patterns(self, model: nn.Module) -> list[str]:
        """Patterns that match no quantizable layer (likely a typo in a --rule / --keep)."""
        names = [(n, layer_kind(m)) for n, m in model.named_modules() if layer_kind(m)]
        return [r.pattern for r in self.rules if not any(r.matches(n, k) for n, k in names)]

    # -- JSON --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "rules": [r.to_dict() for r in self.rules]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if not isinstance(d, dict) or not isinstance(d.get("rules"), list):
            raise SchemeError("a plan must be a JSON object with a 'rules' list")
        if d.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise SchemeError(f"plan version {d.get('version')} is not supported (this lowbit reads {PLAN_VERSION})")
        return cls(tuple(Rule.from_dict(r) for r in d["rules"]))

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> Plan:
        from lowbit.core.jsonio import JSONFileError, field, read_json

        p = Path(path)
        try:
            d = read_json(p)
            for i, r in enumerate(field(d, "rules", list, p)):  # every field's type, before from_dict reads it
                what = f"rule {i}: "
                field(r, "pattern", str, p, what=what)
                for key, types in _RULE_FIELDS.items():
                    field(r, key, types, p, None, what)
                cfg = r.get("config") or {}
                for key, types in _CONFIG_FIELDS.items():
                    field(cfg, key, types, p, None, what + "config: ")
            return cls.from_dict(d)
        except JSONFileError as e:
            if not p.is_file():
                raise LowbitError(f"{p}: no such plan file") from None
            raise LowbitError(str(e)) from None
        except SchemeError as e:
            raise LowbitError(f"{p}: {e}") from None


# a plan rule's optional fields and their JSON types, checked by Plan.from_json
_RULE_FIELDS = {"scheme": (str, type(None)), "method": (str,), "config": (dict,), "kind": (str, type(None))}
_CONFIG_FIELDS = {"observer": (str,), "importance": (bool,), "options": (dict,)}
